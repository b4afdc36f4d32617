"""The conditioning of an evaluation: the one the LoRAs were trained with, read from their metadata.

A LoRA's losses are only comparable to its training losses when the captions are encoded the same way: the
same CLIP layer (``clip_skip``, paper runs: 2) and the same caption window (``max_token_length``, paper runs:
225), and when the images are the size it learnt them at (``resolution``). Training records all three in every
LoRA file under kohya's keys ``ss_clip_skip``, ``ss_max_token_length`` (a number, or ``"None"`` for kohya's
default: the last layer, the tokenizer's 75-token window) and ``ss_resolution`` (``"(512, 512)"``), so by
default the evaluation uses what the files say:

* ``--clip_skip`` / ``--max_token_length`` / ``--resolution`` unset: the LoRAs' recorded values; the base model
  alone (no LoRA): clip_skip 1, the 75-token window and the base's own image size (its configs': 512 px for SD
  v1.5, else 512);
* a flag that contradicts a LoRA's record is refused unless ``--allow_conditioning_mismatch``;
* LoRAs recorded with different conditioning are refused in one evaluation (their features would not be
  comparable to each other's training): evaluate them separately;
* a file without the keys (older files, foreign LoRAs) gets the default with one ``warning:`` line.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

from library.errors import ConfigError, ModelError
from library.eval.config import EvalConfig
from library.eval.records import ModelSpec

CLIP_SKIP_KEY = "ss_clip_skip"
MAX_TOKEN_LENGTH_KEY = "ss_max_token_length"
RESOLUTION_KEY = "ss_resolution"
CONDITIONING_KEYS = (CLIP_SKIP_KEY, MAX_TOKEN_LENGTH_KEY, RESOLUTION_KEY)
DEFAULT_TOKENS = 75  # what ``max_token_length`` None (the tokenizer's own window) means for SD v1.x
DEFAULT_RESOLUTION = 512  # SD v1.x's training size, for the base model alone or a file that records none

# (config field, metadata key, default when nothing says otherwise)
_SETTINGS = (("clip_skip", CLIP_SKIP_KEY, 1), ("max_token_length", MAX_TOKEN_LENGTH_KEY, None),
             ("resolution", RESOLUTION_KEY, DEFAULT_RESOLUTION))


@dataclass(frozen=True)
class Conditioning:
    """How captions are encoded: ``max_token_length`` None is the tokenizer's 75-token window (as in training)."""

    clip_skip: int
    max_token_length: int | None
    source: dict[str, str]  # per field: "flag", "LoRA metadata" or "default"
    resolution: int = DEFAULT_RESOLUTION

    def as_dict(self) -> dict[str, Any]:
        return {"clip_skip": self.clip_skip, "max_token_length": self.max_token_length or DEFAULT_TOKENS,
                "resolution": self.resolution, "source": dict(self.source)}


def _square_size(raw: str) -> int | None:
    """The side of a recorded ``ss_resolution`` (``"(512, 512)"``, ``"512"``, ``"(512.0, 512.0)"``); None unless it
    is one positive multiple of 8 (the evaluation crops squares of such sizes)."""
    sizes = {float(number) for number in re.findall(r"\d+(?:\.\d+)?", raw)}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return int(size) if size.is_integer() and size > 0 and size % 8 == 0 else None


def _records(spec: ModelSpec, key: str) -> bool:
    """Whether the file records ``key`` in a form the evaluation can use (``ss_resolution``: a square size; a file
    trained at W x H, or at an odd size, counts as recording none, and the flag or the default decides)."""
    if key not in spec.metadata:
        return False
    return key != RESOLUTION_KEY or _square_size(spec.metadata[key]) is not None


def _parse(spec: ModelSpec, key: str) -> int | None:
    """A recorded value: ``"None"`` is kohya's default (None), otherwise a positive integer (``ss_resolution``:
    ``"(512, 512)"``)."""
    raw = spec.metadata[key].strip()
    if key == RESOLUTION_KEY:
        return _square_size(raw)
    if raw == "None":
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise ModelError(f"{spec.kind} file {spec.path}: metadata {key}={raw!r} is neither a positive integer nor "
                         "'None'; fix the file's metadata or re-export it")
    return int(raw)


