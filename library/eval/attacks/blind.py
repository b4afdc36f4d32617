"""The blind baseline (Das et al. 2024, "Blind baselines beat membership inference attacks for foundation
models"): a membership "attack" that never looks at the model.

A classifier fitted on D_aux sees only statistics of the image and its caption. If members and non-members are
drawn i.i.d. from one dataset, nothing in those statistics tells them apart and its AUC sits at 0.5; if it does
better, the split leaks (members and non-members differ in distribution) and every attack's number is suspect.
It is reported as the *floor* row (``floor = True``): never a model's worst case. It runs per model (the probe
engine is per model) but its features are the same for every model.

Features (:data:`BLIND_FEATURES`; our choice, in the spirit of Das et al.'s hand-made features): per-channel
pixel mean and standard deviation, an 8-bin grey-level histogram, horizontal and vertical gradient energy and an
edge density, the grey image average-pooled to 4 x 4 (low frequencies), and the caption's length in characters
and words. Classifier: the standardised logistic regression of the image-space attacks
(:func:`~library.eval.attacks.image_distance.fit_logistic`): with a few dozen D_aux samples a boosted-tree
classifier cannot split at its default leaf sizes. 0 UNet queries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from library.eval.attacks.base import Attack, AttackInputs, ScoreSet, check_labels
from library.eval.attacks.image_distance import classifier_score_set, fit_logistic
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig

HISTOGRAM_BINS = 8
POOLED = 4  # low-frequency grid: the grey image average-pooled to POOLED x POOLED
EDGE_THRESHOLD = 0.1  # grey-level step (images in [0, 1]) that counts as an edge
BLIND_FEATURES = (
    [f"{stat}_{c}" for stat in ("mean", "std") for c in "rgb"]
    + [f"hist_{b}" for b in range(HISTOGRAM_BINS)]
    + ["grad_energy_x", "grad_energy_y", "edge_density"]
    + [f"pooled_{i}" for i in range(POOLED * POOLED)]
    + ["caption_chars", "caption_words"]
)


def blind_features(images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """[B, F] float64: the :data:`BLIND_FEATURES` of images [B, 3, R, R] in [-1, 1] and their captions."""
    x = (images.detach().double().cpu() + 1.0) / 2.0
    grey = x.mean(dim=1)  # [B, R, R]
    hist = torch.stack([torch.histc(g, bins=HISTOGRAM_BINS, min=0.0, max=1.0) / g.numel() for g in grey])
    dx, dy = grey[:, :, 1:] - grey[:, :, :-1], grey[:, 1:, :] - grey[:, :-1, :]
    edges = ((dx[:, :-1, :].abs() > EDGE_THRESHOLD) | (dy[:, :, :-1].abs() > EDGE_THRESHOLD)).double()
    pooled = F.adaptive_avg_pool2d(grey[:, None], POOLED).flatten(1)
    text = torch.tensor([[len(c), len(c.split())] for c in captions], dtype=torch.float64).reshape(len(captions), 2)
    columns = [x.mean(dim=(2, 3)), x.std(dim=(2, 3)), hist, dx.square().mean(dim=(1, 2))[:, None],
               dy.square().mean(dim=(1, 2))[:, None], edges.mean(dim=(1, 2))[:, None], pooled, text]
    return torch.cat(columns, dim=1)


class BlindProbe(Probe):
    """``features`` [B, F]: the image and caption statistics of :func:`blind_features` (no model query)."""

    name = "blind"

    def settings(self) -> dict[str, Any]:
        return {"features": list(BLIND_FEATURES)}

    def queries_per_sample(self) -> float:
        return 0.0

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        return {"features": blind_features(ctx.images(), ctx.captions)}


class BlindAttack(Attack):
    name = "blind"
    floor = True
    description = "logistic regression on D_aux over image and caption statistics only (no model): the floor row"
    threat_model = "none: the query image and caption only, no model access (a sanity floor)"
    citation = ("Das et al. 2024, Blind baselines beat membership inference attacks for foundation models "
                "(arXiv:2406.16201)")

    def __init__(self, seed: int = 0) -> None:
        self.probe = BlindProbe()
        self.seed = int(seed)
        self.model: Any = None

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> BlindAttack:
        return cls(config.seed)

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "classifier": "logistic regression (C=1, standardised)"}

    def features(self, inputs: AttackInputs) -> np.ndarray:
        return np.asarray(inputs.target.probe(self.probe.name)["features"], dtype=np.float64)

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        self.model = fit_logistic(self.features(aux), check_labels(labels, len(aux)), self.seed)

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        if self.model is None:
            raise RuntimeError("the blind attack scored before fit")
        return [classifier_score_set(self.name, self.model, self.features(inputs))]


__all__ = ["BLIND_FEATURES", "BlindAttack", "BlindProbe", "blind_features"]
