"""Loss-threshold attack (Matsumoto et al. 2023; Hu & Pang 2023): members have a lower denoising loss.

Score = -loss, at each fixed timestep (mean over the M noise draws) and averaged over all K timesteps x M
draws ("avg", the headline: averaging removes most of the noise of one (t, eps) query).
"""

from __future__ import annotations

import numpy as np

from library.eval.attacks.base import (
    AttackInputs,
    LossFeatureAttack,
    per_timestep_statistics,
)


class LossThresholdAttack(LossFeatureAttack):
    name = "loss"
    description = "threshold on -L(x, t, eps) of the attacked model, per t and averaged over t and draws"
    threat_model = 'gray-box: per-sample denoising loss at fixed t (noise predictions + caption)'
    citation = 'Matsumoto et al. 2023, Membership inference attacks against diffusion models; Hu & Pang 2023'

    def statistics(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        return per_timestep_statistics(inputs.target.losses, inputs.target.timesteps)
