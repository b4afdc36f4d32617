"""diffusers -> LDM (CompVis / A1111 single-file) state-dict key conversion.

Pure renaming, kept apart from loading as diffusers keeps ``single_file_utils`` apart from its loaders: each
function maps a diffusers network's state dict to the names SD v1.x's original checkpoints use
(``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``). The
reverse direction is diffusers' own ``convert_ldm_*_checkpoint``; the tests check that it maps these names back
exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from library.errors import ModelError
from library.sd.bundle import ModelBundle

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{_UNET_RESNET_TO_LDM.get(module, module)}.{param}"


def _unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers UNet2DConditionModel state-dict key.

    LDM numbers blocks sequentially: ``input_blocks.0`` is conv_in, then every down-block contributes
    ``layers_per_block`` (resnet[, attention]) entries plus one downsampler entry; up-blocks contribute
    ``layers_per_block + 1`` entries, the last of which also holds the upsampler (after the attention if any).
    """
    per_down = int(config["layers_per_block"]) + 1
    for diffusers_name, ldm_name in _UNET_TOP_LEVEL_TO_LDM.items():
        if key.startswith(diffusers_name + "."):
            return ldm_name + key[len(diffusers_name) :]
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = 1 + block * per_down + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        index = 1 + int(match[1]) * per_down + per_down - 1
        return f"input_blocks.{index}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_resnet(match[2])}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per_down + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        index = block * per_down + per_down - 1
        slot = 2 if str(config["up_block_types"][block]).startswith("CrossAttn") else 1
        return f"output_blocks.{index}.{slot}.conv.{match[2]}"
    raise ModelError(f"cannot write UNet tensor {key!r} in the SD v1.x single-file layout (not an SD v1.x UNet?)")


def _vae_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of one diffusers AutoencoderKL state-dict key.

    LDM's decoder numbers its up-blocks from the lowest resolution, the reverse of diffusers' order.
    """
    num_up = len(config["up_block_types"])
    for side in ("encoder", "decoder"):
        if key in (f"{side}.conv_norm_out.weight", f"{side}.conv_norm_out.bias"):
            return key.replace("conv_norm_out", "norm_out")
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = num_up - 1 - int(match[1])
        return f"decoder.up.{block}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        module = _VAE_ATTENTION_TO_LDM.get(match[2])
        if module is not None:
            return f"{match[1]}.mid.attn_1.{module}.{match[3]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", key) or re.fullmatch(
        r"(post_)?quant_conv\.(weight|bias)", key
    ):
        return key
    raise ModelError(f"cannot write VAE tensor {key!r} in the SD v1.x single-file layout (not an SD v1.x VAE?)")


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    """A diffusers UNet's weights under their LDM names (``model.diffusion_model.*``)."""
    config = dict(unet.config)
    return {LDM_UNET_PREFIX + _unet_key_to_ldm(key, config): t for key, t in unet.state_dict().items()}


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under their LDM names (``first_stage_model.*``).

    The mid-block attention's q/k/v/proj_out weights become 1x1 conv kernels ``(C, C, 1, 1)`` as in LDM,
    where diffusers keeps them as Linear ``(C, C)`` matrices.
    """
    config = dict(vae.config)
    state = {}
    for key, tensor in vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(key, config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[LDM_VAE_PREFIX + ldm_key] = tensor
    return state


def text_encoder_to_ldm(text_encoder: Any) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights under their LDM names (``cond_stage_model.transformer.text_model.*``)."""
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        # Flattened (transformers >= 5.6) CLIPTextModel keys lack the ``text_model.`` level LDM files have.
        name = key if key.startswith("text_model.") else "text_model." + key
        state[LDM_TEXT_PREFIX + name] = tensor
    return state


def to_ldm_state_dict(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The three networks' weights under their original LDM (CompVis / A1111) names, in one dict."""
    return {**unet_to_ldm(bundle.unet), **vae_to_ldm(bundle.vae), **text_encoder_to_ldm(bundle.text_encoder)}

