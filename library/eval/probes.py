"""Model queries beyond the fixed-t losses: the probes of the MIA suite and the engine that runs them.

A *probe* is the model-side half of an attack: the UNet (or VAE, or gradient) computation that turns a sample
into the numbers the attack's statistic is built from (SecMI's DDIM-inversion error, PIA's eps_0-path error,
GSA's gradient norms, ...). Each attack module defines its probe next to its statistic
(:meth:`library.eval.attacks.base.Attack.probes`); this module runs them, per model:

* in batches of samples, each batch in one :class:`QueryContext`;
* a UNet query asked for by several probes (same input latent, timestep and caption) is computed once per batch:
  :meth:`QueryContext.predict` memoises on ``(key, t, caption)``, so PIA, PIAN and SimA share eps(z_0, 0, c);
* noise is paired: :meth:`QueryContext.noise` draws a sample's noise from a generator seeded by (seed, the
  image's sha256, a tag, a draw index), so every model sees the very same noise and it does not depend on
  batching or sample order (as :mod:`library.eval.features` does for the losses);
* each probe's output is cached on its own, keyed by the probe's name and settings, the model and the samples:
  adding an attack to a finished evaluation costs only its own queries.

A probe returns ``{name: tensor [B, ...]}`` per batch; the engine concatenates the batches into
``{name: tensor [N, ...]}``, which the attack reads from ``FeatureSet.probes[probe.name]``.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch

from library.data.images import IMAGE_CONVERSION
from library.fileio import write_safetensors
from library.runtime import hashed_seed

PROBE_FORMAT = "smp-lora-mia-probe-v1"
LATENT_DRAWS = "smp-lora-mia-latent-draw"  # the namespace of every --latent_mode sample draw an evaluation makes


def evaluation_latent_seed(seed: int) -> int:
    """The seed of ``--latent_mode sample``'s draws of the query images: derived from ``--seed`` in a namespace of
    its own, so an evaluation never draws a training run's latents (training seeds its draws with its own
    ``--seed``), even at an equal seed; the attacker does not know the draw a model was trained on."""
    return hashed_seed(LATENT_DRAWS, seed)


@dataclass
class ModelContext:
    """One evaluated model, as the probes see it (the bundle with the model's LoRA or UNet applied)."""

    bundle: Any
    samples: Sequence[Any]  # library.eval.features.Sample, all samples in report order
    device: torch.device
    dtype: torch.dtype
    seed: int
    resolution: int
    clip_skip: int = 1
    max_token_length: int | None = None
    network: Any = None  # the applied LoRA network, None for the base model or a full UNet
    latent_mode: str = "mean"  # how images are encoded (--latent_mode): the posterior's mean or a seeded draw

    @property
    def unet(self) -> Any:
        return self.bundle.unet

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha-bar of SD's scaled-linear training schedule, float64 on the CPU (index = timestep)."""
        return self.bundle.noise_scheduler.alphas_cumprod.double()

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """What a gradient attack differentiates, one group per feature.

        For a LoRA: each of its tensors (``<module>.lora_down.weight``, ``...lora_up.weight``); only the LoRA is
        what fine-tuning changed. Otherwise (base model, full fine-tune): the UNet per block (``conv_in``,
        ``time_embedding``, ``down_blocks.0``, ..., ``mid_block``, ``up_blocks.3``, ``conv_out``, ...).
        """
        if self.network is not None:
            return {name: [p] for name, p in self.network.named_parameters()}
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, p in self.unet.named_parameters():
            parts = name.split(".")
            block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
            groups.setdefault(block, []).append(p)
        return groups

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """The text conditioning of ``captions`` (B, tokens, D) in the model's dtype, with the evaluation's
        clip skip and token length."""
        from library.sd.text import encode_prompts

        states = encode_prompts(self.bundle.tokenizer, self.bundle.text_encoder, list(captions),
                                max_token_length=self.max_token_length, clip_skip=self.clip_skip)
        return states.to(self.device, self.dtype)

    def encode_images(self, images: torch.Tensor, sample_seeds: Sequence[int] | None = None) -> torch.Tensor:
        """SD latents of ``images`` [B, 3, R, R] in [-1, 1], in the model's dtype on its device: the VAE posterior's
        mean, or with ``sample_seeds`` (one per image) a draw seeded by each."""
        from library.data.latents import encode_pixels

        return encode_pixels(self.bundle.vae, images, sample_seeds=sample_seeds).to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] (fp32) of SD latents (already multiplied by the VAE scaling factor)."""
        vae = self.bundle.vae
        images = vae.decode(latents.to(self.device, vae.dtype) / vae.config.scaling_factor).sample
        return images.float().clamp(-1.0, 1.0)


class QueryContext:
    """One batch of samples of one model: its clean latents, paired noise, captions and memoised UNet queries."""

    def __init__(self, model: ModelContext, index: Sequence[int], latents: torch.Tensor) -> None:
        self.model = model
        self.index = list(index)
        self.samples = [model.samples[i] for i in self.index]
        self.z0 = latents.to(model.device, model.dtype)
        self.captions = [s.caption for s in self.samples]
        self.queries = 0  # UNet forwards (per sample row) actually computed in this batch
        self._memo: dict[tuple, torch.Tensor] = {}
        self._conditioning: dict[str, torch.Tensor] = {}
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    # -- inputs -------------------------------------------------------------------------------------
    def noise(self, tag: str, draw: int = 0, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Gaussian noise [B, *shape] (default: the latent shape), one generator per sample seeded by
        (seed, sample sha256, ``tag``, ``draw``): the same for every model, whatever the batching."""
        shape = tuple(shape) if shape is not None else tuple(self.z0.shape[1:])
        rows = []
        for sample in self.samples:
            seed = hashed_seed("smp-lora-mia-probe-noise", self.model.seed, sample.sha256, tag, draw)
            rows.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32))
        return torch.stack(rows).to(self.model.device, self.model.dtype)

    def encode_images(self, images: torch.Tensor, tag: str) -> torch.Tensor:
        """Latents of ``images`` [B, 3, R, R] (derived from this batch's samples, e.g. PFAMI's crops), encoded as
        the query images are (``--latent_mode``): the posterior's mean, or a draw seeded by (seed, the sample's
        sha256, ``tag``), the same for every model."""
        seeds = None
        if self.model.latent_mode == "sample":
            seeds = [hashed_seed(LATENT_DRAWS, self.model.seed, s.sha256, tag) for s in self.samples]
        return self.model.encode_images(images, seeds)

    def conditioning(self, captions: Sequence[str] | None = None) -> torch.Tensor:
        """Text conditioning (B, tokens, D) of ``captions`` (default: the samples' own), each caption encoded
        once per batch."""
        captions = list(self.captions if captions is None else captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._conditioning]
        if missing:
            for caption, state in zip(missing, self.model.encode(missing)):
                self._conditioning[caption] = state
        return torch.stack([self._conditioning[c] for c in captions])

    def images(self) -> torch.Tensor:
        """The query images [B, 3, R, R] in [-1, 1] (fp32, CPU), as the training data loader reads them."""
        if self._images is None:
            from library.data.images import load_image

            self._images = torch.stack([load_image(s.path, self.model.resolution) for s in self.samples])
        return self._images

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha-bar at ``t`` (an int or a [B] tensor) as a [B, 1, 1, 1] tensor in the model's dtype."""
        a = self.model.alphas_cumprod[torch.as_tensor(t, dtype=torch.long).expand(len(self))]
        return a.view(-1, 1, 1, 1).to(self.model.device, self.model.dtype)

    # -- the UNet -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, t: int | torch.Tensor, *, key: str, caption_key: str = "true",
                captions: Sequence[str] | None = None) -> torch.Tensor:
        """The UNet's noise prediction eps(x, t, c) for the batch, memoised on (``key``, t, ``caption_key``).

        ``key`` names the input latent (``"z0"`` for the clean latents, ``"noised:t=450:draw=0"``, ...): two
        probes asking with the same key, timestep and caption key get the same tensor and cost one query.
        ``captions`` default to the samples' own (``caption_key="true"``); other captions need their own key.
        """
        t_key = int(t) if isinstance(t, int) else tuple(int(v) for v in torch.as_tensor(t).reshape(-1))
        memo_key = (key, t_key, caption_key)
        if memo_key not in self._memo:
            if captions is None and caption_key != "true":
                raise ValueError(f"caption_key {caption_key!r} needs its captions")
            timesteps = torch.as_tensor(t, dtype=torch.long).expand(len(self)).to(self.model.device)
            cond = self.conditioning(captions)
            self._memo[memo_key] = self.model.unet(x.to(self.model.dtype), timesteps,
                                                   encoder_hidden_states=cond).sample
            self.queries += len(self)
        return self._memo[memo_key]

    def denoising_loss(self, t: int, noise_tag: str, *, key: str, latents: torch.Tensor | None = None,
                       caption_key: str = "true", captions: Sequence[str] | None = None) -> torch.Tensor:
        """[B]: the mean squared denoising loss ||eps - eps(z_t, t, c)||^2 / D, with z_t = sqrt(abar_t) z +
        sqrt(1 - abar_t) eps, eps the paired noise ``noise(noise_tag)`` and z ``latents`` (default: the clean
        latents). ``key`` names z_t for :meth:`predict` (with ``caption_key`` / ``captions`` as there)."""
        eps = self.noise(noise_tag)
        abar = self.alpha_bar(t)
        z = self.z0 if latents is None else latents
        z_t = abar.sqrt() * z + (1.0 - abar).sqrt() * eps
        pred = self.predict(z_t, t, key=key, caption_key=caption_key, captions=captions)
        return (pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1)


