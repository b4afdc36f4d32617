"""Pre-train the tiny SD-shaped base model on a disjoint ``pretrain`` portion (offline demo).

A LoRA over-fitted on a *randomly initialised* UNet says little about membership leakage: the base predicts
noise no better than zero, so everything the LoRA learns is "memorisation". The demo therefore starts from a
base that already models digits, trained here on images that are in none of the four membership sets:

1. **VAE** (``AutoencoderKL`` of :mod:`library.demo.tiny`): trained as an autoencoder on 32 px images, loss =
   reconstruction MSE on [-1, 1] pixels + ``kl_weight`` x KL(q(z|x) || N(0, I)) (mean over the batch of the
   per-image KL sum). The KL weight is tiny (1e-6, the order SD's VAE used) so latents carry the image; it only
   keeps the posterior from drifting to huge scales.
2. **Scaling factor.** SD multiplies latents by ``vae.config.scaling_factor`` (0.18215 for SD's VAE, which is
   1 / std of its latents) so the UNet sees roughly unit-variance latents, matching the unit-variance noise of
   the DDPM schedule. Our freshly trained VAE has its own latent scale, so after training we measure the std of
   the posterior means over the pretrain images and store ``1 / std`` (rounded to 5 significant digits) in the
   VAE config. Every loader (``LatentCache``, pipelines) reads it from there.
3. **UNet** (all parameters) **and text encoder**: standard SD epsilon-prediction loss on the VAE posterior
   means (the same "mean" latents the LoRA trainer caches), t ~ U{0..999}, SD's DDPM schedule
   (:func:`library.sd.models.make_noise_scheduler`). With probability ``caption_dropout`` a caption is replaced by
   "" so the model also learns the unconditional prediction classifier-free guidance needs.
   Why the text encoder is trained too (``train_text_encoder=True``, the default): with it frozen at its random
   init, the ten digit captions differ by only ~5% of their states' norm, and within the CPU budget the UNet
   learned to ignore them entirely — measured on held-out digits after 1,500 steps, the loss with the right
   caption was 0.07990 vs 0.07992 with a wrong one, and generated samples were classified as the prompted
   digit 10.5% of the time (chance). Trained jointly (same steps, ~10% more time), right 0.0783 vs wrong 0.0814
   and 44% of samples at guidance 5 showed the prompted digit. The effect is fragile on this budget: runs of
   1,300 steps (also with a 5-10x text-encoder learning rate) did not pick up the captions at all.

Everything random (init, batches, noise, timesteps, caption dropout, VAE posterior samples) comes from seeded
generators, so a given seed, data and thread count give the same model. The result is written with
:func:`library.demo.tiny.save_tiny_folder` (a ``StableDiffusionPipeline`` folder that
:func:`library.sd.models.load_sd_model` loads), plus ``pretrain.json`` describing the run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from library.data.dataset import load_image
from library.errors import ConfigError, DataError, ModelError
from library.runtime import echo, torch_threads
from library.sd.diffusion import (
    NoiseDraw,
    denoising_errors,
    draw_noise,
    per_sample_loss,
)
from library.sd.models import ModelBundle
from library.sd.text import encode_prompts

PRETRAIN_RECORD = "pretrain.json"
IMAGE_SIZE = 32  # the tiny stack's resolution: 32 px images <-> 4x8x8 latents

# Sized for 2 CPU cores at 1 thread (measured ~0.29 s per VAE step, ~0.11 s per UNet+text-encoder step at
# batch 16): about 1.2 min of VAE and 2.7 min of UNet training (238 s CPU in all with seed 0 on 1,397 digits).
# Caption conditioning emerged at 1,500 UNet steps (seed 0) but not in runs of 1,300: fewer steps save time
# but tend to give a base that ignores its prompts (fine for the MIA demo, not for class-prompted samples).
DEFAULT_VAE_STEPS = 250
DEFAULT_UNET_STEPS = 1500
# Batch 16 beat batch 32 at equal images seen for both networks (more updates in the same CPU time).
DEFAULT_BATCH_SIZE = 16
DEFAULT_VAE_BATCH_SIZE = 16
DEFAULT_VAE_LR = 2e-3
DEFAULT_UNET_LR = 2e-3
DEFAULT_KL_WEIGHT = 1e-6
DEFAULT_CAPTION_DROPOUT = 0.1


class _Captioned(Protocol):
    path: Any
    caption: str


@dataclass
class PretrainReport:
    """What a pre-training run did and measured (written to ``pretrain.json`` next to the model)."""

    seed: int
    num_images: int
    vae_steps: int
    unet_steps: int
    batch_size: int
    vae_batch_size: int
    vae_lr: float
    unet_lr: float
    kl_weight: float
    caption_dropout: float
    train_text_encoder: bool
    threads: int
    scaling_factor: float = float("nan")
    latent_mean: float = float("nan")
    latent_std_before_scaling: float = float("nan")
    vae_recon_mse_first: float = float("nan")  # running mean over the first 10% of steps
    vae_recon_mse_last: float = float("nan")  # running mean over the last 10% of steps
    unet_loss_first: float = float("nan")
    unet_loss_last: float = float("nan")
    vae_seconds: float = 0.0
    unet_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


# ------------------------------------------------------------------------------------------------ helpers


def load_pixels(records: Sequence[_Captioned], resolution: int = IMAGE_SIZE) -> torch.Tensor:
    """All images of ``records`` as one float32 tensor (N, 3, R, R) in [-1, 1] (fits in memory at 32 px)."""
    if not records:
        raise DataError("no images to pre-train on: the pretrain set is empty")
    return torch.stack([load_image(r.path, resolution) for r in records])


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn epoch by epoch from seeded permutations (every image once per epoch)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            # Top up with a fresh permutation; a short tail is carried over, never dropped.
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``base``."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class _Progress:
    """Prints about ``lines`` progress lines with the running mean loss since the last line."""

    def __init__(self, name: str, total: int, log: Callable[[str], object], lines: int = 10) -> None:
        self.name, self.total, self.log = name, total, log
        self.every = max(1, total // lines)
        self.start = time.perf_counter()
        self._sum, self._count = 0.0, 0

    def update(self, step: int, loss: float) -> None:
        self._sum += loss
        self._count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            self.log(
                f"[pretrain {self.name}] step {step + 1}/{self.total}  loss {self._sum / self._count:.4f}  "
                f"{(step + 1) / max(elapsed, 1e-9):.1f} it/s  {elapsed:.0f}s"
            )
            self._sum, self._count = 0.0, 0


def _window_means(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss over the first and the last 10% of steps (at least one step each)."""
    if not losses:
        return float("nan"), float("nan")
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


