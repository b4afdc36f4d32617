"""Membership features: what the proxy attacker h_w (and the paper's evaluation attacker h') sees.

The paper feeds h_w "the adaptation loss" of a sample (Eq. 5); the upstream code feeds the full
per-element squared-error map of one random (t, eps). Three choices, selected by ``--attacker_features``:

* ``error_map``    — the flattened (eps_hat - eps)^2 map, C*H*W features (upstream; size from the latent shape).
* ``loss``         — the per-sample scalar loss of Eq. 1 (one feature).
* ``multi_t_loss`` — the per-sample losses at fixed timesteps (K features); membership signal lives at
  small t, so this gives the proxy a much sharper view than one random t.
"""

from __future__ import annotations

from typing import Sequence

import torch

from library.diffusion import NoiseDraw, denoising_errors, draw_noise, fixed_timestep_noise, per_sample_loss

FEATURE_KINDS = ("error_map", "loss", "multi_t_loss")


def feature_dim(kind: str, latent_shape: Sequence[int], timesteps: Sequence[int]) -> int:
    """Input size of the attacker for ``kind`` and a latent of shape (C, H, W)."""
    if kind == "error_map":
        channels, height, width = latent_shape
        return int(channels * height * width)
    if kind == "loss":
        return 1
    if kind == "multi_t_loss":
        return len(timesteps)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def features_from_errors(errors: torch.Tensor, kind: str, batch_size: int) -> torch.Tensor:
    """Turn error maps from :func:`denoising_errors` into a (B, F) feature matrix."""
    if kind == "error_map":
        return errors.flatten(1)
    losses = per_sample_loss(errors)
    if kind == "loss":
        return losses[:, None]
    if kind == "multi_t_loss":
        return losses.view(batch_size, -1)
    raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def membership_features(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    kind: str,
    generator: torch.Generator | None,
    *,
    timesteps: Sequence[int] = (),
    min_timestep: int = 0,
    max_timestep: int = 1000,
) -> torch.Tensor:
    """Features of ``kind`` for a batch, from one batched UNet pass (B rows, or B*K for multi_t_loss)."""
    if kind == "multi_t_loss":
        draw: NoiseDraw = fixed_timestep_noise(latents, list(timesteps), generator)
    else:
        draw = draw_noise(latents, generator, min_timestep, max_timestep)
    errors = denoising_errors(unet, noise_scheduler, latents, encoder_hidden_states, draw)
    return features_from_errors(errors, kind, latents.shape[0])
