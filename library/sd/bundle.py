"""The loaded SD v1.x model (:class:`ModelBundle`): how it is assembled from its parts and fingerprinted.

Both loaders (:mod:`library.sd.loading` for diffusers folders, :mod:`library.sd.single_file` for one
``.safetensors`` checkpoint) hand their networks to :func:`assemble_bundle`, which freezes and casts them and adds
SD v1.x's training noise scheduler (:func:`make_noise_scheduler`, never read from disk).

:func:`fingerprint` and :func:`vae_fingerprint` hash a model's exact content; evaluation caches and latent
caches are keyed by them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelError
from library.sd.configs import SCHEDULER_SETTINGS, diffusers_config, text_encoder_config
from library.sd.text import tokenizer_to_dict

BASE_MODEL_VERSION = "sd_v1"


@dataclass
class ModelBundle:
    """The pieces of an SD v1.x model that training and evaluation need, plus where they came from."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: str
    base_model_version: str = BASE_MODEL_VERSION
    # fingerprint() as loaded, before training cast any weights (set by library.train.setup.load_models): the id a
    # trained file records of its base, which an evaluation loading that base in fp32 recomputes
    loaded_fingerprint: str | None = None

    def fingerprint(self) -> str:
        """See :func:`fingerprint`."""
        return fingerprint(self)


def make_noise_scheduler() -> Any:
    """SD v1.x's training noise schedule as a ``DDPMScheduler`` (never read from disk: see :mod:`.configs`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_SETTINGS)


# ------------------------------------------------------------------------------------------------- assembling


def assemble_bundle(
    tokenizer: Any, text_encoder: Any, vae: Any, unet: Any, dtype: torch.dtype, *, source: str
) -> ModelBundle:
    """The loaded parts, frozen and cast (:func:`_finish`), with SD's training noise scheduler."""
    return ModelBundle(
        tokenizer=tokenizer,
        text_encoder=_finish(text_encoder, dtype),
        vae=_finish(vae, dtype),
        unet=_finish(unet, dtype),
        noise_scheduler=make_noise_scheduler(),
        source=source,
    )


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype=dtype)``, in place, only when some floating-point weight is in another dtype.

    diffusers (0.42) warns on every dtype cast of one of its models that "modules ... should be kept in
    float32", listing the model's ``_keep_in_fp32_modules`` even when it names none (SD v1.x's UNet and VAE):
    that warning is silenced for such models only; for a model that does name modules, it stands.
    """
    if not any(t.is_floating_point() and t.dtype != dtype for t in module.state_dict().values()):
        return
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)
        return
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        module.to(dtype=dtype)
    finally:
        logger.setLevel(level)


def _finish(module: Any, dtype: torch.dtype) -> Any:
    """Frozen, eval-mode, in ``dtype``: the trainer enables gradients only on what it trains."""
    cast_weights(module, dtype)
    module.eval()
    module.requires_grad_(False)
    return module


def first_line(exc: BaseException) -> str:
    """``"ErrorType: first line of its message"``: enough to name a loading failure in one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# What a CLIP tokenizer folder holds: tokenizer.json (the fast format; transformers >= 5 writes only it), or the BPE
# vocabulary and merges of the slow one
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _holds_tokenizer(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in files) for files in TOKENIZER_FILES)


def check_tokenizer_folder(folder: Path) -> None:
    """A folder holding a CLIP tokenizer's files, or one :class:`ModelError` line (a diffusers model's root or its
    unet/ folder is the likely mistake: transformers would build a broken tokenizer from it and fail much later)."""
    if not folder.is_dir():
        raise ModelError(f"tokenizer folder {folder} does not exist; pass a folder holding a CLIP tokenizer")
    if not _holds_tokenizer(folder):
        hint = (f"; did you mean {folder / 'tokenizer'}?" if _holds_tokenizer(folder / "tokenizer")
                else " (e.g. the tokenizer/ folder of a diffusers SD v1.5 copy)")
        raise ModelError(f"tokenizer folder {folder} holds no CLIP tokenizer (neither tokenizer.json nor vocab.json "
                         f"with merges.txt): pass the folder that does{hint}")


def load_tokenizer_folder(folder: Path) -> Any:
    """A CLIP tokenizer from a local folder (offline); :class:`ModelError` if the folder is missing or unusable."""
    from transformers import CLIPTokenizer

    check_tokenizer_folder(folder)
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/... for unusable folders
        raise ModelError(f"could not load a CLIP tokenizer from {folder} ({first_line(exc)})") from exc


# ------------------------------------------------------------------------------------------------- fingerprints


def _canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=repr).encode("utf-8")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _hash_module(digest: Any, name: str, config: dict[str, Any], module: torch.nn.Module) -> None:
    digest.update(_canonical_json({"component": name, "class": type(module).__name__, "config": config}))
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(f"\n{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode("utf-8"))
        digest.update(_tensor_bytes(tensor))


def vae_fingerprint(vae: Any) -> str:
    """Hex sha256 of the VAE's class, config and exact weights (dtype included); latent caches are keyed by it."""
    digest = hashlib.sha256()
    _hash_module(digest, "vae", diffusers_config(vae), vae)
    return digest.hexdigest()


def fingerprint(bundle: ModelBundle) -> str:
    """A deterministic hex id of everything that shapes the model's outputs.

    It hashes (sha256) each network's class, architecture config and **every weight's exact bytes** (with
    names, dtypes and shapes), the tokenizer's vocabulary, merges and window, and the noise schedule. Exact
    content hashing was chosen over sampled statistics because it never misses a change (one perturbed weight
    changes it) and it is cheap next to loading: sha256 runs at about 1.7 GB/s on one CPU core, so SD v1.5
    (4.3 GB in fp32, half that in fp16) takes about 2-4 s on a 2-core box, the VAE alone about 0.3 s. The same
    weights in another dtype give another id, which is intended: their outputs differ. Device and
    ``requires_grad`` do not matter; injected LoRA layers would (they are in the state dict), so fingerprint the
    base model before adding them.
    """
    digest = hashlib.sha256()
    digest.update(_canonical_json({"base_model_version": bundle.base_model_version}))
    _hash_module(digest, "unet", diffusers_config(bundle.unet), bundle.unet)
    _hash_module(digest, "vae", diffusers_config(bundle.vae), bundle.vae)
    _hash_module(digest, "text_encoder", text_encoder_config(bundle.text_encoder), bundle.text_encoder)
    digest.update(_canonical_json({"tokenizer": tokenizer_to_dict(bundle.tokenizer)}))
    digest.update(_canonical_json({"scheduler": diffusers_config(bundle.noise_scheduler)}))
    return digest.hexdigest()

