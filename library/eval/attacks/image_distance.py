"""What the image-space attacks share: image distances, the feature extractors, and the small classifier.

The black-box attack (Wu et al. 2022, :mod:`~library.eval.attacks.blackbox`), the reconstruction attack (Pang &
Wang, NDSS 2025, :mod:`~library.eval.attacks.reconstruction`) and ReDiffuse (:mod:`~library.eval.attacks.rediffuse`,
which adds :func:`ssim`) all reduce a query image to its distances to some
model-made images: pixel MSE (images in [-1, 1]), VAE-latent MSE (free: the latents exist anyway) and the mean
squared difference of features in each space the evaluation's weights give (:mod:`library.eval.extractors`:
``digits`` via ``--digit_feature_weights``, ``inception`` via ``--inception_weights``). One probe output per
distance, named ``pixel``, ``latent``, ``feat_<extractor>_<key>``; a small distance = member.

The attack on those distances (:class:`DistanceClassifierAttack`): a logistic regression on D_aux over the
negated log distances -> p(member) (the headline, kind ``classifier``), plus each single distance as a
non-headline threshold variant (its threshold fitted on D_aux). The blind baseline (:mod:`.blind`) uses the
same classifier (:func:`fit_logistic`) on image/caption statistics.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from library.eval.attacks.base import (
    Attack,
    AttackInputs,
    FeatureSet,
    ScoreSet,
    check_labels,
)
from library.eval.extractors import EXTRACTORS, FeatureExtractor, extract_features
from library.eval.metrics import best_threshold

if TYPE_CHECKING:
    from library.eval.config import EvalConfig
    from library.eval.probes import Probe

# The probe output holding each sample's UNet-query cost (the same value on every row): it is how the cost that a
# probe measures in the feature process reaches the attack (and report.json) in the attack process.
COST_OUTPUT = "queries_per_sample"
LOG_FLOOR = 1e-12  # distances are >= 0; log(d + floor) keeps an exact match finite


# ------------------------------------------------------------------------------------------------ extractors


@functools.lru_cache(maxsize=None)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    from library.fileio import sha256_file  # noqa: PLC0415

    return sha256_file(path)


@functools.lru_cache(maxsize=None)
def _load(name: str, path: str, device: str) -> FeatureExtractor:
    # One copy per process and device: attacks are built per model (feature and attack stages).
    return EXTRACTORS[name].load(path, torch.device(device))


def given_extractors(config: EvalConfig) -> dict[str, str]:
    """``{extractor: weight file}`` for every registered extractor whose weights the evaluation gives."""
    return {name: str(getattr(config, entry.weights_option)) for name, entry in EXTRACTORS.items()
            if getattr(config, entry.weights_option)}


def load_image_extractors(config: EvalConfig, device: torch.device | str) -> tuple[list[FeatureExtractor], dict[str, str]]:
    """(every extractor whose weights are given, loaded; ``{name: sha256 of its weights}`` for cache keys).

    Unlike :func:`library.eval.extractors.load_extractors` this ignores ``--quality_features``: an image-space
    attack uses every feature space it is given. A missing or foreign file fails here (one ModelError line),
    when the attack is built, before any long computation."""
    extractors, identity = [], {}
    for name, path in given_extractors(config).items():
        extractors.append(_load(name, path, str(torch.device(device))))
        stat = os.stat(path)
        identity[name] = _weights_sha256(path, stat.st_size, stat.st_mtime_ns)
    return extractors, identity


# ------------------------------------------------------------------------------------------------ distances


@dataclass
class ImageSet:
    """Images [N, 3, R, R] in [-1, 1], their SD latents [N, C, h, w] and their features (all fp32 on the CPU)."""

    images: torch.Tensor
    latents: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # "feat_<extractor>_<key>" -> [N, D]

    def subset(self, index: Sequence[int]) -> ImageSet:
        rows = torch.as_tensor(list(index), dtype=torch.long)
        return ImageSet(self.images[rows], self.latents[rows], {k: v[rows] for k, v in self.features.items()})

    def spaces(self) -> dict[str, torch.Tensor]:
        """Every space a distance is measured in, flattened to [N, D]: pixel, latent, then the features."""
        return {"pixel": self.images.flatten(1), "latent": self.latents.flatten(1), **self.features}


def describe(images: torch.Tensor, latents: torch.Tensor, extractors: Sequence[FeatureExtractor],
             device: torch.device) -> ImageSet:
    """An :class:`ImageSet`: ``images`` and ``latents`` as fp32 CPU tensors plus every extractor's features."""
    images = images.detach().float().cpu()
    features = {}
    for extractor in extractors:
        for key, value in extract_features(extractor, images, device).items():
            features[f"feat_{extractor.name}_{key}"] = torch.from_numpy(value).float()
    return ImageSet(images, latents.detach().float().cpu(), features)


