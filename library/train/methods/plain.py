"""Plain LoRA: minimise L_ada (Eq. 3). The baseline every privacy method is measured against."""

from __future__ import annotations

import torch

from library.train.methods.base import ForwardResult, StepContext, TrainingMethod


class PlainLoRA(TrainingMethod):
    """Plain LoRA: the loop with no privacy term."""

    name = "lora"
    in_paper = True

    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        l_ada = result.adaptation_loss()  # Eq. 3
        return l_ada, {"l_ada": l_ada.item()}
