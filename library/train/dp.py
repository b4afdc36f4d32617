"""DP-SGD on the LoRA parameters (Abadi et al., CCS 2016): the formal baseline of issue 7.

Per step, for the batch B of D_tr samples:

1. per-sample gradients g_i of every LoRA parameter (Opacus' ``GradSampleModule`` hooks on the LoRA's
   Linear / Conv2d layers: one backward pass, not B of them);
2. clip each to L2 norm C over *all* LoRA parameters: g_i * min(1, C / ||g_i||);
3. add Gaussian noise N(0, (sigma C)^2 I) to their sum and divide by |B|;
4. the optimiser (AdamW) steps on that gradient (any later processing, e.g. the trainer's global clip, is
   post-processing and keeps the guarantee).

The privacy spent is tracked by Opacus' RDP accountant with sampling rate q = |B| / |D_tr| for every step,
and reported as (epsilon, delta). Caveat, stated in the LoRA metadata too: the accountant assumes Poisson
sampling, while the loop draws shuffled fixed-size batches (as most DP-SGD code does in practice); the
reported epsilon is the usual approximation, not a proof for this sampler. The Gaussian noise comes from a
seeded ``torch.Generator`` (reproducible, resumable), not a cryptographically secure one: fine for research,
not for a deployment that must withstand an attacker who knows the seed.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from torch import nn

from library.errors import ConfigError


def _require_opacus() -> Any:
    try:
        import opacus  # noqa: PLC0415 - optional until DP is asked for
    except ImportError:
        raise ConfigError("DP-SGD (train_dp_lora.py) needs opacus: pip install -r requirements.txt") from None
    return opacus


class DPSGD:
    """Per-sample clipping + Gaussian noise for ``params`` of ``network``, and the privacy accountant."""

    def __init__(self, network: nn.Module, params: list[nn.Parameter], *, noise_multiplier: float,
                 clip_norm: float, sample_rate: float, delta: float, seed: int) -> None:
        opacus = _require_opacus()
        from opacus.accountants import RDPAccountant  # noqa: PLC0415

        if noise_multiplier < 0 or clip_norm <= 0 or not 0 < sample_rate <= 1 or not 0 < delta < 1:
            raise ConfigError(f"DP-SGD needs dp_noise_multiplier >= 0, dp_clip_norm > 0, 0 < dp_delta < 1 and a "
                              f"sample rate (train_batch_size / members) in (0, 1]; got {noise_multiplier}, {clip_norm}, "
                              f"{delta}, {sample_rate}")
        # The LoRA layers nearest the input see activations that need no gradient; torch then warns once per
        # backward hook that it fires on outputs only, which is exactly what per-sample gradients need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        # strict=False: the LoRA modules only *call* their Linear / Conv2d children; Opacus hooks those.
        self.module = opacus.GradSampleModule(network, loss_reduction="mean", strict=False)
        self.params = params
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.accountant = RDPAccountant()
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def privatize(self, batch_size: int) -> dict[str, float]:
        """Replace each parameter's ``grad`` by the clipped, noised mean of its per-sample gradients."""
        samples = [p.grad_sample for p in self.params]
        if any(s is None for s in samples):
            raise RuntimeError("DP-SGD: a LoRA parameter got no per-sample gradient (was the backward run?)")
        if any(s.shape[0] != batch_size for s in samples):
            raise RuntimeError(f"DP-SGD: per-sample gradients of {samples[0].shape[0]} samples for a batch of "
                               f"{batch_size} (gradient accumulation is not supported with DP)")
        norms = torch.stack([s.flatten(1).float().norm(dim=1) for s in samples]).norm(dim=0)  # (B,) over all params
        factors = (self.clip_norm / (norms + 1e-6)).clamp(max=1.0)
        std = self.noise_multiplier * self.clip_norm
        for p, s in zip(self.params, samples):
            clipped_sum = torch.einsum("b,b...->...", factors.to(s.dtype), s)
            noise = torch.normal(0.0, std, p.shape, generator=self.generator).to(p.device, p.dtype)
            p.grad = (clipped_sum + noise) / batch_size
            p.grad_sample = None
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return {"dp_clipped_fraction": float((norms > self.clip_norm).float().mean()),
                "dp_median_grad_norm": float(norms.median())}

    def epsilon(self) -> float:
        """epsilon spent so far at ``delta`` (inf with zero noise; 0 before the first step).

        The RDP-to-(epsilon, delta) conversion can go below 0 for large noise and a large delta; epsilon is never
        negative, so that is 0."""
        if not self.accountant.history:
            return 0.0
        if self.noise_multiplier == 0:
            return float("inf")
        return max(0.0, float(self.accountant.get_epsilon(self.delta)))

    def state_dict(self) -> dict[str, Any]:
        return {"accountant_history": json.dumps(self.accountant.history), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.history = [tuple(entry) for entry in json.loads(state["accountant_history"])]
        self.generator.set_state(state["generator"])


__all__ = ["DPSGD"]
