"""The diffusion forward used by training, the proxy attacker and evaluation alike.

One function, :func:`denoising_errors`, noises clean latents at given timesteps, runs the UNet once on
the whole batch and returns the element-wise squared error of the noise prediction. Everything the
paper needs is derived from it:

* Eq. 1/2: ``l_ada(x, y) = ||eps - f(z_t, t, tau(y))||^2`` — :func:`per_sample_loss` (mean over C, H, W,
  as SD trainers do; the mean only rescales the paper's squared norm by 1/(C*H*W)).
* Eq. 3: ``L_ada`` = the batch mean of the per-sample losses.
* The proxy attacker's input (upstream): the flattened error map itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NoiseDraw:
    """The random part of one loss evaluation: timesteps (B,) and Gaussian noise shaped like the latents."""

    timesteps: torch.Tensor
    noise: torch.Tensor


def draw_noise(
    latents: torch.Tensor,
    generator: torch.Generator | None,
    min_timestep: int = 0,
    max_timestep: int = 1000,
) -> NoiseDraw:
    """Sample t ~ U{min, ..., max-1} and eps ~ N(0, I) from ``generator`` (so runs are reproducible)."""
    batch = latents.shape[0]
    timesteps = torch.randint(min_timestep, max_timestep, (batch,), generator=generator, device="cpu")
    noise = torch.randn(latents.shape, generator=generator, device="cpu", dtype=torch.float32)
    return NoiseDraw(timesteps.to(latents.device), noise.to(device=latents.device, dtype=latents.dtype))


def fixed_timestep_noise(
    latents: torch.Tensor, timesteps: list[int], generator: torch.Generator | None
) -> NoiseDraw:
    """Every sample at every timestep in ``timesteps``: a batch of ``B * K`` draws, sample-major.

    Row ``i * K + k`` is sample ``i`` at ``timesteps[k]``. Used for multi-timestep loss features.
    """
    batch, k = latents.shape[0], len(timesteps)
    t = torch.tensor(timesteps, dtype=torch.long).repeat(batch)
    noise = torch.randn((batch * k, *latents.shape[1:]), generator=generator, device="cpu", dtype=torch.float32)
    return NoiseDraw(t.to(latents.device), noise.to(device=latents.device, dtype=latents.dtype))


def denoising_errors(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    draw: NoiseDraw,
) -> torch.Tensor:
    """Element-wise squared error ``(eps_hat - eps)^2`` in fp32, shape like ``latents``.

    ``latents`` may be repeated to match ``draw`` (``B * K`` rows for K timesteps per sample); the
    conditioning is repeated the same way. Gradients flow if the caller has grad enabled.
    """
    repeats = draw.timesteps.shape[0] // latents.shape[0]
    if repeats > 1:
        latents = latents.repeat_interleave(repeats, dim=0)
        encoder_hidden_states = encoder_hidden_states.repeat_interleave(repeats, dim=0)
    noisy = noise_scheduler.add_noise(latents, draw.noise, draw.timesteps)
    prediction = unet(noisy, draw.timesteps, encoder_hidden_states=encoder_hidden_states).sample
    # SD v1.x is epsilon-prediction: the target is the noise itself. fp32 for the loss as in sd-scripts.
    return (prediction.float() - draw.noise.float()) ** 2


def per_sample_loss(errors: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the per-sample adaptation loss, the mean squared error over (C, H, W) -> shape (B,).

    Eq. 1 writes a squared L2 norm (a sum); the mean, as the authors' code and kohya take it, is C*H*W times
    smaller, which is the scale the paper's lambda values weigh G against (docs/paper-fidelity.md)."""
    return errors.flatten(1).mean(dim=1)
