"""``--network_args`` for :mod:`networks.lora`: the keyword arguments of ``create_network``, parsed and checked.

sd-scripts passes ``--network_args key=value`` through as strings, so every value may be a string; unknown
keys (LyCORIS options, typos) raise ConfigError rather than being ignored.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import nn

from library.errors import ConfigError, ModelError

__all__ = ["KNOWN_KWARGS", "parse_conv_args", "parse_network_kwargs", "single_text_encoder"]

KNOWN_KWARGS = frozenset(
    {
        "conv_dim",
        "conv_alpha",
        "train_unet_only",
        "apply_text_encoder",
        "dropout",
        "neuron_dropout",
        "for_inference",
        "weights_sd",
    }
)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int):
        return bool(value)
    raise ConfigError(f"network argument {name} must be true or false, got {value!r}")


def _as_dropout(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"network argument dropout must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"network argument dropout must be in [0, 1), got {p}")
    return p or None


def parse_conv_args(kwargs: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """``conv_dim`` / ``conv_alpha`` as sd-scripts reads them (alpha defaults to 1, like network_alpha)."""
    raw_dim, raw_alpha = kwargs.get("conv_dim"), kwargs.get("conv_alpha")
    if raw_dim is None or (isinstance(raw_dim, str) and raw_dim.strip().lower() in ("", "none")):
        if raw_alpha is not None:
            raise ConfigError("network argument conv_alpha needs conv_dim (the rank of the 3x3-conv LoRA)")
        return None, None
    try:
        dim = int(raw_dim)
        alpha = 1.0 if raw_alpha is None else float(raw_alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"network arguments conv_dim / conv_alpha must be numbers, got {raw_dim!r} / "
                          f"{raw_alpha!r}") from None
    if dim < 1 or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"network argument conv_dim must be a positive integer and conv_alpha positive, got "
                          f"{raw_dim!r} / {raw_alpha!r}")
    return dim, alpha


def parse_network_kwargs(kwargs: Mapping[str, Any]) -> tuple[bool, float | None]:
    """``(apply_text_encoder, dropout)`` from the kwargs; unknown keys raise ConfigError.

    ``train_unet_only=true`` or ``apply_text_encoder=false`` leaves the text encoder out; ``dropout`` (or its
    sd-scripts name ``neuron_dropout``) is the rank-feature dropout, ``None`` when 0 or absent.
    """
    unknown = sorted(set(kwargs) - KNOWN_KWARGS)
    if unknown:
        raise ConfigError(
            f"unknown network argument(s) {', '.join(unknown)} for networks.lora; accepted: "
            f"{', '.join(sorted(KNOWN_KWARGS))} (LyCORIS options are not supported)"
        )
    apply_te = True
    if kwargs.get("train_unet_only") is not None:
        apply_te = not _as_bool("train_unet_only", kwargs["train_unet_only"])
    if kwargs.get("apply_text_encoder") is not None:
        apply_te = apply_te and _as_bool("apply_text_encoder", kwargs["apply_text_encoder"])
    dropout = _as_dropout(kwargs.get("dropout", kwargs.get("neuron_dropout")))
    return apply_te, dropout


def single_text_encoder(text_encoder: Any) -> nn.Module | None:
    """The one CLIP text encoder of SD v1.x; sd-scripts passes a list, and two of them means SDXL."""
    if isinstance(text_encoder, (list, tuple)):
        if len(text_encoder) != 1:
            raise ModelError(
                f"networks.lora is for SD v1.x, which has one text encoder; got {len(text_encoder)} "
                "(is this an SDXL model?)"
            )
        text_encoder = text_encoder[0]
    return text_encoder
