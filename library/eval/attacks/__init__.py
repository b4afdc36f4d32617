"""Membership-inference attacks, one module each, behind the :class:`~library.eval.attacks.base.Attack` interface.

:data:`ATTACKS` maps a name (``--attacks``) to the class; add a new attack by writing its module and one line here.
"""

from __future__ import annotations

from library.eval.attacks.base import (
    Attack,
    AttackInputs,
    FeatureSet,
    ScoreSet,
    ThresholdAttack,
)
from library.eval.attacks.calibrated import CalibratedLossAttack
from library.eval.attacks.loss_threshold import LossThresholdAttack
from library.eval.attacks.paper_mlp import PaperMLPAttack

ATTACKS: dict[str, type[Attack]] = {
    PaperMLPAttack.name: PaperMLPAttack,
    LossThresholdAttack.name: LossThresholdAttack,
    CalibratedLossAttack.name: CalibratedLossAttack,
}

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackInputs",
    "CalibratedLossAttack",
    "FeatureSet",
    "LossThresholdAttack",
    "PaperMLPAttack",
    "ScoreSet",
    "ThresholdAttack",
]
