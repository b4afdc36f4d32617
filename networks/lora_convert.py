"""diffusers / PEFT-format LoRA state dicts -> our kohya layout, in memory (a file is never rewritten).

A LoRA trained with diffusers' ``train_text_to_image_lora.py`` (``pytorch_lora_weights.safetensors``) or saved by
PEFT names the same numbers differently from kohya; :func:`to_kohya_state_dict` renames them, so everything
downstream (:func:`networks.lora.create_network_from_weights`, the evaluation, GSA's per-tensor groups) sees a
kohya file. Layouts read, per key (a file may mix them):

* diffusers (``convert_state_dict_to_diffusers`` + ``save_lora_weights``):
  ``unet.<module path>.lora.down.weight`` / ``.lora.up.weight``; text encoder
  ``text_encoder.<module path>.lora_linear_layer.down.weight`` (or ``.lora.down.weight``);
* PEFT-native: ``<prefix>.<module path>.lora_A.weight`` / ``.lora_B.weight`` with the prefix ``unet.``,
  ``text_encoder.``, ``base_model.model.`` or none (``lora_A.<adapter>.weight`` too);
* the old attention-processor layout: ``unet.<block>.attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` is
  ``to_out.0``; in the text encoder ``to_q_lora`` is ``q_proj``).

A layer's module path becomes our kohya name by :func:`networks.lora_format.lora_name` (``lora_unet_`` + path with
``_``; ``lora_te_text_model_…`` for the text encoder). A key without a ``unet.`` / ``text_encoder.`` prefix belongs
to the text encoder when its path starts with ``text_model.`` or ``encoder.layers.``, else to the UNet.

**Scale.** diffusers and PEFT apply ``lora_B @ lora_A`` with scale ``lora_alpha / r``. The alpha we write is, in
order: a ``<prefix>.<module>.alpha`` tensor of the file; else the ``lora_adapter_metadata`` diffusers (>= 0.34)
stores in the safetensors header (``unet.lora_alpha``, ``unet.alpha_pattern``, ``use_rslora``); else alpha = rank
(scale 1, the diffusers convention for files without alphas). A PEFT ``adapter_model.safetensors`` keeps its
``lora_alpha`` in the ``adapter_config.json`` beside it, which :func:`networks.lora_io.read_lora_metadata` reads
into the same metadata entry.

Refused with one :class:`~library.errors.ModelError`: DoRA (``lora_magnitude_vector``) and LoRA-bias tensors,
SDXL text-encoder keys (``text_encoder_2.``, kohya's ``lora_te1_`` / ``lora_te2_``), two keys naming one kohya
tensor, and (given the model's layer names) a key whose layer the model lacks, named by the file's own key.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Collection, Mapping

import torch

from library.errors import ModelError
from networks.lora_format import (
    KOHYA_SUFFIXES,
    ModuleWeights,
    group_kohya_state_dict,
    lora_name,
)
from networks.lora_io import ADAPTER_METADATA_KEY

__all__ = ["ADAPTER_METADATA_KEY", "group_lora_state_dict", "is_foreign_key", "parse_foreign_key",
           "to_kohya_state_dict"]

_PARTS = {"unet.": "unet", "text_encoder.": "text_encoder"}
_TE_ROOTS = ("text_model.", "encoder.layers.")
# (tail regex, which tensor). The tail follows the module path; order matters only for readability.
_TAILS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"\.(?:lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)
# The attention-processor layout names the projection in the tail: ``<attn>.processor.to_q_lora.down.weight``.
_PROCESSOR_TAIL = re.compile(r"\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PROCESSOR_MODULES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_KOHYA_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha"}
_UNSUPPORTED = (("lora_magnitude_vector", "a DoRA network"), ("lora_B.bias", "a LoRA with bias terms"),
                ("lora_embedding_", "an embedding LoRA"))


def is_foreign_key(key: str) -> bool:
    """Whether ``key`` is not a kohya-style key. Every kohya key starts with ``lora_`` (``lora_unet_*``,
    ``lora_te_*``, and SDXL's ``lora_te1_*`` / ``lora_te2_*``, which the kohya checks then name as SDXL's); no
    diffusers or PEFT key does."""
    return not key.startswith("lora_")


def _split_part(path: str) -> tuple[str, str]:
    """(part, module path without the part prefix) of a diffusers/PEFT path (prefix included)."""
    path = path.removeprefix("base_model.model.")
    for prefix, part in _PARTS.items():
        if path.startswith(prefix):
            return part, path[len(prefix):]
    return ("text_encoder" if path.startswith(_TE_ROOTS) else "unet"), path


def parse_foreign_key(key: str) -> tuple[str, str, str] | None:
    """``(part, module path, tensor)`` of a diffusers/PEFT LoRA key (tensor: down / up / alpha), None otherwise."""
    match = _PROCESSOR_TAIL.search(key)
    if match is not None:
        part, path = _split_part(key[: match.start()])
        return part, f"{path}.{_PROCESSOR_MODULES[part][match.group(1)]}", match.group(2)
    for pattern, tensor in _TAILS:
        match = pattern.search(key)
        if match is not None:
            part, path = _split_part(key[: match.start()])
            # diffusers' KEYS_TO_ALWAYS_REPLACE: the attention processor is not a module of its own.
            return part, path.replace(".processor.", ".").removesuffix(".processor"), tensor
    return None


def _adapter_alphas(metadata: Mapping[str, str] | None, source: str) -> dict[str, dict[str, Any]]:
    """``{part: {"lora_alpha", "alpha_pattern", "use_rslora"}}`` from diffusers' ``lora_adapter_metadata``."""
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"LoRA file {source}: metadata '{ADAPTER_METADATA_KEY}' is not JSON ({exc})") from exc
    out: dict[str, dict[str, Any]] = {}
    for prefix, part in _PARTS.items():
        if config.get(f"{prefix}use_dora"):
            raise ModelError(f"LoRA file {source} is a DoRA network ({prefix}use_dora), which this loader does "
                             "not support")
        if f"{prefix}lora_alpha" in config:
            out[part] = {"lora_alpha": float(config[f"{prefix}lora_alpha"]),
                         "alpha_pattern": dict(config.get(f"{prefix}alpha_pattern") or {}),
                         "use_rslora": bool(config.get(f"{prefix}use_rslora"))}
    return out


