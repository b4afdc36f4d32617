"""Pre-training the demo base model's VAE, and measuring its latent scale (steps 1 and 2 of
:mod:`library.demo.pretrain`).

1. **VAE** (``AutoencoderKL`` of :mod:`library.demo.tiny`): trained as an autoencoder on 32 px images, loss =
   reconstruction MSE on [-1, 1] pixels + ``kl_weight`` x KL(q(z|x) || N(0, I)) (mean over the batch of the
   per-image KL sum). The KL weight is tiny (1e-6, the order SD's VAE used) so latents carry the image; it only
   keeps the posterior from drifting to huge scales.
2. **Scaling factor.** SD multiplies latents by ``vae.config.scaling_factor`` (0.18215 for SD's VAE, which is
   1 / std of its latents) so the UNet sees roughly unit-variance latents, matching the unit-variance noise of
   the DDPM schedule. Our freshly trained VAE has its own latent scale, so after training we measure the std of
   the posterior means over the pretrain images and store ``1 / std`` (rounded to 5 significant digits) in the
   VAE config. Every loader (``LatentCache``, pipelines) reads it from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from library.demo.pretrain_common import Progress, index_batches, warmup_cosine_lr
from library.errors import ModelError
from library.runtime import echo


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
    progress = Progress("vae", steps, log)
    for step, index in enumerate(index_batches(len(pixels), batch_size, steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr)
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


@torch.no_grad()
def scaled_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the UNet sees: posterior means times the VAE's configured scaling factor."""
    return posterior_means(vae, pixels) * float(vae.config.scaling_factor)


__all__ = ["latent_scaling_factor", "posterior_means", "reconstruction_mse", "scaled_latents", "train_vae"]
