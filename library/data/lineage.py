"""Which splits a trained file's weights have seen: the split it was trained on, and those of the LoRAs it
continues (``--network_weights``).

A membership evaluation is only valid if no "non-member" was ever trained on. A LoRA's own record
(``smp_lora.split_sha256``) says which split its run trained on; a run that starts from another LoRA inherits that
LoRA's weights, so it records the splits behind them too (``smp_lora.parent_split_sha256``), and evaluate_mia.py
refuses a file whose ancestors trained on another split, as it refuses the file itself.
"""

from __future__ import annotations

from typing import Mapping

SPLIT_KEY = "smp_lora.split_sha256"
PARENT_SPLITS_KEY = "smp_lora.parent_split_sha256"
#: An ancestor whose file records no split: a LoRA from elsewhere, or one trained on a whole folder.
UNRECORDED = "unrecorded"


def splits_seen(meta: Mapping[str, str]) -> list[str]:
    """Every split a file's weights have seen (sorted, each once): its own (``UNRECORDED`` when it records none)
    and its ancestors'. Used for a parent given to ``--network_weights``."""
    own = meta.get(SPLIT_KEY) or UNRECORDED
    return sorted({own, *parent_splits(meta)})


def parent_splits(meta: Mapping[str, str]) -> list[str]:
    """The splits a file's ancestors trained on, as recorded (empty for a run that started from scratch)."""
    return [s for s in meta.get(PARENT_SPLITS_KEY, "").split(",") if s]


def lineage_metadata(parent: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata a run continuing ``parent`` (a LoRA file's metadata; None: no parent) records."""
    return {} if parent is None else {PARENT_SPLITS_KEY: ",".join(splits_seen(parent))}


__all__ = ["PARENT_SPLITS_KEY", "SPLIT_KEY", "UNRECORDED", "lineage_metadata", "parent_splits", "splits_seen"]
