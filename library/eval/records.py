"""The records one evaluation passes between its stages: the models, the samples and the result.

Plain dataclasses with no behaviour beyond indexing, shared by the orchestrator (:mod:`library.eval.run`), the
quality metrics and the report, so none of those imports another just for a type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from library.eval.attacks.base import ScoreSet
    from library.eval.config import EvalConfig
    from library.eval.features import ModelFeatures, Sample
    from library.eval.unet_weights import UNetWeights
    from networks.lora_io import LoraSource

EVAL_SPLITS = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")
BASE_NAME = "base"


MODEL_KINDS = ("base", "lora", "unet")


@dataclass
class ModelSpec:
    """One evaluated model: the base (``lora_path`` and ``unet`` None), base + one LoRA file, or the base model
    with a fully fine-tuned UNet (``unet``, :class:`library.eval.unet_weights.UNetWeights`) in place of its own."""

    name: str
    lora_path: Path | None = None
    lora_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    unet: UNetWeights | None = None
    # The LoRA file as read, once, by library.eval.inputs.check_lora_layouts: every later stage applies it from here
    lora_read: LoraSource | None = field(default=None, repr=False, compare=False)

    @property
    def lora(self) -> LoraSource | Path | None:
        """The LoRA to apply: the file as read once (:attr:`lora_read`), else the file (None without a LoRA)."""
        return self.lora_read if self.lora_read is not None else self.lora_path

    @property
    def kind(self) -> str:
        """``base``, ``lora`` or ``unet`` (one of :data:`MODEL_KINDS`)."""
        return "unet" if self.unet is not None else "lora" if self.lora_path is not None else "base"

    @property
    def path(self) -> Path | None:
        """The LoRA file or the UNet folder / file given (None for the base model)."""
        return self.unet.path if self.unet is not None else self.lora_path

    @property
    def sha256(self) -> str | None:
        """What identifies the weights in caches and the report (the LoRA's or the UNet's weights sha256)."""
        return self.unet.sha256 if self.unet is not None else self.lora_sha256

    def record(self) -> dict[str, Any]:
        """The report's entry of this model (``lora_path`` / ``lora_sha256`` kept for older readers)."""
        return {"name": self.name, "kind": self.kind, "path": None if self.path is None else str(self.path),
                "sha256": self.sha256, "layout": None if self.unet is None else self.unet.layout,
                "text_encoder": None if self.unet is None else "own" if self.unet.text_encoder else "base",
                "lora_path": None if self.lora_path is None else str(self.lora_path),
                "lora_sha256": self.lora_sha256, "metadata": self.metadata}


@dataclass
class EvalSamples:
    """The samples attacked, in the order member_aux, nonmember_aux, member_test, nonmember_test."""

    samples: list[Sample]
    rel_paths: list[str]
    splits: list[str]
    labels: np.ndarray  # 1 = member

    @property
    def aux_index(self) -> np.ndarray:
        return np.flatnonzero(np.isin(self.splits, ("member_aux", "nonmember_aux")))

    @property
    def test_index(self) -> np.ndarray:
        return np.flatnonzero(np.isin(self.splits, ("member_test", "nonmember_test")))


@dataclass
class EvalResult:
    """Everything the report is written from."""

    config: EvalConfig
    models: list[ModelSpec]
    samples: EvalSamples
    features: dict[str, ModelFeatures]
    scores: dict[str, list[ScoreSet]]  # model name -> score sets over ALL samples
    rows: list[dict[str, Any]]  # one per (model, attack variant): metrics on D_te
    info: dict[str, Any]


__all__ = ["BASE_NAME", "EVAL_SPLITS", "MODEL_KINDS", "EvalResult", "EvalSamples", "ModelSpec"]