class Probe(ABC):
    """The model-side half of an attack: per batch, ``{name: tensor [B, ...]}`` (see the module docstring)."""

    name: ClassVar[str]

    def settings(self) -> dict[str, Any]:
        """Everything that changes the probe's output (goes into its cache key and the report)."""
        return {}

    @abstractmethod
    def queries_per_sample(self) -> float:
        """The attack's nominal cost in UNet forward passes per sample (a backward pass counts as two), as the
        algorithm states it, before any sharing with other probes."""

    def begin(self, model: ModelContext) -> None:
        """Called once per model before its batches (e.g. to generate images shared by all samples)."""

    @abstractmethod
    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        """The probe's outputs for one batch, each [B, ...] (detached; moved to the CPU by the engine)."""

    @property
    def identity(self) -> str:
        """Name and settings: two attacks asking for the same identity share one computation."""
        return json.dumps({"name": self.name, "settings": self.settings()}, sort_keys=True, default=str)


@dataclass
class ProbeRun:
    """What the engine did for one probe of one model (for the report's cost table)."""

    outputs: dict[str, torch.Tensor]
    cache_key: str
    cache_hit: bool
    queries_computed: int = 0  # UNet forwards this probe triggered (memo hits excluded); 0 on a cache hit
    seconds: float = 0.0


