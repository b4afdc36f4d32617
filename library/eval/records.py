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

EVAL_SPLITS = ("member_aux", "nonmember_aux", "member_test", "nonmember_test")
BASE_NAME = "base"


@dataclass
class ModelSpec:
    """One evaluated model: the base (``lora_path`` None) or base + one LoRA file."""

    name: str
    lora_path: Path | None = None
    lora_sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


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


__all__ = ["BASE_NAME", "EVAL_SPLITS", "EvalResult", "EvalSamples", "ModelSpec"]
