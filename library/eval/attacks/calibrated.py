"""Reference-calibrated loss attack: the fine-tuned model's loss minus the base model's, with the same noise.

A sample that is simply easy to denoise has a low loss under both models; subtracting the base model's loss
(difficulty calibration, Watson et al. 2022; offline LiRA / RMIA with one reference model) leaves what the LoRA
learnt about that sample. Because the feature engine gives both models the very same (t, eps), the difference
has no query noise of its own. Score = -(L_lora - L_base), per timestep and averaged ("avg", the headline).
The base model calibrated against itself scores exactly 0 for every sample.
"""

from __future__ import annotations

import numpy as np

from library.eval.attacks.base import (
    AttackInputs,
    LossFeatureAttack,
    per_timestep_statistics,
)


class CalibratedLossAttack(LossFeatureAttack):
    name = "calibrated"
    needs_reference = True
    models_queried = 2
    description = "threshold on -(L_lora - L_base) with common (t, eps), per t and averaged"
    threat_model = 'gray-box + reference model: losses of the fine-tune and of its public base model, shared noise'
    citation = 'Watson et al. 2022, On the importance of difficulty calibration in membership inference attacks'

    def statistics(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        self._check(inputs)
        assert inputs.reference is not None
        diff = inputs.target.losses - inputs.reference.losses
        return per_timestep_statistics(diff, inputs.target.timesteps)