def _metadata_alpha(config: Mapping[str, Any], path: str, rank: int) -> float:
    """Our kohya alpha for PEFT's scale of module ``path``: lora_alpha / r, or lora_alpha / sqrt(r) (rsLoRA).

    ``alpha_pattern`` keys match as in PEFT (``get_pattern_key``): the key is a suffix of the module path.
    """
    alpha = config["lora_alpha"]
    for pattern, value in config["alpha_pattern"].items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config["use_rslora"] else alpha


def _refuse_unsupported(key: str, source: str) -> None:
    """One ModelError for a key of a kind of network this loader cannot apply (rather than "unexpected key")."""
    for marker, what in _UNSUPPORTED:
        if marker in key:
            raise ModelError(f"LoRA file {source}: key '{key}' belongs to {what}, which this loader does not support")
    if key.startswith(("text_encoder_2.", "lora_te1_", "lora_te2_", "lora_te3_")):  # diffusers' / sd-scripts' names
        raise ModelError(f"LoRA file {source}: key '{key}' adapts one of several text encoders (an SDXL LoRA); use a "
                         "LoRA trained for this SD v1.x model")


def to_kohya_state_dict(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = "<LoRA state dict>"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(kohya state dict, {kohya key: the file's key})`` of a diffusers/PEFT/kohya (or mixed) LoRA state dict.

    kohya keys pass through unchanged (and are not in the second dict); a key of no known layout too (the kohya
    grouping then refuses it with its own message). ``metadata`` is the file's safetensors header metadata.
    """
    alphas_from_meta = _adapter_alphas(metadata, source)
    out: dict[str, torch.Tensor] = {}
    file_key: dict[str, str] = {}  # our key -> the file's key
    layer_of: dict[str, tuple[str, str]] = {}
    for key, tensor in sd.items():
        _refuse_unsupported(key, source)  # every key: SDXL's text_encoder_2 keys parse as (unknown) UNet layers
        parsed = parse_foreign_key(key) if is_foreign_key(key) else None
        if parsed is None:
            new_key = key
        else:
            part, path, tensor_kind = parsed
            name = lora_name(part, path)
            new_key = name + _KOHYA_SUFFIX[tensor_kind]
            layer_of[name] = (part, path)
        if new_key in file_key:
            raise ModelError(f"LoRA file {source}: keys '{file_key[new_key]}' and '{key}' both give '{new_key}'; "
                             "the file holds one layer twice — re-export it")
        file_key[new_key] = key
        out[new_key] = tensor
    for name, (part, path) in layer_of.items():  # alphas the file does not hold: from its metadata
        down = out.get(name + _KOHYA_SUFFIX["down"])
        if name + _KOHYA_SUFFIX["alpha"] in out or down is None or part not in alphas_from_meta:
            continue
        out[name + ".alpha"] = torch.tensor(_metadata_alpha(alphas_from_meta[part], path, int(down.shape[0])))
    return out, {new: old for new, old in file_key.items() if new != old}


def group_lora_state_dict(
    sd: Mapping[str, torch.Tensor], source: str, metadata: Mapping[str, str] | None = None,
    known: Collection[str] | None = None,
) -> dict[str, ModuleWeights]:
    """:func:`~networks.lora_format.group_kohya_state_dict` of any layout :func:`to_kohya_state_dict` reads.

    ``known``: the kohya names of the model's adaptable layers; a converted key outside it raises ModelError
    naming the file's own key (kohya keys keep the kohya loader's messages).
    """
    converted, origin = to_kohya_state_dict(sd, metadata, source)
    for new_key, key in origin.items():
        name = next(new_key[: -len(s)] for s in KOHYA_SUFFIXES if new_key.endswith(s))
        if known is not None and name not in known:
            raise ModelError(
                f"LoRA file {source}: key '{key}' (a diffusers/PEFT-format LoRA key, read as '{new_key}') "
                "matches no layer of this SD v1.x model; the LoRA was probably trained for another base model "
                "(e.g. SD2 or SDXL) — use a LoRA trained for this model")
        pair = [f"{name}{s}" for s in KOHYA_SUFFIXES[:2]]
        if not all(k in converted for k in pair):  # said here, where the file's own key names are known
            raise ModelError(f"LoRA file {source}: '{key}' (a diffusers/PEFT-format LoRA key) has no matching "
                             f"{'up (lora_B)' if pair[0] in converted else 'down (lora_A)'} weight; the file is "
                             "incomplete or corrupt — re-export it")
    return group_kohya_state_dict(converted, source)
