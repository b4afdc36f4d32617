"""Reading LoRA files: a cheap plausibility check of the bytes first, then the tensors, metadata and weights hash.

Every reader here checks a file with :func:`check_lora_file` before handing it to ``safetensors`` or seeking in
it: a safetensors file is an 8-byte little-endian header length, a JSON header of that length and the tensor
data. Random bytes or a pickle (``.ckpt``/``.pt``/``.bin``) renamed to ``.safetensors`` give a header length
far beyond the file, which would otherwise surface as ``OverflowError``/``OSError [Errno 22]`` from a seek or
as a Rust panic; here they are one :class:`~library.errors.ModelError` naming the file.

Writing lives in :mod:`networks.lora_format` (:func:`~networks.lora_format.write_lora_file`), beside the
metadata policy every written file is checked against.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch

from library.errors import ModelError

__all__ = [
    "ADAPTER_METADATA_KEY",
    "ATTACKER_HINT",
    "ATTACKER_KEY_PREFIXES",
    "MAX_HEADER_BYTES",
    "PICKLE_SUFFIXES",
    "LoraSource",
    "check_lora_file",
    "describe_source",
    "load_lora_state_dict",
    "lora_file_sha256",
    "peft_adapter_metadata",
    "read_lora_metadata",
    "read_lora_source",
]

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the LoRA's scale
PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"  # PEFT's save_pretrained
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_CONVERT_HINT = (
    "convert it once, in a Python session you trust, with "
    "safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'lora.safetensors')"
)

# library.privacy.ProxyAttacker's state dict (an MP/SMP run's <name>-attacker.safetensors, beside its LoRA).
ATTACKER_KEY_PREFIXES = ("normalizer.", "net.")
ATTACKER_HINT = ("it looks like an MP/SMP-LoRA run's proxy attacker (<name>-attacker.safetensors), not a LoRA; pass "
                 "the run's <name>.safetensors")


def describe_source(source: str | os.PathLike | None) -> str:
    """How error messages name where a state dict came from."""
    return str(source) if source is not None else "<LoRA state dict>"


def _corrupt(path: Path, why: str) -> ModelError:
    return ModelError(
        f"LoRA file {path} is not a valid .safetensors file ({why}); the file is corrupt or truncated, or not a "
        "LoRA at all — re-download or re-export it"
    )


def check_lora_file(file: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """``(header length, parsed JSON header)`` of a plausible safetensors LoRA file; ModelError otherwise.

    Reads only the first ``8 + header length`` bytes. Refused with one line each: a missing path, a pickle
    suffix (only safetensors LoRA files are read: unpickling can run code), another suffix, a file shorter than
    8 bytes, a header length beyond the file or above :data:`MAX_HEADER_BYTES`, and a header that is not a JSON
    object.
    """
    path = Path(file)
    if path.is_dir():
        inside = [path / name for name in (PEFT_WEIGHTS_NAME, "pytorch_lora_weights.safetensors")
                  if (path / name).is_file()]  # a PEFT or diffusers save_pretrained folder
        raise ModelError(f"LoRA file {path} is a folder; pass the LoRA file in it: {inside[0]}" if inside else
                         f"LoRA file {path} is a folder (a --save_state folder?); pass the .safetensors file the "
                         "run wrote beside it")
    if not path.is_file():
        raise ModelError(f"LoRA file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        hint = _CONVERT_HINT
        if path.with_name(PEFT_CONFIG_NAME).is_file():  # the scale is in that config, read beside this name only
            hint = hint.replace("'lora.safetensors'", f"'{path.with_name(PEFT_WEIGHTS_NAME)}'") + (
                f" (that name, beside its {PEFT_CONFIG_NAME}, which holds its scale)")
        raise ModelError(
            f"LoRA file {path} is a pickle ({suffix}) file; only safetensors LoRA files are read (unpickling can "
            f"run code): {hint}"
        )
    if suffix != ".safetensors":
        raise ModelError(f"LoRA file {path} is not a .safetensors file; only safetensors LoRA files are read")
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupt(path, f"its header claims {header_len} bytes but the file has {size}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        raise _corrupt(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    tensors = [key for key in header if key != "__metadata__"]
    if tensors and all(key.startswith(ATTACKER_KEY_PREFIXES) for key in tensors):
        # Before any metadata check: its sparse metadata would otherwise read as a LoRA trained without a split.
        raise ModelError(f"LoRA file {path} holds no LoRA tensors: {ATTACKER_HINT}")
    return header_len, header


def load_lora_state_dict(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA ``.safetensors`` file (CPU tensors); a missing or unreadable file raises ModelError."""
    path = Path(file)
    check_lora_file(path)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for truncated / garbage files
        raise ModelError(
            f"LoRA file {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated — re-download or re-export it"
        ) from exc
    # Said here, naming the file: applied, such weights would surface as NaN outputs far from their cause
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ModelError(f"LoRA file {path} holds NaN/inf values (first in '{bad}'): the run that wrote it diverged "
                         "or the file is damaged; use an earlier checkpoint of that run")
    return tensors