def unique_probes(probes: Iterable[Probe]) -> list[Probe]:
    """``probes`` without repeats (same :attr:`Probe.identity`), first occurrence kept; names must be unique."""
    seen: dict[str, Probe] = {}
    for probe in probes:
        other = next((p for p in seen.values() if p.name == probe.name), None)
        if other is not None and other.identity != probe.identity:
            raise ValueError(f"two probes named {probe.name!r} with different settings")
        seen.setdefault(probe.identity, probe)
    return list(seen.values())


def probe_cache_key(probe: Probe, model_identity: dict[str, Any]) -> str:
    """sha256 over the probe's identity and everything about the model and samples its outputs depend on."""
    doc = {"format": PROBE_FORMAT, "probe": json.loads(probe.identity), "model": model_identity,
           "image_conversion": IMAGE_CONVERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class ProbeCache:
    """Probe outputs as safetensors files ``probe-<name>-<key>.safetensors`` under ``root`` (None: no cache)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def _file(self, name: str, key: str) -> Path | None:
        return None if self.root is None else self.root / f"probe-{name}-{key[:32]}.safetensors"

    def read(self, name: str, key: str, n: int) -> dict[str, torch.Tensor] | None:
        file = self._file(name, key)
        if file is None or not file.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                if (handle.metadata() or {}).get("key") != key:
                    return None
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception:  # an unreadable cache file is only a miss: the outputs can be recomputed
            return None
        if not tensors or any(v.shape[0] != n or not torch.isfinite(v.float()).all() for v in tensors.values()):
            return None
        return tensors

    def write(self, name: str, key: str, outputs: dict[str, torch.Tensor]) -> None:
        file = self._file(name, key)
        if file is not None:
            write_safetensors(file, {k: v.contiguous() for k, v in outputs.items()},
                              {"format": PROBE_FORMAT, "key": key, "probe": name})


def cached_probe_runs(probes: Sequence[Probe], cache: ProbeCache, model_identity: dict[str, Any],
                      n: int) -> tuple[dict[str, ProbeRun], list[tuple[Probe, str]]]:
    """(the probes' runs found in the cache, the (probe, cache key) pairs still to compute); each file read once."""
    runs: dict[str, ProbeRun] = {}
    pending: list[tuple[Probe, str]] = []
    for probe in unique_probes(probes):
        key = probe_cache_key(probe, model_identity)
        cached = cache.read(probe.name, key, n)
        if cached is not None:
            runs[probe.name] = ProbeRun(cached, key, cache_hit=True)
        else:
            pending.append((probe, key))
    return runs, pending


def run_probes(probes: Sequence[Probe], model: ModelContext, latents: torch.Tensor, *, batch_size: int,
               cache: ProbeCache, model_identity: dict[str, Any]) -> dict[str, ProbeRun]:
    """Every probe's outputs on every sample of ``model``: from the cache, else computed batch by batch with one
    shared :class:`QueryContext` per batch (so shared queries run once)."""
    runs, pending = cached_probe_runs(probes, cache, model_identity, len(model.samples))
    return {**runs, **compute_probes(pending, model, latents, batch_size=batch_size, cache=cache)}


def compute_probes(pending: Sequence[tuple[Probe, str]], model: ModelContext, latents: torch.Tensor, *,
                   batch_size: int, cache: ProbeCache) -> dict[str, ProbeRun]:
    """The outputs of the (probe, cache key) pairs ``pending`` on every sample of ``model``, computed batch by batch
    with one shared :class:`QueryContext` per batch, and written to the cache."""
    from library.errors import ModelError

    n = len(model.samples)
    runs: dict[str, ProbeRun] = {}
    if not pending:
        return runs
    parts: dict[str, dict[str, list[torch.Tensor]]] = {probe.name: {} for probe, _ in pending}
    stats = {probe.name: ProbeRun({}, key, cache_hit=False) for probe, key in pending}
    for probe, _ in pending:
        t0 = time.perf_counter()
        probe.begin(model)
        stats[probe.name].seconds += time.perf_counter() - t0
    for start in range(0, n, batch_size):
        index = list(range(start, min(n, start + batch_size)))
        ctx = QueryContext(model, index, latents[index])
        for probe, _ in pending:
            t0, before = time.perf_counter(), ctx.queries
            outputs = probe.compute(ctx)
            stats[probe.name].queries_computed += ctx.queries - before
            stats[probe.name].seconds += time.perf_counter() - t0
            for name, value in outputs.items():
                parts[probe.name].setdefault(name, []).append(value.detach().float().cpu())
    for probe, key in pending:
        outputs = {name: torch.cat(chunks) for name, chunks in parts[probe.name].items()}
        bad = [name for name, value in outputs.items() if not torch.isfinite(value).all()]
        if bad:
            raise ModelError(f"attack probe '{probe.name}' gives NaN/inf values ({', '.join(bad)}) on this model "
                             "(try --mixed_precision no)")
        cache.write(probe.name, key, outputs)
        stats[probe.name].outputs = outputs
        runs[probe.name] = stats[probe.name]
    return runs


__all__ = ["ModelContext", "Probe", "ProbeCache", "ProbeRun", "QueryContext", "cached_probe_runs", "compute_probes",
           "probe_cache_key", "run_probes",
           "unique_probes"]
