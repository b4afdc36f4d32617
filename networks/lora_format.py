"""The kohya LoRA file format: key names, writing ``.safetensors``, metadata policy (reading: :mod:`networks.lora_io`).

A kohya LoRA file holds, per adapted layer, three tensors under one name:

* ``lora_unet_<diffusers module path, '.' -> '_'>.{lora_down.weight, lora_up.weight, alpha}`` and
  ``lora_te_text_model_encoder_layers_<i>_{self_attn_{q,k,v,out}_proj, mlp_fc{1,2}}.…``;
* ``lora_down`` is ``[r, in]`` (Linear) or ``[r, in, kh, kw]`` (conv), ``lora_up`` ``[out, r]`` or
  ``[out, r, 1, 1]``, ``alpha`` a 0-dim tensor;
* no other tensors, and metadata that never describes the (private) training set: this module owns the
  privacy policy for that metadata (:data:`FORBIDDEN_METADATA_KEYS`, :func:`check_metadata`) and the
  metadata every file gets (:func:`default_metadata`).

Nothing here knows about ``nn.Module`` LoRA layers; :mod:`networks.lora` maps these names to modules.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from library.errors import ModelError
from library.fileio import write_safetensors
from library.sd.bundle import BASE_MODEL_VERSION
from library.sd.ldm_keys import LDM_TEXT_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX

# The readers live in networks.lora_io; re-exported here, where callers have always found them.
from networks.lora_io import (
    ATTACKER_HINT,
    ATTACKER_KEY_PREFIXES,
    check_lora_file,
    describe_source,
    load_lora_state_dict,
    lora_file_sha256,
    read_lora_metadata,
    read_lora_source,
)

__all__ = [
    "FORBIDDEN_METADATA_KEYS",
    "KOHYA_SUFFIXES",
    "LORA_PREFIX_TEXT_ENCODER",
    "LORA_PREFIX_UNET",
    "ModuleWeights",
    "USER_METADATA_KEYS",
    "check_lora_file",
    "check_metadata",
    "check_shapes",
    "default_metadata",
    "describe_source",
    "group_kohya_state_dict",
    "layer_dims",
    "load_lora_state_dict",
    "lora_file_sha256",
    "lora_name",
    "ranks_and_alphas",
    "read_lora_metadata",
    "read_lora_source",
    "unknown_module_error",
    "user_metadata",
    "write_lora_file",
]

LORA_PREFIX_UNET = "lora_unet"
LORA_PREFIX_TEXT_ENCODER = "lora_te"
# kohya and A1111 name text-encoder layers after the transformers-4 module tree (``text_model.encoder…``);
# transformers 5's CLIPTextModel starts at ``encoder.…``, so the prefix is added back when naming keys.
_TE_KOHYA_ROOT = "text_model."
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
"""The three tensors a kohya LoRA file holds per adapted layer, in the order they are reported missing."""

NETWORK_MODULE = "networks.lora"
MODELSPEC_VERSION = "1.0.1"  # what sd-scripts writes today (sai_model_spec.py); older files say 1.0.0
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"

# Metadata that would leak facts about the private training set. sd-scripts writes these by default
# (directory names, per-caption tag counts, per-dataset image counts, bucket histograms); in a
# membership-privacy tool the LoRA file is the published artefact, so none of them may ever be in it.
FORBIDDEN_METADATA_KEYS: frozenset[str] = frozenset(
    {
        "ss_dataset_dirs",  # training folder names and image counts per folder
        "ss_reg_dataset_dirs",  # the same for regularisation images
        "ss_tag_frequency",  # every caption tag with its count: a summary of the captions
        "ss_datasets",  # JSON of datasets/subsets: image dirs, counts, tag frequencies, buckets
        "ss_bucket_info",  # per-resolution image counts
        "ss_num_train_images",  # exact size of the member set
        "ss_num_reg_images",
        "ss_num_batches_per_epoch",  # member-set size up to the batch size
        "ss_training_images",
        "ss_captions",
    }
)
# Key fragments that name captions, paths or datasets in any tool's vocabulary; checked as substrings of
# the lower-cased key so that spellings not in the exact list above are refused as well.
_FORBIDDEN_KEY_FRAGMENTS: tuple[str, ...] = (
    "dataset",
    "tag_frequency",
    "bucket_info",
    "data_dir",
    "image_dir",
    "img_dir",
    "train_dir",
    "captions",
    "caption_text",
    "filename",
    "file_name",
    "filepath",
    "file_path",
    "_path",
)
# A value that *is* an absolute file system path (POSIX, home-relative, Windows drive or UNC).
_PATH_VALUE = re.compile(r"^\s*(/|~[/\\]|[A-Za-z]:[/\\]|\\\\)")
#: sd-scripts' flags for what a saved file says of itself, in its author's words, and the metadata key each fills.
USER_METADATA_KEYS: dict[str, str] = {
    "training_comment": "ss_training_comment",
    "metadata_title": "modelspec.title",
    "metadata_author": "modelspec.author",
    "metadata_description": "modelspec.description",
    "metadata_license": "modelspec.license",
    "metadata_tags": "modelspec.tags",
    "metadata_usage_hint": "modelspec.usage_hint",
    "metadata_trigger_phrase": "modelspec.trigger_phrase",
}


# --------------------------------------------------------------------------------------------------
# key names
# --------------------------------------------------------------------------------------------------


def lora_name(part: str, module_path: str) -> str:
    """The kohya name of the LoRA for layer ``module_path`` of ``part`` (``"unet"`` or ``"text_encoder"``)."""
    if part == "unet":
        return f"{LORA_PREFIX_UNET}_{module_path.replace('.', '_')}"
    if not module_path.startswith(_TE_KOHYA_ROOT):
        module_path = _TE_KOHYA_ROOT + module_path
    return f"{LORA_PREFIX_TEXT_ENCODER}_{module_path.replace('.', '_')}"


# --------------------------------------------------------------------------------------------------
# writing files
# --------------------------------------------------------------------------------------------------


def creation_date() -> str:
    """ISO date of "now" for ``modelspec.date``, or of ``SOURCE_DATE_EPOCH`` (UTC) when that is set.

    The date is the one field of a LoRA file that differs between two runs with the same seed; the
    reproducible-builds convention ``SOURCE_DATE_EPOCH`` pins it, so seeded runs give bit-identical files.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and epoch.strip().isdigit():
        return _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc).replace(tzinfo=None).isoformat()
    return _dt.datetime.now().replace(microsecond=0).isoformat()


