"""A fully fine-tuned SD v1.x UNet under audit (``--unet_weights``): finding its files, hashing, loading, swapping.

An entry is a **diffusers model folder** (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a
``.safetensors.index.json`` with its shards), directly or in a ``unet/`` subfolder (a whole pipeline folder), or an
**SD single-file checkpoint** in the original LDM layout, whose ``model.diffusion_model.*`` tensors are read and
renamed with diffusers' own ``convert_ldm_unet_checkpoint`` (as :mod:`library.sd.single_file`
does for base models). A fine-tune that trained its **text encoder** too is audited with it: an entry's text
encoder is the single file's ``cond_stage_model.transformer.*`` tensors, a pipeline folder's ``text_encoder/``, or
the ``<name>-text_encoder/`` folder this toolkit writes beside ``<name>-unet/`` (:func:`text_encoder_files`); an
entry without one (a bare UNet folder, a full fine-tune of this toolkit that did not train it: its single file
holds the base's, cast) keeps the base model's. The VAE always stays the base model's. Pickle
weights (``.ckpt``, ``.bin``) are read only with ``--allow_pickle``, as for the base model, and then with
``torch.load(weights_only=True)``.

The UNet (and text encoder) must have the base model's architecture: the same tensor names and shapes (checked
on the safetensors headers, with meta tensors, before any weight is read), else one
:class:`~library.errors.ModelError` line.
Its identity in caches and the report is :func:`weights_sha256`: the sha256 of each weight file's tensor
index (names, dtypes, shapes, offsets) and tensor bytes, header metadata excluded, so a re-saved file with other
metadata keeps its cached features and two different UNets never share them (with its own text encoder, that
fact and the text encoder's files are part of it).

:func:`swapped_weights` puts the fine-tuned tensors into the base UNet (and text encoder) for a block and gives
the base its own tensor objects back afterwards (no copy of the base weights is made).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from library.errors import ModelError, warn
from library.fileio import unpickling_failure
from library.sd.bundle import first_line
from library.sd.ldm_keys import LDM_TEXT_PREFIX, LDM_UNET_PREFIX
from networks.lora_convert import parse_foreign_key

__all__ = ["UNetWeights", "check_unet_weights", "load_text_encoder_state_dict", "load_unet_state_dict",
           "resolve_unet_weights", "swapped_weights", "text_encoder_files", "weights_metadata", "weights_sha256"]

_WEIGHTS = "diffusion_pytorch_model"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PICKLE_HINT = "pass --allow_pickle only if you trust the file (unpickling can run code), or convert it to .safetensors"


@dataclass(frozen=True)
class UNetWeights:
    """A resolved ``--unet_weights`` entry: what was given, its layout, its weight files, its text encoder's weight
    files (empty: the base model's text encoder is used) and their sha256."""

    path: Path
    layout: str  # "diffusers" (a model folder) or "single_file" (an LDM checkpoint)
    files: tuple[Path, ...]
    sha256: str
    text_encoder: tuple[Path, ...] = ()


def _folder_files(folder: Path, allow_pickle: bool) -> tuple[Path, ...]:
    """The weight files of a diffusers model folder (shards in index order); ModelError if there are none."""
    index = folder / f"{_WEIGHTS}.safetensors.index.json"
    if (folder / f"{_WEIGHTS}.safetensors").is_file():
        return (folder / f"{_WEIGHTS}.safetensors",)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ModelError(f"UNet weights {index} is not a valid shard index ({exc}); save the UNet again") from exc
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelError(f"UNet weights {folder}: shard {missing[0]} named by {index.name} is missing")
        return tuple(folder / name for name in shards)
    if (folder / f"{_WEIGHTS}.bin").is_file():
        if not allow_pickle:
            raise ModelError(f"UNet weights {folder} holds only pickle weights ({_WEIGHTS}.bin); {_PICKLE_HINT}")
        return (folder / f"{_WEIGHTS}.bin",)
    raise ModelError(f"UNet weights {folder} holds no {_WEIGHTS}.safetensors (nor a shard index); pass a "
                     "diffusers UNet folder (config.json + weights), its pipeline folder, or a single .safetensors")


def _is_safetensors(file: Path) -> bool:
    # In any case, as resolve_unet_weights accepts it: FT.SAFETENSORS is no pickle.
    return file.suffix.lower() == ".safetensors"


def _check_safetensors(file: Path) -> dict[str, Any]:
    """The parsed JSON header of a safetensors file; ModelError for anything that is not one."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little") if size >= 8 else -1
        raw = handle.read(header_len) if 0 < header_len <= size - 8 else b""
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise ModelError(f"UNet weights {file} is not a valid .safetensors file (corrupt or truncated); "
                         "download or save it again") from None
    return header


def _is_lora_key(key: str) -> bool:
    """A LoRA's down weight in any layout evaluate_mia.py reads as a LoRA: kohya's, or diffusers' and PEFT's
    (:func:`networks.lora_convert.parse_foreign_key`)."""
    parsed = parse_foreign_key(key)
    return key.endswith(".lora_down.weight") or (parsed is not None and parsed[2] == "down")


def resolve_unet_weights(path: str | Path, allow_pickle: bool = False) -> UNetWeights:
    """Find and hash the weight files of one ``--unet_weights`` entry; every failure is one ModelError line."""
    given = Path(path).expanduser()
    text_encoder: tuple[Path, ...] = ()
    if given.is_dir():
        folder = given / "unet" if not (given / "config.json").is_file() and (given / "unet").is_dir() else given
        if not (folder / "config.json").is_file():
            raise ModelError(f"UNet weights {given} is not a diffusers UNet folder (no config.json, no unet/ "
                             "subfolder); pass a UNet folder, its pipeline folder or a single .safetensors file")
        files, layout = _folder_files(folder, allow_pickle), "diffusers"
        text_encoder = text_encoder_files(folder, allow_pickle)
    elif given.is_file():
        suffix = given.suffix.lower()
        if suffix in _PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(f"UNet weights {given} is a pickle ({suffix}) checkpoint; {_PICKLE_HINT}")
        if suffix not in _PICKLE_SUFFIXES and suffix != ".safetensors":
            raise ModelError(f"UNet weights {given} is neither a diffusers folder nor a .safetensors checkpoint")
        files, layout = (given,), "single_file"
    else:
        raise ModelError(f"UNet weights {given} does not exist; pass a diffusers UNet folder or a .safetensors file")
    for file in files:
        if _is_safetensors(file):
            header = _check_safetensors(file)
            keys = [k for k in header if k != "__metadata__"]
            if layout == "single_file" and not any(k.startswith(LDM_UNET_PREFIX) for k in keys):
                is_lora = any(_is_lora_key(k) for k in keys)  # the user's mix-up of the two flags
                hint = ("it is a LoRA: pass it with --network_weights" if is_lora
                        else "a diffusers UNet goes in a folder with its config.json")
                raise ModelError(f"UNet weights {given} holds no '{LDM_UNET_PREFIX}*' tensors: it is not an SD "
                                 f"single-file checkpoint ({hint})")
            if layout == "single_file" and any(k.startswith(LDM_TEXT_PREFIX) for k in keys) \
                    and _single_file_text_encoder_trained(given, header.get("__metadata__")):
                text_encoder = (given,)
            if layout == "diffusers" and not text_encoder:
                _check_no_text_encoder_lost(given, folder, header.get("__metadata__"))
    sha = weights_sha256(files + tuple(f for f in text_encoder if f not in files))
    if text_encoder:  # its own text encoder changes every feature: never a cache entry of the UNet alone
        sha = hashlib.sha256(f"{sha}\x1ftext_encoder".encode("utf-8")).hexdigest()
    return UNetWeights(given, layout, files, sha, text_encoder)


def _check_no_text_encoder_lost(given: Path, folder: Path, meta: Any) -> None:
    """A UNet folder of a full fine-tune that trained its text encoder, found without it (copied or renamed
    alone), would be audited with the base model's text encoder: a model nobody trained. Refused instead."""
    if isinstance(meta, dict) and meta.get("smp_lora.trained_text_encoder") == "true":
        if folder.name == "unet":
            where = "text_encoder/ next to unet/"
        else:
            stem = folder.name.removesuffix("-unet") if folder.name.endswith("-unet") else "<name>"
            where = f"{stem}-text_encoder/ next to {stem}-unet/"
        raise ModelError(f"UNet weights {given} come from a fine-tune that trained its text encoder too, which is not "
                         f"beside them (as {where}): put it back so, or pass the run's single file "
                         "<name>.safetensors, which holds both")


def _single_file_text_encoder_trained(path: Path, meta: Any) -> bool:
    """Whether a single file's text encoder is a trained one: a full fine-tune of this toolkit says so in its
    metadata (an untrained one is only the base's, cast to ``--save_precision``; a file from before that record
    has ``<name>-text_encoder/`` beside it when it trained one); any other single file is audited as published."""
    if not isinstance(meta, dict) or meta.get("smp_lora.train_mode") != "full":
        return True
    recorded = meta.get("smp_lora.trained_text_encoder")
    if recorded is not None:
        return recorded == "true"
    return (path.parent / f"{path.stem}-text_encoder" / "model.safetensors").is_file()


def text_encoder_files(unet_folder: Path, allow_pickle: bool = False) -> tuple[Path, ...]:
    """The weight file of the text encoder that goes with a diffusers UNet folder: a pipeline's ``text_encoder/``
    beside its ``unet/``, or ``<name>-text_encoder/`` beside ``<name>-unet/`` (a full fine-tune of this toolkit
    with ``--train_text_encoder``); ``()`` when there is none (the base model's text encoder is used)."""
    if unet_folder.name == "unet":
        folder = unet_folder.parent / "text_encoder"
    elif unet_folder.name.endswith("-unet"):
        folder = unet_folder.with_name(unet_folder.name.removesuffix("-unet") + "-text_encoder")
    else:
        return ()
    if not folder.is_dir():
        return ()
    for weights in ("model.safetensors", "model.fp16.safetensors"):  # the fp16 variant, as for base models
        if (folder / weights).is_file():
            return (folder / weights,)
    if (folder / "pytorch_model.bin").is_file():
        if not allow_pickle:
            raise ModelError(f"text encoder {folder} (of UNet weights {unet_folder}) holds only pickle weights "
                             f"(pytorch_model.bin); {_PICKLE_HINT}")
        return (folder / "pytorch_model.bin",)
    warn(f"text encoder {folder} (of UNet weights {unet_folder}) holds no model.safetensors (a sharded text encoder "
         "is not read): that fine-tune is audited with the base model's text encoder")
    return ()


def weights_metadata(weights: UNetWeights) -> dict[str, str]:
    """The header metadata of the first safetensors weight file (a fine-tune of this toolkit records its training
    settings there, as a LoRA file does); empty for pickle weights."""
    first = weights.files[0]
    if not _is_safetensors(first):
        return {}
    meta = _check_safetensors(first).get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def weights_sha256(files: tuple[Path, ...]) -> str:
    """sha256 over the weight files: a safetensors file's tensor index and data (header metadata excluded), a
    pickle file's bytes."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            if _is_safetensors(file):
                header = _check_safetensors(file)
                header.pop("__metadata__", None)
                digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
                handle.seek(8 + int.from_bytes(handle.read(8), "little"))
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_file(file: Path, meta: bool, wanted: str = "") -> dict[str, torch.Tensor]:
    """The tensors of one weight file whose names start with ``wanted`` (meta tensors from the header if ``meta``)."""
    if not _is_safetensors(file):  # only reached with --allow_pickle (resolve_unet_weights)
        try:
            state = torch.load(str(file), map_location="meta" if meta else "cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"UNet weights {file} could not be unpickled ({unpickling_failure(exc)})") from exc
        state = state.get("state_dict", state) if isinstance(state, Mapping) else {}
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith(wanted)}
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            keys = [k for k in handle.keys() if k.startswith(wanted)]
            if not meta:
                return {k: handle.get_tensor(k) for k in keys}
            slices = {k: handle.get_slice(k) for k in keys}
            return {k: torch.empty(s.get_shape(), device="meta") for k, s in slices.items()}
    except Exception as exc:
        raise ModelError(f"UNet weights {file} could not be read ({first_line(exc)}); it may be truncated or "
                         "corrupt") from exc


def load_unet_state_dict(weights: UNetWeights, unet: Any, meta: bool = False) -> dict[str, torch.Tensor]:
    """The diffusers-named state dict of ``weights``, checked against the base ``unet``'s names and shapes.

    ``meta=True`` reads only the headers (shape-only meta tensors): the check costs no weight read.
    """
    wanted = LDM_UNET_PREFIX if weights.layout == "single_file" else ""
    state: dict[str, torch.Tensor] = {}
    for file in weights.files:
        state.update(_read_file(file, meta, wanted))
    if weights.layout == "single_file":
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        try:
            state = convert_ldm_unet_checkpoint(state, dict(unet.config))
        except Exception as exc:  # the converter indexes blocks by the base config; another layout fails inside
            raise ModelError(f"UNet weights {weights.path} do not fit the base model's UNet ({first_line(exc)}); "
                             "a fully fine-tuned UNet must have its base model's architecture") from exc
    _check_architecture(weights.path, unet.state_dict(), state)
    return state


def load_text_encoder_state_dict(weights: UNetWeights, text_encoder: Any, meta: bool = False
                                 ) -> dict[str, torch.Tensor]:
    """The transformers-named state dict of ``weights``' own text encoder (``{}``: it has none), checked against
    the base ``text_encoder``'s names and shapes (``meta=True``: headers only)."""
    if not weights.text_encoder:
        return {}
    state: dict[str, torch.Tensor] = {}
    for file in weights.text_encoder:
        state.update(_read_file(file, meta, LDM_TEXT_PREFIX if weights.layout == "single_file" else ""))
    if weights.layout == "single_file":
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        state = convert_ldm_clip_checkpoint(state)
    base = text_encoder.state_dict()
    if not any(k.startswith("text_model.") for k in base):  # transformers versions differ in this prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    # position ids: a buffer older exports saved and newer models rebuild (not in their state dict)
    state = {k: v for k, v in state.items() if k in base or not k.endswith("embeddings.position_ids")}
    _check_architecture(weights.path, base, state, "text encoder")
    return state


def check_unet_weights(weights: UNetWeights, unet: Any, text_encoder: Any) -> None:
    """ModelError unless ``weights`` fit the base ``unet`` and ``text_encoder`` (names and shapes); reads only the
    files' headers, so the orchestrator can call it for every ``--unet_weights`` entry right after loading the
    base model."""
    load_unet_state_dict(weights, unet, meta=True)
    load_text_encoder_state_dict(weights, text_encoder, meta=True)


def _check_architecture(path: Path, base: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                        part: str = "UNet") -> None:
    missing = [k for k in base if k not in got]
    unexpected = [k for k in got if k not in base]
    wrong = [k for k in base if k in got and tuple(got[k].shape) != tuple(base[k].shape)]
    if not (missing or unexpected or wrong):
        return
    if wrong:
        detail = f"{wrong[0]} is {tuple(got[wrong[0]].shape)}, the base model's {tuple(base[wrong[0]].shape)}"
    else:
        detail = f"{len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. " + (
            f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
    raise ModelError(f"UNet weights {path} do not fit the base model's {part} ({detail}); a full fine-tune "
                     "must have its base model's architecture — pass the base model it was fine-tuned from")


@contextlib.contextmanager
def swapped_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``module`` computes with ``state``'s weights (cast to each base tensor's device and dtype) for the block.

    The base tensors are kept by reference and assigned back afterwards (even if the block fails), with their
    ``requires_grad`` flags, so nothing of the base model is copied or changed.
    """
    originals = dict(module.state_dict(keep_vars=True))
    flags = {k: v.requires_grad for k, v in originals.items()}
    swapped = {k: state[k].to(device=v.device, dtype=v.dtype) for k, v in originals.items()}
    module.load_state_dict(swapped, strict=True, assign=True)
    del swapped
    try:
        yield
    finally:
        module.load_state_dict(originals, strict=True, assign=True)
        for key, tensor in module.state_dict(keep_vars=True).items():
            tensor.requires_grad_(flags[key])
