"""The LoRA layer: one low-rank update patched into one Linear or Conv2d of the UNet or text encoder.

The paper's LoRA (Sec. 2, "Low-Rank Adaptation") adapts a frozen weight ``θ̄ ∈ R^{d×k}`` to ``θ̄ + BA`` with
``B ∈ R^{d×r}``, ``A ∈ R^{r×k}``; here ``A`` is ``lora_down`` and ``B`` is ``lora_up``, and the layer computes
``W x + up(down(x)) * multiplier * alpha / r`` (kohya's scaling), so ``multiplier = 0`` is the base model.

:meth:`LoRAModule.apply_to` registers the module as a *child* of the layer it adapts (under
:data:`LORA_CHILD_NAME`) as well as patching that layer's ``forward``; see :mod:`networks.lora` for why.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from library.errors import ConfigError

__all__ = ["LORA_CHILD_NAME", "LoRAModule"]

LORA_CHILD_NAME = "lora"
"""Attribute under which an applied LoRA module hangs off the layer it adapts."""


class LoRAModule(nn.Module):
    """Low-rank update ``up(down(x)) * multiplier * alpha / rank`` for one Linear or Conv2d.

    For a conv, ``down`` has the layer's kernel, stride and padding and ``up`` is 1x1 (sd-scripts' layout).

    ``alpha`` is a buffer so that it travels in the state dict as ``<lora_name>.alpha`` (kohya format).
    """

    def __init__(
        self,
        lora_name: str,
        part: str,
        module_path: str,
        org_module: nn.Module,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank} for {lora_name}")
        self.lora_name = lora_name
        self.part = part  # "unet" or "text_encoder"
        self.module_path = module_path
        self.rank = int(rank)
        self.multiplier = float(multiplier)
        self.dropout = dropout
        self.is_conv = isinstance(org_module, nn.Conv2d)
        self.kernel_size: tuple[int, ...] | None = tuple(org_module.kernel_size) if self.is_conv else None
        device = org_module.weight.device
        if self.is_conv:
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            self.lora_down = nn.Conv2d(in_dim, self.rank, org_module.kernel_size, org_module.stride,
                                       org_module.padding, bias=False, device=device)
            self.lora_up = nn.Conv2d(self.rank, out_dim, 1, bias=False, device=device)
        else:
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = nn.Linear(in_dim, self.rank, bias=False, device=device)
            self.lora_up = nn.Linear(self.rank, out_dim, bias=False, device=device)
        self.in_dim, self.out_dim = in_dim, out_dim
        # kohya / PEFT init: down like nn.Linear's default, up zero, so the network starts as the identity.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(0.0, dtype=torch.float32, device=device))
        # scale: a Python float, not a tensor read per forward (reading the buffer would sync the GPU every call)
        self.set_alpha(0.0 if alpha is None else alpha)
        # Held in a tuple so nn.Module does not register the adapted layer as our child (that would make
        # the module tree cyclic once we are registered as *its* child).
        self._target: tuple[nn.Module, ...] = ()
        self.org_forward: Any = None

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Replacement forward of the adapted layer: the layer's own output plus the low-rank update."""
        out = self.org_forward(x, *args, **kwargs)
        if self.multiplier == 0.0:
            return out  # "LoRA off" costs nothing (used by MIA evaluation of the base model)
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        h = self.lora_up(h)
        return out + (h * (self.multiplier * self.scale)).to(out.dtype)

    # -- patching ----------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return bool(self._target)

    def is_applied_to(self, layer: nn.Module) -> bool:
        """Whether :meth:`apply_to` patched ``layer`` (and :meth:`restore` has not undone it since)."""
        return self.applied and self._target[0] is layer

    def apply_to(self, org_module: nn.Module) -> None:
        """Patch ``org_module`` so that its forward runs the LoRA, and hang this module off it."""
        if self.applied:
            raise RuntimeError(f"LoRA {self.lora_name} is already applied; call restore() first")
        if LORA_CHILD_NAME in org_module._modules or "forward" in org_module.__dict__:
            raise RuntimeError(
                f"layer {self.module_path} already carries a LoRA or a patched forward; "
                "restore() the other network first"
            )
        self.org_forward = org_module.forward
        org_module.add_module(LORA_CHILD_NAME, self)
        org_module.forward = self.forward  # instance attribute shadows the class method
        self._target = (org_module,)

    def restore(self) -> None:
        """Undo :meth:`apply_to`: the layer gets its own forward back and loses the LoRA child."""
        if not self.applied:
            return
        org_module = self._target[0]
        if org_module.__dict__.get("forward") is not None:
            del org_module.__dict__["forward"]
        if org_module._modules.get(LORA_CHILD_NAME) is self:
            del org_module._modules[LORA_CHILD_NAME]
        self._target = ()
        self.org_forward = None

    # -- weights -----------------------------------------------------------------------------------
    def delta_weight(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """``alpha / rank * up @ down`` shaped like the adapted layer's weight (multiplier not applied), computed in
        ``dtype`` on ``device`` (default: the LoRA's)."""
        down = self.lora_down.weight.to(device=device, dtype=dtype).flatten(1)  # [r, in * kh * kw]
        up = self.lora_up.weight.to(device=device, dtype=dtype).flatten(1)  # [out, r]
        delta = (up @ down) * self.scale
        return delta.reshape(self.out_dim, self.in_dim, *self.kernel_size) if self.is_conv else delta

    def set_alpha(self, alpha: float) -> None:
        """``alpha`` 0 means alpha = rank (scale 1), as in the constructor, kohya and AUTOMATIC1111: a file
        with ``.alpha`` 0 is a full-strength LoRA, not the base model."""
        alpha = float(alpha) or float(self.rank)
        self.alpha.fill_(alpha)
        self.scale = alpha / self.rank

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Keep the cached Python scale in step with a loaded alpha, whichever load path was used.
        self.set_alpha(float(self.alpha))
