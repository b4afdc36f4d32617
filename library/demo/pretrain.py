"""Pre-train the tiny SD-shaped base model on a disjoint ``pretrain`` portion (offline demo).

A LoRA over-fitted on a *randomly initialised* UNet says little about membership leakage: the base predicts
noise no better than zero, so everything the LoRA learns is "memorisation". The demo therefore starts from a
base that already models digits, trained here on images that are in none of the four membership sets:

1. **VAE** (``AutoencoderKL`` of :mod:`library.demo.tiny`) trained as an autoencoder on 32 px images
   (:mod:`library.demo.pretrain_vae`);
2. **scaling factor**: ``1 / std`` of its latents, measured and stored in the VAE config, as SD's 0.18215 was
   (:func:`library.demo.pretrain_vae.latent_scaling_factor`);
3. **UNet** (all parameters) **and text encoder**: SD's epsilon-prediction loss on the scaled latents, with
   caption dropout for classifier-free guidance (:mod:`library.demo.pretrain_unet`, which says why the text
   encoder is trained too).

The shared loop pieces (seeded batches, learning-rate schedule, progress lines) are in
:mod:`library.demo.pretrain_common`. Everything random (init, batches, noise, timesteps, caption dropout, VAE
posterior samples) comes from seeded generators, so a given seed, data and thread count give the same model. The result is written with
:func:`library.demo.tiny.save_tiny_folder` (a ``StableDiffusionPipeline`` folder that
:func:`library.sd.loading.load_sd_model` loads), plus ``pretrain.json`` describing the run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from library.demo.pretrain_common import (
    IMAGE_SIZE,
    Captioned,
    load_pixels,
    window_means,
)
from library.demo.pretrain_unet import caption_states, denoising_loss, train_unet
from library.demo.pretrain_vae import (
    latent_scaling_factor,
    posterior_means,
    reconstruction_mse,
    scaled_latents,
    train_vae,
)
from library.errors import ConfigError, DataError, ModelError
from library.runtime import echo, torch_threads
from library.sd.bundle import ModelBundle

PRETRAIN_RECORD = "pretrain.json"

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


# ------------------------------------------------------------------------------------------------ driver


def _check_budget(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _check_settings(images: Sequence[Captioned], *, vae_steps: int, unet_steps: int, batch_size: int,
                    vae_batch_size: int, lr: float, vae_lr: float, caption_dropout: float) -> list[str]:
    """One ConfigError / DataError line for a bad setting, before anything is trained; returns the captions."""
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
    return captions


def _vae_phase(bundle: ModelBundle, pixels: torch.Tensor, report: PretrainReport, generator: torch.Generator,
               log: Callable[[str], object]) -> torch.Tensor:
    """Steps 1-2: train the VAE, store its measured scaling factor; return the scaled latents the UNet sees."""
    t0 = time.perf_counter()
    vae_losses = train_vae(
        bundle.vae, pixels, steps=report.vae_steps, batch_size=report.vae_batch_size, lr=report.vae_lr,
        kl_weight=report.kl_weight, generator=generator, log=log,
    )
    report.vae_seconds = time.perf_counter() - t0
    report.vae_recon_mse_first, report.vae_recon_mse_last = window_means(vae_losses)

    means = posterior_means(bundle.vae, pixels)
    factor, report.latent_mean, report.latent_std_before_scaling = latent_scaling_factor(means)
    bundle.vae.register_to_config(scaling_factor=factor)
    report.scaling_factor = factor
    log(
        f"[pretrain] latents: mean {report.latent_mean:.3f}, std {report.latent_std_before_scaling:.3f} "
        f"-> scaling_factor {factor} (SD's VAE: 0.18215)"
    )
    return means * factor


def _unet_phase(bundle: ModelBundle, latents: torch.Tensor, captions: list[str], report: PretrainReport,
                generator: torch.Generator, log: Callable[[str], object]) -> None:
    """Step 3: train the UNet (and the text encoder unless frozen) on the scaled latents."""
    t0 = time.perf_counter()
    unet_losses = train_unet(
        bundle, latents, captions, steps=report.unet_steps, batch_size=report.batch_size, lr=report.unet_lr,
        caption_dropout=report.caption_dropout, generator=generator, train_text_encoder=report.train_text_encoder,
        log=log,
    )
    report.unet_seconds = time.perf_counter() - t0
    report.unet_loss_first, report.unet_loss_last = window_means(unet_losses)


def pretrain_base_bundle(
    images: Sequence[Captioned],
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

    captions = _check_settings(images, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
                               vae_batch_size=vae_batch_size, lr=lr, vae_lr=vae_lr, caption_dropout=caption_dropout)
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
        latents = _vae_phase(bundle, pixels, report, vae_gen, log)
        _unet_phase(bundle, latents, captions, report, unet_gen, log)
        report.total_seconds = time.perf_counter() - started
    bundle.source = f"pretrained-tiny:seed={seed}"
    return bundle, report


def pretrain_base_model(
    images: Sequence[Captioned],
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    log: Callable[[str], object] = echo,
    **settings: Any,
) -> Path:
    """Pre-train the tiny stack on ``images`` and save it as a diffusers folder at ``output_dir``.

    ``settings`` are :func:`pretrain_base_bundle`'s keyword arguments (seed, step counts, learning rates, ...).

    The folder loads with :func:`library.sd.loading.load_sd_model`; ``output_dir/pretrain.json`` records the
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