# ------------------------------------------------------------------------------------------------ VAE


def train_vae(
    vae: torch.nn.Module,
    pixels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    generator: torch.Generator,
    log: Callable[[str], object] = echo,
) -> list[float]:
    """Train ``vae`` in place as an autoencoder; return the per-step reconstruction MSEs."""
    losses: list[float] = []
    if steps <= 0:
        return losses
    vae.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    progress = _Progress("vae", steps, log)
    for step, index in enumerate(_batches(len(pixels), batch_size, steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + kl_weight * posterior.kl().mean()
        if not math.isfinite(float(loss.detach())):
            raise ModelError(f"VAE pre-training diverged at step {step + 1}; lower the VAE learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(mse.detach()))
        progress.update(step, losses[-1])
    vae.eval()
    vae.requires_grad_(False)
    return losses


@torch.no_grad()
def posterior_means(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Unscaled VAE posterior means of ``pixels`` (N, 4, h, w)."""
    chunks = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in chunks])


@torch.no_grad()
def reconstruction_mse(vae: torch.nn.Module, pixels: torch.Tensor, batch_size: int = 128) -> float:
    """Mean squared error of decode(posterior mean) against ``pixels`` (on the [-1, 1] scale)."""
    total = 0.0
    for i in range(0, len(pixels), batch_size):
        x = pixels[i : i + batch_size]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
        total += float(((recon - x) ** 2).mean()) * len(x)
    return total / len(pixels)


def latent_scaling_factor(means: torch.Tensor) -> tuple[float, float, float]:
    """``(1 / std, mean, std)`` of unscaled latents, the factor rounded to 5 significant digits.

    This is how SD's 0.18215 was chosen: it makes the scaled latents unit-variance, the scale the DDPM
    noise schedule assumes.
    """
    std = float(means.float().std())
    if not math.isfinite(std) or std <= 0:
        raise ModelError(f"the VAE's latents have std {std}; pre-training diverged — lower the VAE learning rate")
    return float(f"{1.0 / std:.5g}"), float(means.float().mean()), std


# ------------------------------------------------------------------------------------------------ UNet


def _distinct_captions(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions (sorted) and each caption's row in them; row ``len(distinct)`` is ""."""
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    return distinct, torch.tensor([row[c] for c in captions], dtype=torch.long)


@torch.no_grad()
def caption_states(bundle: ModelBundle, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states of the distinct captions plus "" (last row), and each caption's row index.

    Demo captions repeat (ten digit names), so encoding each distinct caption once is far cheaper than
    running the text encoder per image.
    """
    distinct, rows = _distinct_captions(captions)
    return encode_prompts(bundle.tokenizer, bundle.text_encoder, distinct + [""]), rows


def train_unet(
    bundle: ModelBundle,
    latents: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    generator: torch.Generator,
    train_text_encoder: bool = True,
    log: Callable[[str], object] = echo,
) -> list[float]:
    """Train every UNet parameter in place with SD's epsilon loss on scaled latents; return per-step losses.

    With ``train_text_encoder`` the text encoder is trained jointly (same learning rate): the distinct
    captions are re-encoded, with gradients, once per step.
    """
    losses: list[float] = []
    if steps <= 0:
        return losses
    distinct, rows = _distinct_captions(captions)
    empty_row = len(distinct)
    unet, text_encoder = bundle.unet, bundle.text_encoder
    params = list(unet.parameters())
    if train_text_encoder:
        text_encoder.requires_grad_(True)
        text_encoder.train()
        params += list(text_encoder.parameters())
        states = None
    else:
        states, _ = caption_states(bundle, distinct)
    unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    progress = _Progress("unet", steps, log)
    for step, index in enumerate(_batches(len(latents), batch_size, steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        batch_rows = rows[index].clone()
        dropped = torch.rand(len(index), generator=generator) < caption_dropout
        batch_rows[dropped] = empty_row
        x = latents[index]
        draw = draw_noise(x, generator)
        step_states = (
            encode_prompts(bundle.tokenizer, text_encoder, distinct + [""]) if train_text_encoder else states
        )
        loss = per_sample_loss(denoising_errors(unet, bundle.noise_scheduler, x, step_states[batch_rows], draw)).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"UNet pre-training diverged at step {step + 1} (loss {value}); lower the UNet lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(value)
        progress.update(step, value)
    for module in (unet, text_encoder):
        module.eval()
        module.requires_grad_(False)
    return losses


@torch.no_grad()
def denoising_loss(
    bundle: ModelBundle,
    latents: torch.Tensor,
    captions: Sequence[str],
    *,
    seed: int = 1234,
    draws: int = 4,
    batch_size: int = 128,
) -> float:
    """Mean epsilon-MSE of the UNet on ``latents`` over ``draws`` seeded (t, noise) draws per latent.

    The draws depend only on ``seed`` and the latents' shape, so two UNets scored with the same seed see
    exactly the same noisy inputs (a paired comparison).
    """
    states, rows = caption_states(bundle, captions)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        draw = draw_noise(latents, generator)
        for i in range(0, len(latents), batch_size):
            part = NoiseDraw(draw.timesteps[i : i + batch_size], draw.noise[i : i + batch_size])
            x = latents[i : i + batch_size]
            errors = denoising_errors(bundle.unet, bundle.noise_scheduler, x, states[rows[i : i + batch_size]], part)
            total += float(per_sample_loss(errors).sum())
            count += len(x)
    return total / count


@torch.no_grad()
def scaled_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the UNet sees: posterior means times the VAE's configured scaling factor."""
    return posterior_means(vae, pixels) * float(vae.config.scaling_factor)


# ------------------------------------------------------------------------------------------------ driver


def _check_budget(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def pretrain_base_bundle(
    images: Sequence[_Captioned],
    *,
    seed: int = 0,
    vae_steps: int = DEFAULT_VAE_STEPS,
    unet_steps: int = DEFAULT_UNET_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE,
    lr: float = DEFAULT_UNET_LR,
    vae_lr: float = DEFAULT_VAE_LR,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    threads: int | None = None,
    caption_dropout: float = DEFAULT_CAPTION_DROPOUT,
    train_text_encoder: bool = True,
    log: Callable[[str], object] = echo,
) -> tuple[ModelBundle, PretrainReport]:
    """Pre-train the tiny stack in memory (see the module docstring); return it and a report.

    ``images``: records with ``.path`` and ``.caption`` (e.g. :class:`library.data.dataset.ImageCaption`).
    ``lr`` / ``batch_size`` are the UNet's peak learning rate and batch size, ``vae_lr`` / ``vae_batch_size``
    the VAE's. ``threads`` sets torch's intra-op threads for the run (restored afterwards; None keeps them).
    """
    from library.demo.tiny import build_tiny_stack

    _check_budget("vae_steps", vae_steps)
    _check_budget("unet_steps", unet_steps)
    if batch_size < 1 or vae_batch_size < 1:
        raise ConfigError(f"batch sizes must be at least 1, got {batch_size} (UNet) and {vae_batch_size} (VAE)")
    if not 0.0 <= caption_dropout < 1.0:
        raise ConfigError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
    if lr <= 0 or vae_lr <= 0:
        raise ConfigError(f"learning rates must be positive, got lr={lr}, vae_lr={vae_lr}")
    captions = [str(r.caption) for r in images]
    if any(not c.strip() for c in captions):
        raise DataError("a pretrain image has an empty caption; every image needs one (dropout adds empty ones)")

    with torch_threads(threads):
        report = PretrainReport(
            seed=seed, num_images=len(images), vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
            vae_batch_size=vae_batch_size,
            vae_lr=vae_lr, unet_lr=lr, kl_weight=kl_weight, caption_dropout=caption_dropout,
            train_text_encoder=train_text_encoder, threads=torch.get_num_threads(),
        )
        started = time.perf_counter()
        pixels = load_pixels(images)
        log(f"[pretrain] {len(images)} images at {IMAGE_SIZE}px, seed {seed}, {torch.get_num_threads()} thread(s)")
        bundle = build_tiny_stack(seed)
        # One generator per phase, both derived from the seed, so the UNet phase does not depend on how many
        # random numbers the VAE phase drew (changing vae_steps leaves the UNet's batch order alone).
        vae_gen = torch.Generator().manual_seed(seed * 2 + 1)
        unet_gen = torch.Generator().manual_seed(seed * 2 + 2)

        t0 = time.perf_counter()
        vae_losses = train_vae(
            bundle.vae, pixels, steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr, kl_weight=kl_weight,
            generator=vae_gen, log=log,
        )
        report.vae_seconds = time.perf_counter() - t0
        report.vae_recon_mse_first, report.vae_recon_mse_last = _window_means(vae_losses)

        means = posterior_means(bundle.vae, pixels)
        factor, report.latent_mean, report.latent_std_before_scaling = latent_scaling_factor(means)
        bundle.vae.register_to_config(scaling_factor=factor)
        report.scaling_factor = factor
        log(
            f"[pretrain] latents: mean {report.latent_mean:.3f}, std {report.latent_std_before_scaling:.3f} "
            f"-> scaling_factor {factor} (SD's VAE: 0.18215)"
        )
        latents = means * factor

        t0 = time.perf_counter()
        unet_losses = train_unet(
            bundle, latents, captions, steps=unet_steps, batch_size=batch_size, lr=lr,
            caption_dropout=caption_dropout, generator=unet_gen, train_text_encoder=train_text_encoder, log=log,
        )
        report.unet_seconds = time.perf_counter() - t0
        report.unet_loss_first, report.unet_loss_last = _window_means(unet_losses)
        report.total_seconds = time.perf_counter() - started
    bundle.source = f"pretrained-tiny:seed={seed}"
    return bundle, report


def pretrain_base_model(
    images: Sequence[_Captioned],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], object] = echo,
    **settings: Any,
) -> Path:
    """Pre-train the tiny stack on ``images`` and save it as a diffusers folder at ``output_dir``.

    ``settings`` are :func:`pretrain_base_bundle`'s keyword arguments (seed, step counts, learning rates, ...).

    The folder loads with :func:`library.sd.models.load_sd_model`; ``output_dir/pretrain.json`` records the
    settings and measurements. An existing non-empty ``output_dir`` is refused *before* training unless
    ``overwrite`` (and then only a diffusers folder is replaced).
    """
    from library.demo.tiny import save_tiny_folder

    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise ModelError(f"{target} already exists and is not empty; choose another folder or pass --overwrite")
        if not (target / "model_index.json").is_file():
            raise ModelError(f"{target} is not a diffusers model folder; refusing to overwrite it")
    bundle, report = pretrain_base_bundle(images, log=log, **settings)
    save_tiny_folder(bundle, target, overwrite=overwrite)
    (target / PRETRAIN_RECORD).write_text(report.to_json(), encoding="utf-8")
    log(
        f"[pretrain] saved {target}: VAE recon MSE {report.vae_recon_mse_first:.4f} -> "
        f"{report.vae_recon_mse_last:.4f}, "
        f"UNet loss {report.unet_loss_first:.4f} -> {report.unet_loss_last:.4f}, "
        f"{report.vae_seconds:.0f}s + {report.unet_seconds:.0f}s"
    )
    return target


__all__ = [
    "PretrainReport",
    "caption_states",
    "denoising_loss",
    "latent_scaling_factor",
    "load_pixels",
    "posterior_means",
    "pretrain_base_bundle",
    "pretrain_base_model",
    "reconstruction_mse",
    "scaled_latents",
    "train_unet",
    "train_vae",
]
