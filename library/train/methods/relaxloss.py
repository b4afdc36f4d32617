"""RelaxLoss (Chen et al., ICLR 2022), a reviewer's baseline (issue 7): a loss-level target for the members."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from library.errors import ConfigError
from library.train.methods.base import ForwardResult, MethodSetup, StepContext
from library.train.methods.plain import PlainLoRA

if TYPE_CHECKING:
    from library.train.config import TrainConfig


class RelaxLoss(PlainLoRA):
    """RelaxLoss (Chen et al., ICLR 2022, Alg. 1) for the denoising loss: descend L_ada while it is above the
    target alpha, ascend it while below, so the members' loss hovers at alpha instead of going to ~0.

    The classification-specific half of RelaxLoss (posterior flattening on alternate epochs) has no analogue
    for a regression loss and is left out. alpha is absolute (``--relaxloss_alpha``): set it near the base
    model's loss on held-out images (the trainer logs ``l_ada`` from step 1, when the LoRA is still the base).
    """

    name = "relaxloss"
    in_paper = False

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    @classmethod
    def build(cls, setup: MethodSetup) -> RelaxLoss:
        return cls(setup.config.relaxloss_alpha)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if not (config.relaxloss_alpha is not None and config.relaxloss_alpha > 0):
            raise ConfigError("RelaxLoss needs 'relaxloss_alpha' > 0 (the members' target loss; start near the base "
                              "model's loss, the l_ada logged at the first steps)")

    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        l_ada = result.losses.mean()  # the members' loss only: ascending a DreamBooth prior would unlearn the class
        ascending = bool(l_ada.item() < self.alpha)
        loss = -l_ada if ascending else l_ada
        if result.prior_loss is not None:
            loss = loss + result.prior_loss  # always descended
        return loss, {"l_ada": l_ada.item(), "loss": loss.item(), "relax_ascending": float(ascending)}

    def metadata(self) -> dict[str, str]:
        return {"smp_lora.relaxloss_alpha": str(self.alpha)}