def _comparable(field: str, value: int | None) -> int:
    """The value with kohya's None spelled out: clip_skip None = 1, max_token_length None = 75."""
    if value is not None:
        return value
    return 1 if field == "clip_skip" else DEFAULT_TOKENS


def _describe(field: str, value: int | None) -> str:
    if field == "clip_skip":
        return f"clip_skip {_comparable(field, value)}"
    if field == "resolution":
        return f"{value} px images"
    return f"{_comparable(field, value)} caption tokens"


def _resolve_one(config: EvalConfig, loras: Sequence[ModelSpec], field: str, key: str, default: int | None,
                 missing: list[str]) -> tuple[int | None, str]:
    """(value, source) of one setting; appends the files that do not record it to ``missing``."""
    flag = getattr(config, field)
    recorded = {spec.name: _parse(spec, key) for spec in loras if _records(spec, key)}
    missing.extend(str(spec.path) for spec in loras if spec.name not in recorded)
    distinct = {}
    for name, value in recorded.items():
        distinct.setdefault(_comparable(field, value), (name, value))
    if flag is not None:
        clash = [(name, value) for name, value in recorded.items()
                 if _comparable(field, value) != _comparable(field, flag)]
        if clash and not config.allow_conditioning_mismatch:
            name, value = clash[0]
            raise ConfigError(
                f"--{field} {flag} contradicts LoRA '{name}', trained with {_describe(field, value)} (its {key}); "
                f"drop --{field} to evaluate as trained, or pass --allow_conditioning_mismatch")
        return flag, "flag"
    if len(distinct) > 1:
        (a, va), (b, vb) = list(distinct.values())[:2]
        raise ConfigError(
            f"LoRAs '{a}' ({_describe(field, va)}) and '{b}' ({_describe(field, vb)}) were trained with different "
            "conditioning; evaluate them separately (one evaluate_mia.py run each)")
    if distinct:
        return next(iter(distinct.values()))[1], "LoRA metadata"
    return default, "default"


def resolve_conditioning(config: EvalConfig, specs: Sequence[ModelSpec],
                         native_resolution: int | None = None) -> Conditioning:
    """The conditioning of this evaluation (see the module docstring); prints one ``warning:`` line for LoRA
    files that record no conditioning and are evaluated with an assumed one. ``native_resolution``: the base
    model's own image size (:func:`library.sd.loading.native_resolution`), the resolution nothing else sets."""
    default_size = native_resolution or DEFAULT_RESOLUTION
    settings = [(f, k, default_size if f == "resolution" else d) for f, k, d in _SETTINGS]
    # LoRAs, and fine-tuned UNets that record their training (a foreign UNet records nothing: no warning for it)
    loras = [spec for spec in specs if spec.lora_path is not None or (spec.unet is not None and spec.metadata)]
    values: dict[str, int | None] = {}
    source: dict[str, str] = {}
    unrecorded: list[tuple[str, list[str]]] = []
    for field, key, default in settings:
        missing: list[str] = []
        values[field], source[field] = _resolve_one(config, loras, field, key, default, missing)
        if missing and source[field] != "flag":
            unrecorded.append((field, missing))
    if unrecorded:
        files = sorted({file for _, missing in unrecorded for file in missing})
        keys = " / ".join(key for field, key, _ in _SETTINGS if field in dict(unrecorded))
        used = " and ".join(_describe(field, values[field]) for field, _ in unrecorded)
        flags = " / ".join(f"--{field}" for field, _ in unrecorded)
        usable = " (a non-square ss_resolution is not used)" if "resolution" in dict(unrecorded) else ""
        print(f"warning: model file(s) {', '.join(files)} record no {keys}{usable} (older or foreign files); evaluating "
              f"with {used} — pass {flags} if they were trained otherwise", file=sys.stderr, flush=True)
    return Conditioning(values["clip_skip"] or 1, values["max_token_length"], source,
                        values["resolution"] or default_size)


__all__ = ["CLIP_SKIP_KEY", "CONDITIONING_KEYS", "Conditioning", "DEFAULT_RESOLUTION", "MAX_TOKEN_LENGTH_KEY",
           "RESOLUTION_KEY", "resolve_conditioning"]