def read_lora_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of a LoRA file (``{}`` if it has none), with a PEFT adapter's scale from the
    ``adapter_config.json`` beside it (:func:`peft_adapter_metadata`) when the header has none of its own."""
    path = Path(file)
    check_lora_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as exc:
        raise ModelError(
            f"LoRA file {path} cannot be read as safetensors ({type(exc).__name__}: {exc}); "
            "the file is corrupt or truncated — re-download or re-export it"
        ) from exc
    if ADAPTER_METADATA_KEY not in metadata:
        metadata.update(peft_adapter_metadata(path))
    return dict(sorted(metadata.items()))  # safetensors hands keys in random order


def peft_adapter_metadata(path: Path) -> dict[str, str]:
    """The scale of a PEFT ``save_pretrained`` LoRA, which PEFT keeps in ``adapter_config.json`` beside
    ``adapter_model.safetensors`` rather than in the file, as diffusers' ``lora_adapter_metadata`` header entry
    (for both model parts: the file's keys say which one it adapts); ``{}`` for any other file.

    Without it such a file would load at scale 1 (alpha = rank), not PEFT's ``lora_alpha / r``.
    """
    config_file = path.with_name(PEFT_CONFIG_NAME)
    if path.name != PEFT_WEIGHTS_NAME or not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} (the PEFT config of LoRA file {path}) is not valid JSON ({exc}); fix it, "
                         "or move it away to load the file at scale 1") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA" or "lora_alpha" not in config:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ModelError(f"{config_file} (the PEFT config of LoRA file {path}) "
                         + (f"describes a {kind} adapter, not a LoRA" if kind and kind != "LORA" else
                            "has no lora_alpha") + "; only PEFT LoRA adapters are read")
    fields = ("r", "lora_alpha", "alpha_pattern", "use_rslora", "use_dora")
    adapter = {f"{part}.{field}": config[field] for part in ("unet", "text_encoder") for field in fields
               if field in config}
    return {ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True)}


class LoraSource(NamedTuple):
    """A LoRA as read: its state dict, its name for error messages (the file) and its header metadata."""

    state_dict: dict[str, torch.Tensor]
    source: str
    metadata: dict[str, str]


def read_lora_source(file: str | os.PathLike | Mapping[str, torch.Tensor] | LoraSource) -> LoraSource:
    """``(state dict, its name for error messages, header metadata)`` of a LoRA file or in-memory state dict; a
    :class:`LoraSource` (a file read once, kept by its caller) is not read again (its dicts are copies, as here
    every call gets dicts of its own)."""
    if isinstance(file, LoraSource):
        return LoraSource(dict(file.state_dict), file.source, dict(file.metadata))
    if isinstance(file, Mapping):
        return LoraSource(dict(file), describe_source(None), {})
    return LoraSource(load_lora_state_dict(file), describe_source(file), read_lora_metadata(file))


def lora_file_sha256(file: str | os.PathLike) -> str:
    """sha256 of the tensor data of a safetensors file, header (metadata) excluded.

    This is the ``sshs_model_hash`` that sd-scripts stores and the A1111 additional-networks extension shows:
    it identifies the weights and does not change when only the metadata is edited.
    """
    path = Path(file)
    header_len, _ = check_lora_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(8 + header_len)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
