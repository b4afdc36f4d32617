"""The reconstruction attack, an img2img variant of Pang & Wang's (NDSS 2025, "Black-box membership inference
attacks against fine-tuned diffusion models"): img2img the query image with the fine-tuned pipeline and measure
how well it comes back. A fine-tune reconstructs its training images more faithfully than unseen ones.

Per query and repeat r < ``--reconstruction_repeats``: noise the clean latent to the img2img start timestep,
    z_s = sqrt(abar_s) z_0 + sqrt(1 - abar_s) eps_r    (eps_r = the paired noise ``ctx.noise("reconstruction", r)``)
where s starts the last int(steps x strength) steps of the ``--blackbox_steps``-step DDIM schedule (diffusers'
img2img: ``--reconstruction_strength`` 0.5 of 20 steps starts at t = 451 and runs 10 steps), denoise with
deterministic DDIM and classifier-free guidance ``--blackbox_guidance_scale`` (unconditional = the empty caption)
to the clean latent, decode, and measure the distance to the query (:mod:`.image_distance`: pixel MSE, VAE-latent
MSE, feature spaces), averaged over the repeats. Attack: a logistic regression on D_aux over the distances
(headline), each distance alone a non-headline threshold variant.

Our choices: Pang & Wang's public code generates its images from the query's caption alone (text-to-image, 3
images, DeiT cosine similarity averaged over them), which is what :mod:`.blackbox` measures here; this module
keeps the query image in the loop (img2img). Pang & Wang train their distance model on shadow fine-tunes; we fit
the classifier on D_aux of the attacked model itself (the protocol of the suite). The DDIM loop is the black-box
attack's (:func:`~library.eval.attacks.blackbox.ddim_denoise`). Cost: repeats x (steps at or below s) x (2 with
guidance > 1, else 1) UNet forwards per sample.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from library.errors import ConfigError
from library.eval.attacks.blackbox import (
    EpsFn,
    context_eps,
    ddim_denoise,
    guidance_passes,
)
from library.eval.attacks.ddim import ddim_timesteps
from library.eval.attacks.image_distance import (
    COST_OUTPUT,
    DistanceClassifierAttack,
    describe,
    load_image_extractors,
    paired_distances,
)
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig
    from library.eval.extractors import FeatureExtractor


def reconstruction_timesteps(steps: int, strength: float, num_train_timesteps: int = 1000) -> list[int]:
    """The denoising timesteps of an img2img with ``strength``: the last ``int(steps x strength)`` entries of the
    ``steps``-step DDIM schedule, as diffusers' img2img pipeline takes them (``get_timesteps``)."""
    schedule = ddim_timesteps(steps, num_train_timesteps=num_train_timesteps)
    count = min(int(steps * strength), len(schedule))  # diffusers' rounding: 0.54 of 20 steps runs 10, from 451
    if count < 1:
        raise ConfigError(f"'reconstruction_strength' {strength} leaves no step of the {steps}-step DDIM schedule "
                          f"(img2img runs int(steps x strength) of them); use a strength of at least {1 / steps:g}")
    return schedule[len(schedule) - count:]


class ReconstructionProbe(Probe):
    """Per sample: the distance of the query to its reconstructions in every space (``pixel``, ``latent``,
    ``feat_<extractor>_<key>``; mean over the repeats) and the cost (``queries_per_sample``)."""

    name = "reconstruction"

    def __init__(self, strength: float = 0.5, steps: int = 20, guidance_scale: float = 7.5, repeats: int = 1,
                 extractors: Sequence[FeatureExtractor] = (), extractor_ids: dict[str, str] | None = None) -> None:
        self.strength = float(strength)
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.repeats = int(repeats)
        self.extractors = list(extractors)
        self.extractor_ids = dict(extractor_ids or {e.name: e.name for e in self.extractors})
        self.timesteps = reconstruction_timesteps(self.steps, self.strength)

    def settings(self) -> dict[str, Any]:
        return {"strength": self.strength, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "repeats": self.repeats, "start_timestep": self.timesteps[0], "extractors": self.extractor_ids}

    def queries_per_sample(self) -> float:
        return float(self.repeats * len(self.timesteps) * guidance_passes(self.guidance_scale))

    def _eps(self, ctx: QueryContext, repeat: int) -> EpsFn:
        """Guided eps through the context's memoised queries (so the engine counts them)."""
        key = f"reconstruction:strength={self.strength}:steps={self.steps}:draw={repeat}"
        return context_eps(ctx, key, self.guidance_scale)

    def reconstruct(self, ctx: QueryContext, repeat: int) -> torch.Tensor:
        """The batch's clean latents after noising to the start timestep with draw ``repeat`` and denoising."""
        abar = float(ctx.model.alphas_cumprod[self.timesteps[0]])
        z0 = ctx.z0.float()
        z = math.sqrt(abar) * z0 + math.sqrt(1.0 - abar) * ctx.noise("reconstruction", repeat).float()
        return ddim_denoise(z, self.timesteps, self._eps(ctx, repeat), ctx.model.alphas_cumprod)

    @torch.no_grad()
    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        device = ctx.model.device
        query = describe(ctx.images(), ctx.z0, self.extractors, device)
        total: dict[str, torch.Tensor] = {}
        for r in range(self.repeats):
            latents = self.reconstruct(ctx, r)
            rebuilt = describe(ctx.model.decode(latents), latents, self.extractors, device)
            for name, d in paired_distances(query, rebuilt).items():
                total[name] = total.get(name, 0.0) + d / self.repeats
        total[COST_OUTPUT] = torch.full((len(ctx),), self.queries_per_sample(), dtype=torch.float64)
        return total


class ReconstructionAttack(DistanceClassifierAttack):
    name = "reconstruction"
    description = ("logistic regression on D_aux over the distances of the query image to its img2img "
                   "reconstruction by the fine-tuned pipeline (pixel, VAE latent, feature spaces)")
    threat_model = "black-box: img2img outputs of the fine-tuned pipeline for the query image and its caption"
    citation = ("img2img variant of Pang & Wang, NDSS 2025, Black-box membership inference attacks against "
                "fine-tuned diffusion models (who generate from the caption alone, as blackbox does)")

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> ReconstructionAttack:
        extractors, ids = load_image_extractors(config, device)
        probe = ReconstructionProbe(config.reconstruction_strength, config.blackbox_steps,
                                    config.blackbox_guidance_scale, config.reconstruction_repeats, extractors, ids)
        return cls(probe, config.seed)


__all__ = ["ReconstructionAttack", "ReconstructionProbe", "reconstruction_timesteps"]
