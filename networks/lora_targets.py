"""Which layers of an SD v1.x UNet / CLIP text encoder a LoRA adapts, found by module path and layer type.

The targets are sd-scripts' (``networks/lora.py``): every Linear and 1x1 conv of the UNet's Transformer2D
blocks, the CLIP attention q/k/v/out and MLP fc1/fc2 layers, and with ``conv_dim`` ("LoCon") also the
ResNet blocks and down/up-samplers. Matching uses module paths plus layer types rather than class names,
which change between diffusers / transformers versions.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from networks.lora_format import lora_name
from networks.lora_modules import LORA_CHILD_NAME, LoRAModule

__all__ = ["find_target_layers", "is_conv3x3", "layers_by_name"]

_UNET_CONTAINER = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.")
# sd-scripts' UNET_TARGET_REPLACE_MODULE_CONV2D_3X3: ResnetBlock2D, Downsample2D, Upsample2D.
_UNET_CONV_CONTAINER = re.compile(
    r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.(resnets|downsamplers|upsamplers)\.\d+\."
)
_TE_TARGET = re.compile(
    r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"
)


def _is_target_layer(module: nn.Module, any_kernel: bool = False) -> bool:
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.dilation != (1, 1):
        return False
    return any_kernel or tuple(module.kernel_size) == (1, 1)


def is_conv3x3(layer: nn.Module) -> bool:
    """A conv that gets ``conv_dim`` rather than ``network_dim`` (anything but 1x1, as in sd-scripts)."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)


def _unwrap(model: Any) -> nn.Module:
    # accelerate / DDP / torch.compile wrap the model; the layer names live on the inner module.
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


def find_target_layers(
    model: nn.Module | None, part: str, conv: bool = False
) -> dict[str, tuple[str, nn.Module]]:
    """``{lora_name: (module_path, layer)}`` for every layer a LoRA targets in ``model``.

    UNet: every Linear and 1x1 Conv2d inside the ``Transformer2DModel`` blocks (``*.attentions.<i>``: attn1/attn2
    q/k/v/out, ff, proj_in/out, mid block included); with ``conv`` also every Linear and conv of the ResNet
    blocks and down/up-samplers (sd-scripts' ``conv_dim`` targets). Text encoder: attention q/k/v/out and MLP
    fc1/fc2. Matching uses module paths plus layer types rather than class names, which change between versions.
    """
    if model is None:
        return {}
    model = _unwrap(model)
    targets: dict[str, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        # LoRA layers of an applied network hang inside the adapted layers: never adapt those.
        if f".{LORA_CHILD_NAME}." in f".{path}." or isinstance(module, LoRAModule):
            continue
        if part == "unet":
            in_conv_block = conv and _UNET_CONV_CONTAINER.match(path) is not None
            if not (_UNET_CONTAINER.match(path) or in_conv_block):
                continue
            if not _is_target_layer(module, any_kernel=in_conv_block):
                continue
        elif not _is_target_layer(module):
            continue
        if part == "text_encoder" and not _TE_TARGET.match(path):
            continue
        targets[lora_name(part, path)] = (path, module)
    return targets


def layers_by_name(text_encoder: nn.Module | None, unet: nn.Module | None) -> dict[str, nn.Module]:
    """``{lora_name: layer}`` for every layer any LoRA of these models could adapt (conv targets included)."""
    layers = {n: m for n, (_, m) in find_target_layers(text_encoder, "text_encoder").items()}
    layers.update({n: m for n, (_, m) in find_target_layers(unet, "unet", conv=True).items()})
    return layers
