"""SimA (Rao et al., TMLR 2025): the norm of the noise the model predicts for the *clean* latent.

A model that has memorised x_0 sees no noise in it: at a small timestep t its prediction eps(z_0, t, c) for the
clean latent is close to zero for members and larger for non-members. One UNet query per candidate t; the t
(and so the statistic) is chosen on D_aux (:class:`~library.eval.attacks.base.SelectedThresholdAttack`).
The query at t = 0 is eps(z_0, 0, c), the very query PIA starts from: the probe engine computes it once.

Our choices: the squared L2 norm averaged over latent elements (``--sima_norm 2``; the public code sums the 4th
power, ``--sima_norm 4``, which weighs the largest elements more), five candidate timesteps ``--sima_timesteps``
chosen on D_aux (the public code evaluates t = 0, 10, ..., 190 and reports the best on the evaluation data).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from library.eval.attacks.base import AttackInputs, SelectedThresholdAttack
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig


class SimAProbe(Probe):
    """``norm`` [B, T]: mean |eps(z_0, t, c)|^p over latent elements, one column per candidate t."""

    name = "sima"

    def __init__(self, timesteps: Sequence[int], norm: int) -> None:
        self.timesteps = tuple(int(t) for t in timesteps)
        self.norm = int(norm)

    def settings(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "norm": self.norm}

    def queries_per_sample(self) -> float:
        return float(len(self.timesteps))

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        columns = []
        for t in self.timesteps:
            eps = ctx.predict(ctx.z0, t, key="z0")
            columns.append(eps.float().abs().pow(self.norm).flatten(1).mean(dim=1))
        return {"norm": torch.stack(columns, dim=1)}


class SimAAttack(SelectedThresholdAttack):
    name = "sima"
    description = "threshold on -mean|eps(z_0, t, c)|^p at the clean latent; t chosen on D_aux"
    threat_model = "gray-box: noise predictions for the clean latent + caption"
    citation = "Rao et al., TMLR 2025, SimA: a simple baseline for membership inference on diffusion models"

    def __init__(self, timesteps: Sequence[int] = (0, 10, 20, 50, 100), norm: int = 2) -> None:
        super().__init__()
        self.probe = SimAProbe(timesteps, norm)

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> SimAAttack:
        return cls(config.sima_timesteps, config.sima_norm)

    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        norms = inputs.target.probe(self.probe.name)["norm"]
        return {f"t={t}": 0.0 - norms[:, k] for k, t in enumerate(self.probe.timesteps)}