def mse_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[A, B]: the mean squared difference between every row of ``a`` [A, D] and of ``b`` [B, D] (float64).

    ``cdist`` rather than broadcasting: an [A, B, D] difference at 512 px would take gigabytes."""
    d = torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return d.square() / a.shape[1]


def nearest_distances(query: ImageSet, candidates: ImageSet) -> dict[str, torch.Tensor]:
    """Per query row and space: the distance to its nearest candidate (each space picks its own nearest)."""
    others = candidates.spaces()
    return {name: mse_matrix(x, others[name]).min(dim=1).values for name, x in query.spaces().items()}


def paired_distances(query: ImageSet, other: ImageSet) -> dict[str, torch.Tensor]:
    """Per row and space: the mean squared difference between ``query`` row i and ``other`` row i."""
    others = other.spaces()
    return {name: (x.double() - others[name].double()).square().mean(dim=1) for name, x in query.spaces().items()}


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> torch.Tensor:
    """[N] float64: the structural similarity of images ``a`` and ``b`` [N, C, H, W] in [-1, 1], as
    ``skimage.metrics.structural_similarity(x, y, data_range=1, channel_axis=-1)`` computes it on the images
    mapped to [0, 1]: a uniform ``window`` x ``window`` filter (smaller for a smaller image), K1 0.01, K2 0.03,
    sample covariances, averaged over the window positions inside the image and over the channels."""
    x, y = (a.double() + 1.0) / 2.0, (b.double() + 1.0) / 2.0
    window = min(window, x.shape[-2], x.shape[-1])
    window -= 1 - window % 2  # odd, as skimage requires
    pool = functools.partial(torch.nn.functional.avg_pool2d, kernel_size=window, stride=1)
    mx, my = pool(x), pool(y)
    n = window * window
    unbiased = n / (n - 1) if n > 1 else 1.0
    vx, vy = unbiased * (pool(x * x) - mx * mx), unbiased * (pool(y * y) - my * my)
    vxy = unbiased * (pool(x * y) - mx * my)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# ------------------------------------------------------------------------------------------------ classifier


def fit_logistic(x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """A standardised L2 logistic regression (C = 1) fitted on ``x`` [n, F], ``y`` (1 = member); deterministic."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - scikit-learn only when fitting
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed))
    return model.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64))


def classifier_score_set(attack: str, model: Any, x: np.ndarray, info: dict[str, Any] | None = None, *,
                         variant: str = "classifier", headline: bool = True) -> ScoreSet:
    """The :class:`ScoreSet` of a fitted classifier (by default the attack's headline): scores = its logit (no ties
    from saturated probabilities), member_probs = p(member); fitted on D_aux only, so its ASR is the honest one."""
    x = np.asarray(x, dtype=np.float64)
    return ScoreSet(attack=attack, variant=variant, scores=np.asarray(model.decision_function(x), np.float64),
                    kind="classifier", member_probs=np.asarray(model.predict_proba(x)[:, 1], np.float64),
                    checkpoint="honest", headline=headline, info=dict(info or {}))


class DistanceClassifierAttack(Attack):
    """An attack on one probe's distances (every output but :data:`COST_OUTPUT`; small = member): a logistic
    regression over the negated log distances (headline) and each distance as a threshold variant."""

    def __init__(self, probe: Probe, seed: int = 0) -> None:
        self.probe = probe
        self.seed = int(seed)
        self.model: Any = None
        self.thresholds: dict[str, float] = {}
        self.measured_cost: float | None = None

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "classifier": "logistic regression (C=1, standardised) on -log distances"}

    def queries_per_sample(self) -> float:
        """The cost the probe measured on this model's samples once fitted, else the probe's nominal cost."""
        return self.measured_cost if self.measured_cost is not None else self.probe.queries_per_sample()

    def distances(self, features: FeatureSet) -> dict[str, np.ndarray]:
        outputs = features.probe(self.probe.name)
        return {name: np.asarray(v, np.float64).reshape(-1) for name, v in sorted(outputs.items()) if name != COST_OUTPUT}

    @staticmethod
    def design(distances: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([-np.log(d + LOG_FLOOR) for d in distances.values()], axis=1)

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        y = check_labels(labels, len(aux))
        distances = self.distances(aux.target)
        self.model = fit_logistic(self.design(distances), y, self.seed)
        self.thresholds = {name: best_threshold(y, 0.0 - d)[0] for name, d in distances.items()}
        cost = aux.target.probe(self.probe.name).get(COST_OUTPUT)
        self.measured_cost = None if cost is None else float(np.mean(cost))

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        if self.model is None:
            raise RuntimeError(f"attack '{self.name}' scored before fit")
        distances = self.distances(inputs.target)
        out = [classifier_score_set(self.name, self.model, self.design(distances),
                                    {"features": [f"-log {name}" for name in distances]})]
        for name, d in distances.items():
            out.append(ScoreSet(attack=self.name, variant=name, scores=0.0 - d, kind="threshold",
                                threshold=self.thresholds.get(name)))
        return out


__all__ = ["COST_OUTPUT", "DistanceClassifierAttack", "ImageSet", "classifier_score_set", "describe",
           "fit_logistic", "given_extractors", "load_image_extractors", "mse_matrix", "nearest_distances",
           "paired_distances", "ssim"]
