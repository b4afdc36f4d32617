"""Black-box membership inference by generation (Wu et al. 2022; the paper's Table 11 "black-box" row).

The attacker sees only the pipeline's outputs: it generates ``--blackbox_num_images`` images from the query's
caption and measures how close the query image is to its nearest generation; a memorised training image is
regenerated almost verbatim, so a small distance means "member". Distances (:mod:`.image_distance`): pixel MSE,
VAE-latent MSE and one per feature space the evaluation's weights give; a logistic regression on D_aux combines
them (headline), each distance alone is a non-headline threshold variant.

Generation: deterministic DDIM (eta = 0, :mod:`.ddim`, ``--blackbox_steps`` steps of SD's "leading" spacing down
to the clean latent) with classifier-free guidance ``--blackbox_guidance_scale`` (unconditional = the empty
caption's encoding), decoded by the VAE. The initial noise of image i of caption c is seeded by (seed, c, i):
every model starts from the same noise, so two models differ only by what they learned.

Our choices (Wu et al. leave them open or use other models): the images are generated once per model and
distinct caption, when the first sample with that caption is scored, and released after its last one (many
samples may share a caption; with distinct captions memory stays bounded); each distance picks its own nearest
generation; feature distances are mean squared differences.

Cost: ``captions x num_images x steps x (2 with guidance > 1, else 1)`` UNet forwards per model, shared by the
samples. :meth:`BlackBoxProbe.queries_per_sample` is that cost per distinct caption until the probe has seen a
model's samples, then per sample (divided by N); the probe writes the per-sample value as its
``queries_per_sample`` output, which the attack reports once fitted.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from library.eval.attacks.ddim import ddim_step, ddim_timesteps
from library.eval.attacks.image_distance import (
    COST_OUTPUT,
    DistanceClassifierAttack,
    ImageSet,
    describe,
    load_image_extractors,
    nearest_distances,
)
from library.eval.probes import ModelContext, Probe, QueryContext
from library.runtime import hashed_seed

if TYPE_CHECKING:
    from library.eval.config import EvalConfig
    from library.eval.extractors import FeatureExtractor

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (latents [B, ...], timestep) -> eps prediction [B, ...]
GENERATION_BATCH = 8  # images per denoising pass (twice the rows with guidance)


def guidance_passes(scale: float) -> int:
    """UNet forwards per denoising step and image: 2 with classifier-free guidance, 1 without (scale 1)."""
    return 2 if scale > 1.0 else 1


def _abar(alphas_cumprod: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    """alpha-bar at ``t`` as an fp32 scalar next to ``like``; 1 at t = -1 (the clean latent, as in :mod:`.ddim`)."""
    value = 1.0 if t < 0 else float(alphas_cumprod[t])
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def ddim_denoise(z: torch.Tensor, timesteps: Sequence[int], eps_fn: EpsFn, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM from latents ``z`` at ``timesteps[0]`` through each of ``timesteps`` (decreasing) to the
    clean latent; the DDIM arithmetic runs in fp32 whatever the model's dtype."""
    z = z.float()
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = eps_fn(z, int(t)).float()
        z = ddim_step(z, eps, _abar(alphas_cumprod, t, z), _abar(alphas_cumprod, t_next, z))
    return z


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def context_eps(ctx: QueryContext, key: str, scale: float) -> EpsFn:
    """eps(z, t) for the batch's own captions through the context's memoised queries (so the engine counts them),
    guided by the empty caption at ``scale`` (1: the conditional pass alone); ``key`` names the latent chain."""
    blank = [""] * len(ctx)

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        cond = ctx.predict(z, t, key=key).float()
        if guidance_passes(scale) == 1:
            return cond
        return guided(cond, ctx.predict(z, t, key=key, caption_key="empty", captions=blank).float(), scale)

    return eps


def unet_eps(unet: Any, cond: torch.Tensor, uncond: torch.Tensor, scale: float, dtype: torch.dtype) -> EpsFn:
    """eps(z, t) of ``unet`` for one caption's conditioning ``cond`` [1, T, D] (``uncond``: the empty caption's),
    guided by ``scale``; with guidance the conditional and unconditional rows go through one forward."""

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        rows = z.shape[0]
        x = z.to(dtype)
        if guidance_passes(scale) == 1:
            steps = torch.full((rows,), t, dtype=torch.long, device=z.device)
            return unet(x, steps, encoder_hidden_states=cond.expand(rows, -1, -1)).sample
        steps = torch.full((2 * rows,), t, dtype=torch.long, device=z.device)
        states = torch.cat([uncond.expand(rows, -1, -1), cond.expand(rows, -1, -1)])
        eps_uncond, eps_cond = unet(torch.cat([x, x]), steps, encoder_hidden_states=states).sample.float().chunk(2)
        return guided(eps_cond, eps_uncond, scale)

    return eps


