"""PIA and PIAN (Kong et al., ICLR 2024, "An Efficient Membership Inference Attack for the Diffusion Model by
Proximal Initialization").

PIA takes the model's own noise prediction at the clean latent, eps_0 = eps(z_0, 0, c), as the "proximal
initialisation" of the noise, builds the point of the forward path that this noise gives at t,
    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_0,
and asks the model for the noise at z_t. A model that has memorised z_0 is consistent along that path:
    statistic = -mean |eps(z_t, t, c) - eps_0|^p    (higher = member), p = ``--pia_norm`` (paper: 4).
PIAN first rescales eps_0 to the scale of Gaussian noise, eps_0 <- eps_0 * sqrt(2/pi) / mean|eps_0| per sample
(E|N(0,1)| = sqrt(2/pi)), and uses the rescaled eps_0 both in z_t and in the statistic.

One candidate statistic per t of ``--pia_timesteps``; the t is chosen on D_aux
(:class:`~library.eval.attacks.base.SelectedThresholdAttack`), every other t stays a labelled extra row.
Cost: 1 + len(pia_timesteps) queries per attack. eps_0 is asked as ``key="z0"`` at t = 0, the query SecMI's
inversion and SimA's t = 0 start from: PIA, PIAN, SecMI and SimA together compute it once per batch. The z_t of
PIA and PIAN differ (their eps_0 differ), so they have their own keys.

Our choices and the pitfalls of the public SD script that we avoid: alpha-bar from SD's *scaled-linear* training
schedule (the script builds it from linear betas), the conditional prediction only (the script leaves
classifier-free guidance 7.5 on), t chosen on D_aux (the script picks the best t on the evaluation data: that is
our oracle extra row); the p-th power is averaged over latent elements instead of summed (same ROC); the
arithmetic runs in float32 whatever the UNet's dtype.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from library.eval.attacks.base import AttackInputs, SelectedThresholdAttack
from library.eval.attacks.secmi import schedule_alpha_bar
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig

GAUSSIAN_MEAN_ABS = math.sqrt(2.0 / math.pi)  # E|N(0, 1)|


def gaussian_rescaled(eps: torch.Tensor) -> torch.Tensor:
    """PIAN's eps_0: each sample's ``eps`` scaled so that its mean absolute value is sqrt(2/pi)."""
    scale = eps.abs().flatten(1).mean(dim=1).clamp_min(torch.finfo(eps.dtype).tiny)
    return eps * (GAUSSIAN_MEAN_ABS / scale).view(-1, *([1] * (eps.ndim - 1)))


def proximal_latent(z0: torch.Tensor, eps0: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_0, the forward-path point of the proximal noise."""
    return abar.sqrt() * z0 + (1.0 - abar).sqrt() * eps0


class PIAProbe(Probe):
    """``distance`` [B, T]: mean |eps(z_t, t, c) - eps_0|^p over latent elements, one column per candidate t."""

    name = "pia"
    normalized: ClassVar[bool] = False

    def __init__(self, timesteps: Sequence[int], norm: int) -> None:
        self.timesteps = tuple(int(t) for t in timesteps)
        if not self.timesteps or any(not 0 < t < 1000 for t in self.timesteps):
            raise ValueError(f"PIA needs timesteps in 1..999, got {list(self.timesteps)}")
        self.norm = int(norm)

    def settings(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "norm": self.norm, "normalized": self.normalized}

    def queries_per_sample(self) -> float:
        return float(1 + len(self.timesteps))

    def eps0(self, ctx: QueryContext) -> torch.Tensor:
        """eps_0 = eps(z_0, 0, c) (float32), rescaled for PIAN; the query is shared (``key="z0"``)."""
        eps = ctx.predict(ctx.z0, 0, key="z0").float()
        return gaussian_rescaled(eps) if self.normalized else eps

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        eps0 = self.eps0(ctx)
        z0 = ctx.z0.float()
        columns = []
        for t in self.timesteps:
            zt = proximal_latent(z0, eps0, schedule_alpha_bar(ctx, t))
            eps = ctx.predict(zt, t, key=f"{self.name}-proximal").float()
            columns.append((eps - eps0).abs().pow(self.norm).flatten(1).mean(dim=1))
        return {"distance": torch.stack(columns, dim=1)}


class PIANProbe(PIAProbe):
    """PIAN's ``distance``: as :class:`PIAProbe` with eps_0 rescaled to Gaussian scale."""

    name = "pian"
    normalized = True


class PIAAttack(SelectedThresholdAttack):
    name = "pia"
    probe_class: ClassVar[type[PIAProbe]] = PIAProbe
    fit_direction = True  # see ThresholdAttack.fit_direction
    description = ("threshold on -mean|eps(z_t, t, c) - eps_0|^p with z_t on the forward path of "
                   "eps_0 = eps(z_0, 0, c); t chosen on D_aux")
    threat_model = "gray-box: noise predictions at chosen latents and timesteps + caption"
    citation = ("Kong et al., ICLR 2024, An Efficient Membership Inference Attack for the Diffusion Model by "
                "Proximal Initialization (PIA)")

    def __init__(self, timesteps: Sequence[int] = (50, 100, 200, 300), norm: int = 4) -> None:
        super().__init__()
        self.probe = self.probe_class(timesteps, norm)

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> PIAAttack:
        return cls(config.pia_timesteps, config.pia_norm)

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "guidance_scale": 1.0, "schedule": "scaled_linear (training)"}

    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        distances = inputs.target.probe(self.probe.name)["distance"]
        return {f"t={t}": 0.0 - distances[:, k] for k, t in enumerate(self.probe.timesteps)}


class PIANAttack(PIAAttack):
    name = "pian"
    probe_class = PIANProbe
    description = "PIA with eps_0 rescaled to Gaussian scale (mean|eps_0| = sqrt(2/pi) per sample); t chosen on D_aux"
    citation = PIAAttack.citation.replace("(PIA)", "(PIAN)")


__all__ = ["GAUSSIAN_MEAN_ABS", "PIAAttack", "PIANAttack", "PIANProbe", "PIAProbe", "gaussian_rescaled",
           "proximal_latent"]
