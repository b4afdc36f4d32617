"""The base model of an evaluation: the torch device, and the model loaded once per process.

The feature engine and the quality samples both run in worker processes (:mod:`library.workers`); each worker
loads its own copy of the base model once (:func:`process_bundle`) and reuses it for its later jobs.
"""

from __future__ import annotations

from typing import Any

import torch

from library.errors import ConfigError
from library.eval.config import EvalConfig
from library.runtime import PRECISION_DTYPES


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` = CUDA when available, else CPU; a CUDA device without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"'device' {name!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"'device' {name!r} asks for CUDA but no GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: not what the evaluation was tested on
        raise ConfigError(f"'device' {name!r} is not supported; use --device cpu or cuda (or auto)")
    return device


def load_bundle(config: EvalConfig, device: torch.device, *, fingerprint: bool = False) -> Any:
    """The base model on ``device`` in the evaluation dtype. With ``fingerprint``, its ``loaded_fingerprint`` is
    set as training sets it: of the weights loaded in fp32, then cast, so that a LoRA's recorded base is checked
    whatever ``--mixed_precision`` (the cast gives the same bits as loading in that dtype)."""
    from library.sd.bundle import cast_weights
    from library.sd.loading import load_sd_model

    assert config.pretrained_model_name_or_path is not None
    dtype = PRECISION_DTYPES[config.mixed_precision]
    bundle = load_sd_model(config.pretrained_model_name_or_path, tokenizer_path=config.tokenizer_path,
                           dtype=torch.float32 if fingerprint else dtype, allow_pickle=config.allow_pickle)
    if fingerprint:
        bundle.loaded_fingerprint = bundle.fingerprint()
    for module in (bundle.unet, bundle.text_encoder, bundle.vae):
        cast_weights(module, dtype)
        module.to(device)
    return bundle


_PROCESS_BUNDLE: dict[tuple, Any] = {}


def process_bundle(config: EvalConfig, device: torch.device) -> Any:
    """A worker process's base model, loaded once and reused by its later jobs (features, then samples)."""
    key = (config.pretrained_model_name_or_path, config.tokenizer_path, config.mixed_precision, config.allow_pickle,
           str(device))
    if key not in _PROCESS_BUNDLE:
        _PROCESS_BUNDLE.clear()
        _PROCESS_BUNDLE[key] = load_bundle(config, device)
    return _PROCESS_BUNDLE[key]


__all__ = ["load_bundle", "process_bundle", "resolve_device"]
