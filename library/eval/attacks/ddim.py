"""Deterministic DDIM steps on SD's training schedule, shared by the attacks that walk the diffusion path
(SecMI's inversion and step back, the black-box generations, the reconstruction attack's denoising).

A DDIM step with eta = 0 (Song et al. 2021, Eq. 12) from timestep s to s' given the noise prediction eps at s:
    x0_hat = (z_s - sqrt(1 - abar_s) * eps) / sqrt(abar_s)
    z_s'   = sqrt(abar_s') * x0_hat + sqrt(1 - abar_s') * eps
The same formula runs the path backwards (s' > s: deterministic inversion, as SecMI does). ``abar`` of the
timestep -1 is 1 (the clean latent), as diffusers' ``set_alpha_to_one=True`` for the final step.
"""

from __future__ import annotations

import torch


def predicted_x0(z: torch.Tensor, eps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by noise prediction ``eps`` at a timestep with alpha-bar ``abar``."""
    return (z - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def ddim_step(z: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from alpha-bar ``abar_from`` to ``abar_to`` (either direction)."""
    return abar_to.sqrt() * predicted_x0(z, eps, abar_from) + (1.0 - abar_to).sqrt() * eps


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Decreasing timesteps of a ``num_steps``-step DDIM sampler, diffusers' "leading" spacing (SD v1.x's
    scheduler config: steps_offset 1); img2img runs the last of them (:func:`.reconstruction_timesteps`)."""
    ratio = num_train_timesteps // num_steps
    return [i * ratio + 1 for i in range(num_steps)][::-1]


__all__ = ["ddim_step", "ddim_timesteps", "predicted_x0"]