def write_lora_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``tensors`` with ``meta`` (plus ``sshs_model_hash``) as safetensors, atomically.

    ``meta`` gets the weights hash added in place, then is checked once more against the privacy policy.
    """
    from safetensors.torch import save

    # The weights hash is over the tensor bytes only, which do not depend on the header.
    meta["sshs_model_hash"] = _tensor_data_sha256(save(tensors))
    check_metadata(meta)
    write_safetensors(path, tensors, meta)


def _tensor_data_sha256(data: bytes) -> str:
    # The data region follows an 8-byte little-endian header length and the JSON header.
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len :]).hexdigest()


# --------------------------------------------------------------------------------------------------
# grouping and validating a state dict
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleWeights:
    """One layer's tensors from a kohya file; ``keys`` are the file's own key names, for error messages."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    keys: tuple[str, ...]


def _normalise_lora_name(name: str) -> str:
    # Some exporters drop the transformers-4 "text_model_" root from text-encoder names; diffusers and
    # A1111 accept both spellings, so do we.
    if name.startswith("lora_te_encoder_"):
        return "lora_te_text_model_encoder_" + name[len("lora_te_encoder_") :]
    return name


# Key fragments of the LyCORIS algorithms (LoHa, LoKr, OFT, full/diff, IA3, GLoRA, norm), DoRA and LoCon's Tucker
# middle: networks this loader does not apply, named as such rather than as a file "for another model".
LYCORIS_KEY_FRAGMENTS = ("hada_", "lokr_", "dora_scale", "oft_", "lora_mid", ".diff", ".on_input", ".w_norm",
                         ".b_norm", ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight")


def _foreign_format_hint(key: str) -> str:
    if key.startswith(ATTACKER_KEY_PREFIXES):
        return f" — {ATTACKER_HINT}"
    if key.startswith((LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX)):  # a --train_mode full output, or a base
        return (" — it is a whole SD checkpoint (UNet / VAE / text-encoder weights), not a LoRA: evaluate_mia.py "
                "audits a full fine-tune with --unet_weights, and a base model goes in --pretrained_model_name_or_path")
    if "lora_A" in key or "lora_B" in key or key.startswith(("unet.", "text_encoder.")) or ".lora.down." in key:
        return (
            " — it looks like a diffusers/PEFT-format LoRA; this loader reads kohya-format files "
            "(lora_unet_*/lora_te_* keys). Load it with diffusers' load_lora_weights, or convert it"
        )
    if any(s in key for s in LYCORIS_KEY_FRAGMENTS):
        return " — it is a LyCORIS/DoRA-type network, which this LoRA loader does not support"
    return ""


def group_kohya_state_dict(sd: Mapping[str, torch.Tensor], source: str) -> dict[str, ModuleWeights]:
    """Group ``<name>.lora_down.weight / .lora_up.weight / .alpha`` by LoRA name; refuse anything else."""
    if not sd:
        raise ModelError(f"LoRA file {source} holds no tensors; it is not a LoRA file — re-export it")
    parts: dict[str, dict[str, Any]] = {}
    for key, tensor in sd.items():
        suffix = next((s for s in KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            hint = _foreign_format_hint(key) or "; the file was probably made for another model or tool"
            raise ModelError(
                f"LoRA file {source}: unexpected key '{key}' is not a kohya LoRA tensor "
                f"(<name>.lora_down.weight / .lora_up.weight / .alpha){hint}"
            )
        name = _normalise_lora_name(key[: -len(suffix)])
        parts.setdefault(name, {"keys": []})
        parts[name][suffix] = tensor
        parts[name]["keys"].append(key)
    grouped: dict[str, ModuleWeights] = {}
    for name, entry in parts.items():
        if ".lora_down.weight" not in entry or ".lora_up.weight" not in entry:
            missing = "lora_up" if ".lora_down.weight" in entry else "lora_down"
            raise ModelError(
                f"LoRA file {source}: '{entry['keys'][0]}' has no matching {missing} weight; "
                "the file is incomplete or corrupt — re-export it"
            )
        alpha_t = entry.get(".alpha")
        alpha = None if alpha_t is None else float(alpha_t.float().reshape(-1)[0])
        down, up = entry[".lora_down.weight"], entry[".lora_up.weight"]
        grouped[name] = ModuleWeights(down, up, alpha, tuple(entry["keys"]))
    return grouped


def layer_dims(layer: nn.Module) -> tuple[int, int, tuple[int, ...] | None]:
    """(in, out, conv kernel size or None for a Linear)."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels, tuple(layer.kernel_size)
    return layer.in_features, layer.out_features, None


def check_shapes(
    name: str, w: ModuleWeights, in_dim: int, out_dim: int, kernel: tuple[int, ...] | None, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the file's tensors against the base layer; return them shaped like our LoRA weights."""
    down, up = w.down, w.up
    down_kernels = ((), (1, 1)) if kernel in (None, (1, 1)) else (kernel,)
    ok = (
        down.dim() in (2, 4)
        and up.dim() in (2, 4)
        and tuple(down.shape[2:]) in down_kernels
        and up.shape[2:] in ((), (1, 1))
        and down.shape[1] == in_dim
        and up.shape[0] == out_dim
        and up.shape[1] == down.shape[0]
    )
    if not ok:
        raise ModelError(
            f"LoRA file {source}: '{next((k for k in w.keys if 'lora_down' in k), w.keys[0])}' has shapes down "
            f"{tuple(down.shape)} / up {tuple(up.shape)}, "
            f"but layer {name} of this model is {in_dim} -> {out_dim}; the LoRA was probably trained for "
            "another base model (e.g. SD2 or SDXL) — use a LoRA trained for this SD v1.x model"
        )
    # Some exporters write 2-D weights for 1x1 convs (or 4-D for Linears); the numbers are the same.
    rank = down.shape[0]
    if kernel is not None:
        return down.reshape(rank, in_dim, *kernel), up.reshape(out_dim, rank, 1, 1)
    return down.reshape(rank, in_dim), up.reshape(out_dim, rank)


def ranks_and_alphas(
    grouped: Mapping[str, ModuleWeights], layers: Mapping[str, nn.Module], source: str, has_te: bool
) -> tuple[dict[str, int], dict[str, float]]:
    """Per-layer rank (from ``lora_down``) and alpha a file declares, each checked against its base layer.

    A file without ``.alpha`` for a layer means alpha = rank, as in every loader.
    """
    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for name, w in grouped.items():
        layer = layers.get(name)
        if layer is None:
            raise unknown_module_error(w.keys[0], source, has_te)
        down, _ = check_shapes(name, w, *layer_dims(layer), source)
        modules_dim[name] = int(down.shape[0])
        modules_alpha[name] = float(down.shape[0]) if w.alpha is None else w.alpha
    return modules_dim, modules_alpha


def unknown_module_error(key: str, source: str, has_te: bool) -> ModelError:
    """The error for a file key that names no layer of the model, with a hint at what the file is for."""
    hint = ""
    if "input_blocks" in key or "output_blocks" in key:  # (lora_te1_ / lora_te2_ keys: lora_convert refuses them)
        hint = " (its names are SDXL / original-LDM names)"
    elif key.startswith(LORA_PREFIX_TEXT_ENCODER + "_") and not has_te:
        return ModelError(
            f"LoRA file {source}: key '{key}' adapts the text encoder, which this network does not include (it was "
            "built for the UNet only): to continue the file, train the text encoder too "
            "(--no-network_train_unet_only, with --text_encoder_lr)"
        )
    elif re.search(r"_(resnets|downsamplers|upsamplers)_\d+_", key):
        return ModelError(
            f"LoRA file {source}: key '{key}' adapts a ResNet block (a conv_dim / LoCon LoRA), which this network "
            "was built without; build it with --network_args conv_dim=R or from the file "
            "(create_network_from_weights)"
        )
    if re.search(r"^lora_unet_(conv_in|conv_out|time_embedding)[._]", key):
        return ModelError(
            f"LoRA file {source}: key '{key}' adapts a layer that kohya LoRA / LoCon never adapt (a LyCORIS file "
            "trained with its full-network preset?); this network adapts the attention, feed-forward and (with "
            "conv_dim) ResNet layers only: train or export the LoRA without those modules"
        )
    return ModelError(
        f"LoRA file {source}: key '{key}' matches no layer of this SD v1.x model{hint}; the LoRA was "
        "probably trained for another base model — use a LoRA trained for this model"
    )


# --------------------------------------------------------------------------------------------------
# metadata: what every file says, and what no file may say
# --------------------------------------------------------------------------------------------------


class _RankedLoRA(Protocol):
    """What :func:`default_metadata` reads of a LoRA module."""

    rank: int
    alpha: torch.Tensor
    kernel_size: tuple[int, ...] | None


def default_metadata(
    loras: Sequence[_RankedLoRA], lora_dim: int, alpha: float, dropout: float | None, title: str | None = None
) -> dict[str, str]:
    """The metadata every file gets: network shape and ModelSpec identity, nothing about the data.

    ``ss_network_dim`` / ``ss_network_alpha`` are the most common rank / alpha of the Linear and 1x1 layers
    (``lora_dim`` / ``alpha`` if there are none); the 3x3 convs are recorded as sd-scripts' ``conv_dim`` /
    ``conv_alpha`` network args, and differing per-layer ranks as ``variable_rank``.
    """
    plain = [lora for lora in loras if lora.kernel_size in (None, (1, 1))]
    convs = [lora for lora in loras if lora.kernel_size not in (None, (1, 1))]
    ranks = Counter(lora.rank for lora in plain)
    alphas = Counter(float(lora.alpha) for lora in plain)
    dim = ranks.most_common(1)[0][0] if ranks else lora_dim
    alpha = alphas.most_common(1)[0][0] if alphas else alpha
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_v2": "False",
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or "LoRA",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": creation_date(),
    }
    network_args: dict[str, Any] = {}
    if convs:  # sd-scripts records its LoCon option the same way (values as strings)
        conv_ranks = Counter(lora.rank for lora in convs)
        conv_alphas = Counter(float(lora.alpha) for lora in convs)
        network_args["conv_dim"] = str(conv_ranks.most_common(1)[0][0])
        network_args["conv_alpha"] = str(conv_alphas.most_common(1)[0][0])
        if len(conv_ranks) > 1 or len(conv_alphas) > 1:
            network_args["variable_rank"] = True
    if len(ranks) > 1 or len(alphas) > 1:
        # Per-layer ranks differ (a file built from weights): record that honestly.
        network_args["variable_rank"] = True
    if network_args:
        meta["ss_network_args"] = json.dumps(network_args)
    if dropout:
        meta["ss_network_dropout"] = str(dropout)
    return meta


def user_metadata(config: Any) -> dict[str, str]:
    """The metadata of the :data:`USER_METADATA_KEYS` flags, read as attributes of ``config`` (a training config;
    unset or empty: left out). A value that is a file path is refused (ValueError naming the flag), as
    :func:`check_metadata` would refuse it at the save."""
    meta = {}
    for flag, key in USER_METADATA_KEYS.items():
        value = getattr(config, flag, None)
        if not value:
            continue
        if _PATH_VALUE.match(value):
            raise ValueError(f"'{flag}' {value!r} looks like a file path, which can tell where the private training "
                             f"data lives; the saved file's {key} is shared with it: write a name, not a path")
        meta[key] = value
    return meta


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse metadata that is not ``str -> str`` or that would leak the private training set.

    Raises ValueError naming the key. Refused: the keys in :data:`FORBIDDEN_METADATA_KEYS`, keys containing
    a dataset / caption / path fragment, and values that are absolute file paths.
    """
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"LoRA metadata must map str to str; got {key!r}: {type(value).__name__}")
        low = key.lower()
        if low in FORBIDDEN_METADATA_KEYS or any(f in low for f in _FORBIDDEN_KEY_FRAGMENTS):
            raise ValueError(
                f"LoRA metadata key '{key}' is refused: it would describe the private training set (dataset "
                "folders, captions, tags, image counts or file paths) in a file that is meant to be shared"
            )
        if _PATH_VALUE.match(value):
            raise ValueError(
                f"LoRA metadata key '{key}' is refused: its value looks like a file path, which can reveal "
                "where the private training data lives; store a name, not a path"
            )