def generation_noise(seed: int, caption: str, count: int, shape: Sequence[int]) -> torch.Tensor:
    """The initial latents [count, *shape] (fp32, CPU) of a caption's generations: image i seeded by (seed,
    caption, i), the same for every model and whatever the batching."""
    rows = [torch.randn(tuple(shape), dtype=torch.float32, generator=torch.Generator().manual_seed(
        hashed_seed("smp-lora-mia-blackbox", seed, caption, i))) for i in range(count)]
    return torch.stack(rows)


class BlackBoxProbe(Probe):
    """Per sample: the distance of the query image to its nearest generation from its caption, in every space
    (``pixel``, ``latent``, ``feat_<extractor>_<key>``), and the attack's cost (``queries_per_sample``)."""

    name = "blackbox"

    def __init__(self, num_images: int = 8, steps: int = 20, guidance_scale: float = 7.5,
                 extractors: Sequence[FeatureExtractor] = (), extractor_ids: dict[str, str] | None = None) -> None:
        self.num_images = int(num_images)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.extractors = list(extractors)
        self.extractor_ids = dict(extractor_ids or {e.name: e.name for e in self.extractors})
        self.per_sample_cost: float | None = None
        self._remaining: Counter[str] = Counter()
        self._generated: dict[str, ImageSet] = {}

    def settings(self) -> dict[str, Any]:
        return {"num_images": self.num_images, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "extractors": self.extractor_ids}

    def caption_cost(self) -> int:
        """UNet forwards spent on one caption's generations."""
        return self.num_images * self.steps * guidance_passes(self.guidance_scale)

    def queries_per_sample(self) -> float:
        return self.per_sample_cost if self.per_sample_cost is not None else float(self.caption_cost())

    def begin(self, model: ModelContext) -> None:
        self._remaining = Counter(s.caption for s in model.samples)
        self._generated = {}
        self.per_sample_cost = len(self._remaining) * self.caption_cost() / max(len(model.samples), 1)

    def generations(self, ctx: QueryContext, caption: str) -> ImageSet:
        """``caption``'s generations with this model (made on first use; their UNet forwards count in ``ctx``)."""
        if caption not in self._generated:
            model = ctx.model
            noise = generation_noise(model.seed, caption, self.num_images, ctx.z0.shape[1:]).to(model.device)
            eps = unet_eps(model.unet, ctx.conditioning([caption]), ctx.conditioning([""]), self.guidance_scale,
                           model.dtype)
            timesteps = ddim_timesteps(self.steps, num_train_timesteps=len(model.alphas_cumprod))
            latents, images = [], []
            with torch.no_grad():
                for start in range(0, self.num_images, GENERATION_BATCH):
                    chunk = ddim_denoise(noise[start:start + GENERATION_BATCH], timesteps, eps, model.alphas_cumprod)
                    ctx.queries += chunk.shape[0] * len(timesteps) * guidance_passes(self.guidance_scale)
                    latents.append(chunk.cpu())
                    images.append(model.decode(chunk).cpu())
            self._generated[caption] = describe(torch.cat(images), torch.cat(latents), self.extractors, model.device)
        return self._generated[caption]

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        if self.per_sample_cost is None:
            raise RuntimeError("BlackBoxProbe.compute before begin(model)")
        with torch.no_grad():
            query = describe(ctx.images(), ctx.z0, self.extractors, ctx.model.device)
        out: dict[str, torch.Tensor] = {}
        for caption in dict.fromkeys(ctx.captions):
            rows = [i for i, c in enumerate(ctx.captions) if c == caption]
            for name, d in nearest_distances(query.subset(rows), self.generations(ctx, caption)).items():
                out.setdefault(name, torch.zeros(len(ctx), dtype=torch.float64))[rows] = d
            self._remaining[caption] -= len(rows)
            if self._remaining[caption] <= 0:  # the caption's last sample: its images are no longer needed
                self._generated.pop(caption, None)
        out[COST_OUTPUT] = torch.full((len(ctx),), self.per_sample_cost, dtype=torch.float64)
        return out


class BlackBoxAttack(DistanceClassifierAttack):
    name = "blackbox"
    description = ("logistic regression on D_aux over the distances of the query image to its nearest generation "
                   "from its caption (pixel, VAE latent, feature spaces)")
    threat_model = "black-box: images generated by the fine-tuned pipeline from the query's caption"
    citation = ("Wu et al. 2022, Membership inference attacks against text-to-image generation models "
                "(arXiv:2210.00968)")

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> BlackBoxAttack:
        extractors, ids = load_image_extractors(config, device)
        probe = BlackBoxProbe(config.blackbox_num_images, config.blackbox_steps, config.blackbox_guidance_scale,
                              extractors, ids)
        return cls(probe, config.seed)


__all__ = ["BlackBoxAttack", "BlackBoxProbe", "ddim_denoise", "generation_noise", "guidance_passes", "guided",
           "unet_eps"]
