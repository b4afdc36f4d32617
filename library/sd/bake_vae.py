"""Put a VAE into an SD v1.x single-file checkpoint: what kohya's ``--vae`` does at load time, done once on disk.

The VAE is part of the base model here: its fingerprint covers it, so a LoRA trained with one VAE is never
evaluated with another in silence. A merge shipped without a VAE, or one meant to run with another (e.g.
``vae-ft-mse-840000-ema-pruned.safetensors``), becomes a new base file with :func:`bake_vae`; training and
evaluation then take that file. ``scripts/bake_vae.py`` is the command.

The VAE may come as an LDM-layout file (``encoder.down.*``, with or without the ``first_stage_model.`` prefix),
a diffusers-layout file (``encoder.down_blocks.*``) or a diffusers ``AutoencoderKL`` folder. It is checked
against the checkpoint's VAE architecture before anything is written; the checkpoint's other tensors and its
metadata are copied unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError
from library.fileio import write_safetensors
from library.sd.bundle import first_line
from library.sd.ldm_keys import LDM_VAE_PREFIX, vae_to_ldm
from library.sd.single_file import (
    _check_against,
    _classify_single_file,
    _configs,
    _meta_model,
    _open_safetensors,
)

# The tensors of an LDM AutoencoderKL (a VAE file may also carry its training loss or EMA copies: not taken).
_LDM_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_DIFFUSERS_BLOCKS = (".down_blocks.", ".up_blocks.", ".mid_block.")


# diffusers' older names of the VAE's mid-block attention (from_pretrained renames them; a bare file needs it here)
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_attention_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        head, _, last = module.rpartition(".")
        if ".mid_block.attentions." in key and last in _OLD_ATTENTION_NAMES:
            key = f"{head}.{_OLD_ATTENTION_NAMES[last]}.{param}"
        renamed[key] = tensor
    return renamed


def _diffusers_vae_to_ldm(source: Path, state: dict[str, torch.Tensor] | None, config: dict[str, Any]
                          ) -> dict[str, torch.Tensor]:
    """LDM-named VAE tensors from a diffusers folder (``state`` None) or diffusers-keyed tensors (``config``'s
    architecture)."""
    from diffusers import AutoencoderKL

    try:
        if state is None:
            model = AutoencoderKL.from_pretrained(str(source), local_files_only=True, use_safetensors=True)
        else:
            model = _meta_model(AutoencoderKL, config)
            model.load_state_dict(_current_attention_names(state), strict=True, assign=True)
    except Exception as exc:  # missing config/weights (OSError), keys or shapes of another VAE (RuntimeError)
        raise ModelError(f"{source} is not a usable diffusers VAE ({first_line(exc)})") from exc
    return vae_to_ldm(model)


def read_vae(source: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The VAE of ``source`` under its single-file names (``first_stage_model.*``); ``config`` is the diffusers
    VAE config that a diffusers-keyed file is read with."""
    if source.is_dir():
        return _diffusers_vae_to_ldm(source, None, config)
    if source.suffix.lower() != ".safetensors":
        pickled = " (pickle files are not read)" if source.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin") else ""
        raise ModelError(f"{source}: give the VAE as a .safetensors file or a diffusers VAE folder{pickled}")
    with _open_safetensors(source) as handle:
        state = {key.removeprefix(LDM_VAE_PREFIX): handle.get_tensor(key) for key in handle.keys()}
    state = {key: tensor for key, tensor in state.items() if key.startswith(_LDM_VAE_PARTS)}
    if not state:
        raise ModelError(f"{source} holds no VAE tensors (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*)")
    if any(block in key for key in state for block in _DIFFUSERS_BLOCKS):
        return _diffusers_vae_to_ldm(source, state, config)
    return {LDM_VAE_PREFIX + key: tensor for key, tensor in state.items()}


def bake_vae(checkpoint: Path, vae: Path, output: Path, *, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` with the VAE of ``vae`` (replacing its own, if any) as ``output``, atomically."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for path in (checkpoint, vae):
        if not path.exists():
            raise ModelError(f"{path} does not exist")
    if checkpoint.suffix.lower() != ".safetensors":
        raise ModelError(f"{checkpoint}: the checkpoint must be a .safetensors single file")
    if output.suffix != ".safetensors":
        raise ModelError(f"{output}: the output must end in .safetensors")
    if output.resolve() == checkpoint.resolve():
        raise ModelError(f"{output}: write the new checkpoint to another file (the original is kept)")
    if output.exists() and not overwrite:
        raise ModelError(f"{output} exists; pass --overwrite to replace it")
    with _open_safetensors(checkpoint) as handle:
        metadata = handle.metadata() or {}
        keys = list(handle.keys())
        _classify_single_file(checkpoint, keys, need_vae=False)
        tensors = {key: handle.get_tensor(key) for key in keys if not key.startswith(LDM_VAE_PREFIX)}
    configs, hint = _configs(checkpoint, metadata)
    vae_state = read_vae(vae, configs["vae"])
    architecture = _meta_model(AutoencoderKL, configs["vae"])
    try:
        converted = convert_ldm_vae_checkpoint(vae_state, dict(architecture.config))
    except Exception as exc:  # the converter indexes blocks by config; another layout fails inside it
        raise ModelError(f"{vae} does not fit the VAE of {checkpoint} ({first_line(exc)}){hint}") from exc
    _check_against(vae, "vae", architecture.state_dict(), converted, hint)
    write_safetensors(output, {**tensors, **vae_state}, metadata)
    return output
