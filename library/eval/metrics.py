"""Membership-inference metrics (ASR, AUC, TPR@FPR, bootstrap CIs) and FID / KID maths.

Conventions (``docs/evaluation.md``, "Metric conventions"):

* ``labels``: 1 = member (the positive class), 0 = non-member; ``scores``: higher = more likely member.
* A threshold τ predicts "member" when ``score >= τ`` (as ``sklearn.metrics.roc_curve``).
* numpy (or anything ``np.asarray`` accepts) in, Python floats out.
* Bad data a user can cause (one class missing, NaN scores) raises :class:`library.errors.DataError`.

The paper (Luo et al., AAAI 2025, Table 1) reports ASR (argmax accuracy of the attack model h'),
the AUC deviation |AUC − 0.5| / 0.5 and TPR at 5% FPR, plus FID and KID for image quality.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import scipy.linalg

from library.errors import DataError

# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.dtype == bool:
        y = y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError("membership labels must be 0 (non-member) or 1 (member)")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError(
            f"MIA metrics need both members and non-members, got {n_pos} members and {y.size - n_pos} non-members"
        )
    if not np.isfinite(s).all():
        raise DataError(f"{int((~np.isfinite(s)).sum())} attack scores are NaN or infinite")
    return y, s


# --------------------------------------------------------------------------------------------------
# ROC and AUC
# --------------------------------------------------------------------------------------------------


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full ROC curve: ``(fpr, tpr, thresholds)``, thresholds decreasing.

    One point per distinct score (tied scores move together, so no point splits a tie) plus a first
    point (0, 0) at threshold +inf. Point k is the operating point of "member iff score >= thresholds[k]".
    Equals ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``.
    """
    y, s = _labels_scores(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Index of the last element of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (trapezoidal on the full curve).

    Equals P(score_member > score_nonmember) + ½·P(tie), the Mann-Whitney statistic.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def auc_deviation(auc: float) -> float:
    """|AUC − 0.5| / 0.5, the paper's Table 1 "AUC" column (0 = chance, 1 = perfect either way)."""
    return abs(float(auc) - 0.5) / 0.5


def tpr_at_fpr(labels, scores, fpr_target: float) -> float | None:
    """TPR at the largest achievable FPR ≤ ``fpr_target`` on the ROC curve (conservative convention).

    This is convention (a) of mia-anchors.md §3.1 (privacy meter, LiRA, Hu & Pang): the reported point
    never exceeds the FPR budget α; since TPR is non-decreasing along the curve, it is also the best TPR
    with FPR ≤ α.

    Returns ``None`` ("n/a") when α cannot be measured: with N non-members the smallest non-zero FPR is
    1/N, so when **1/N > α** (α·N < 1) the only admissible point would be FPR = 0 and the number would
    say nothing about α. E.g. 200 non-members: 5% and 1% are measurable (at 1% on 2 false positives
    only), 0.1% is n/a.
    """
    alpha = float(fpr_target)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"fpr_target must be in (0, 1], got {fpr_target}")
    fpr, tpr, _ = roc_curve(labels, scores)
    n_neg = int(np.sum(np.asarray(labels).reshape(-1) == 0))
    # Tolerances make exact products like 0.01·100 and 0.05·20 count as measurable / admissible.
    if alpha * n_neg < 1.0 - 1e-9:
        return None
    idx = np.flatnonzero(fpr <= alpha + 1e-12)[-1]
    return float(tpr[idx])


def threshold_at_fpr(labels, scores, fpr_target: float) -> float:
    """The threshold τ of the ROC point used by :func:`tpr_at_fpr` (member iff score >= τ).

    For calibrated evaluation (mia-anchors.md §3.3): fit τ on calibration data, then apply it to test
    data with :func:`rates_at_threshold`. May be +inf when no finite threshold keeps FPR ≤ α.
    """
    alpha = float(fpr_target)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"fpr_target must be in (0, 1], got {fpr_target}")
    fpr, _, thresholds = roc_curve(labels, scores)
    return float(thresholds[np.flatnonzero(fpr <= alpha + 1e-12)[-1]])


def rates_at_threshold(labels, scores, threshold: float) -> tuple[float, float]:
    """(TPR, FPR) of the decision "member iff score >= threshold"."""
    y, s = _labels_scores(labels, scores)
    pred = s >= threshold
    return float(pred[y == 1].mean()), float(pred[y == 0].mean())


# --------------------------------------------------------------------------------------------------
# Accuracy-type metrics
# --------------------------------------------------------------------------------------------------


def balanced_accuracy(labels, predictions) -> float:
    """(TPR + TNR) / 2 of binary predictions (1 = member); equals accuracy on a balanced set."""
    y, p = _labels_scores(labels, predictions)
    p = p != 0
    return float(0.5 * (p[y == 1].mean() + (~p[y == 0]).mean()))


def accuracy_at_threshold(labels, scores, threshold: float) -> float:
    """Plain accuracy of "member iff score >= threshold" over all samples."""
    y, s = _labels_scores(labels, scores)
    return float(((s >= threshold) == (y == 1)).mean())


def best_threshold(labels, scores) -> tuple[float, float]:
    """The threshold maximising balanced accuracy, and that balanced accuracy (an oracle on this data).

    Candidates are the ROC points at finite thresholds (every distinct score; "predict nobody" has
    the same balanced accuracy 0.5 as "predict everybody", the lowest score). Ties in balanced
    accuracy go to the highest threshold (the lowest FPR). The returned τ is a real number usable on
    other data with "member iff score >= τ": the midpoint between the chosen score and the next lower
    distinct score (or the lowest score itself), so it makes the same decisions here and does not sit
    on a training score.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # drop the +inf point
    bal = 0.5 * (tpr + 1.0 - fpr)
    k = int(np.argmax(bal))  # first maximum = highest threshold
    tau = float(thresholds[k])
    if k + 1 < thresholds.size:
        lower = float(thresholds[k + 1])
        mid = 0.5 * (tau + lower)
        if lower < mid <= tau:  # adjacent floats can round the midpoint onto `lower`
            tau = mid
    return tau, float(bal[k])


def argmax_asr(labels, member_probs) -> float:
    """The paper's ASR: accuracy of h' deciding "member" when p(member) > 0.5 (its argmax).

    p = 0.5 exactly counts as non-member, as ``torch.argmax`` over equal logits picks class 0. This is
    plain accuracy, so on an unbalanced test split (Pokemon 233/200) it is not balanced accuracy.
    """
    y, p = _labels_scores(labels, member_probs)
    if ((p < 0) | (p > 1)).any():
        raise ValueError("member_probs must be probabilities in [0, 1]")
    return float(((p > 0.5) == (y == 1)).mean())


# --------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# FID / KID maths (features come from elsewhere: Inception, CLIP, or a labelled substitute)
# --------------------------------------------------------------------------------------------------


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy warns (and may return inf/nan) on singular input; the caller retries with an offset.
        warnings.simplefilter("ignore")
        return scipy.linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when the features are Inception's).

    d² = ||mu1 − mu2||² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2}).

    The product sigma1·sigma2 of two PSD matrices has real non-negative eigenvalues, but with fewer
    samples than dimensions the covariances are singular and ``sqrtm`` can fail; then ``eps`` is added to
    both diagonals and the root recomputed (the usual offset). Round-off leaves a small imaginary part,
    dropped when it is below 1e-3 relative to the largest real entry; a larger one raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean.real).max()))
        imag = float(np.abs(covmean.imag).max())
        if imag > 1e-3 * scale:
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    # Round-off can make identical distributions come out as -1e-12.
    return float(max(value, 0.0))


def frechet_distance_from_features(real, fake) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [n, d] (unbiased covariances, as
    pytorch-fid / torchmetrics), equal to :func:`frechet_distance` of their moments but computed without ``sqrtm``.

    With n ≤ d the covariances are rank-deficient and the value is dominated by small-sample bias (the paper
    deems FID on 768-d features N/A below 768 samples); prefer :func:`kid` there.

    The only hard term is Tr((S1 S2)^1/2). With centred features A [n1, d], B [n2, d] and S1 = AᵀA / (n1 - 1),
    S2 = BᵀB / (n2 - 1), the non-zero eigenvalues of S1 S2 are the squared singular values of
    A Bᵀ / sqrt((n1 - 1)(n2 - 1)), so the term is that matrix's nuclear norm: exact, real, and an n1 x n2 SVD
    instead of scipy's ``sqrtm`` of a 2048 x 2048 product (~25 s on one core, and it returns a spurious
    imaginary part when n < d, i.e. for every sample set of a few hundred images). When both sets are larger
    than d, the d x d form is used instead: the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD, ``eigh``).
    """
    a, b = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [n, d] with the same d, got {a.shape} and {b.shape}")
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    if n1 < 2 or n2 < 2:
        raise DataError(f"Fréchet distance needs at least 2 samples per set, got {n1} and {n2}")
    diff = a.mean(0) - b.mean(0)
    ac, bc = a - a.mean(0), b - b.mean(0)
    trace1, trace2 = float((ac * ac).sum()) / (n1 - 1), float((bc * bc).sum()) / (n2 - 1)
    if min(n1, n2) <= d:
        cross = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = ac.T @ ac / (n1 - 1), bc.T @ bc / (n2 - 1)
        w, v = np.linalg.eigh(s1)
        root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0.0, None)).sum()
    # Round-off can make identical sets come out as -1e-12.
    return float(max(diff @ diff + trace1 + trace2 - 2.0 * cross, 0.0))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** degree


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    """Unbiased MMD² estimate with k(x, y) = (x·y/d + 1)^degree, equal-size samples (Bińkowski et al. 2018)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _poly_kernel(x, x, degree), _poly_kernel(y, y, degree), _poly_kernel(x, y, degree)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(
    f_real,
    f_fake,
    subset_size: int | None = None,
    n_subsets: int = 100,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased polynomial-kernel MMD² over random subsets.

    Each of ``n_subsets`` rounds draws ``subset_size`` real and ``subset_size`` fake feature vectors
    without replacement and computes the unbiased MMD² with k(x, y) = (x·y/d + 1)^degree (Bińkowski et
    al. 2018; the maths of torchmetrics' ``KernelInceptionDistance``). ``subset_size`` defaults to
    min(1000, n_real, n_fake) so small sets work. The estimate is unbiased, so it can be slightly
    negative for matching distributions; the std is the population std (ddof=0) over subsets.
    """
    a, b = np.asarray(f_real, np.float64), np.asarray(f_fake, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [n, d] with the same d, got {a.shape} and {b.shape}")
    n_max = min(a.shape[0], b.shape[0])
    m = min(1000, n_max) if subset_size is None else int(subset_size)
    if m < 2 or m > n_max:
        raise DataError(
            f"KID subset size must be between 2 and the smaller set size ({n_max}), got {m}; "
            "generate or provide more images, or lower the subset size"
        )
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    rng = np.random.default_rng(seed)
    vals = np.array(
        [
            _mmd2_unbiased(
                a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)], degree
            )
            for _ in range(n_subsets)
        ]
    )
    return float(vals.mean()), float(vals.std())


def _kid_or_none(real: np.ndarray, fake: np.ndarray, n_subsets: int, seed: int) -> tuple[float | None, float | None]:
    if min(real.shape[0], fake.shape[0]) < 2:
        return None, None
    return kid(real, fake, n_subsets=n_subsets, seed=seed)


def feature_metrics(names: Mapping[str, tuple[str, str | None]], real: Mapping[str, np.ndarray],
                    fake: Mapping[str, np.ndarray], n_subsets: int = 100, seed: int = 0) -> dict[str, float | None]:
    """Fréchet distance and KID (mean, ``_std``) of generated vs real feature sets, several at once.

    ``names`` maps each feature key of ``real`` / ``fake`` to its (Fréchet name, KID name or None) (an
    extractor's ``metrics``); KID is None when a set has fewer than 2 samples.
    """
    out: dict[str, float | None] = {}
    for key, (fd_name, kid_name) in names.items():
        out[fd_name] = frechet_distance_from_features(real[key], fake[key])
        if kid_name is not None:
            out[kid_name], out[f"{kid_name}_std"] = _kid_or_none(real[key], fake[key], n_subsets, seed)
    return out


def real_vs_real_floor(names: Mapping[str, tuple[str, str | None]], real: Mapping[str, np.ndarray],
                       n_subsets: int = 100, seed: int = 0) -> dict[str, float | None]:
    """:func:`feature_metrics` between two halves of the reference set (a fixed permutation); empty below 4 samples.

    KID is unbiased, so its floor is what real images score against real ones. Fréchet distances are biased
    upward at small n, so the FD floor (half vs half) is above what the full reference set against as many real
    images would give, and can exceed the models' FDs: it is no "as good as it gets" for FD."""
    n = next(iter(real.values())).shape[0]
    if n < 4:
        return {}
    order = np.random.default_rng(seed).permutation(n)
    first, second = order[: n // 2], order[n // 2:]
    return feature_metrics(names, {k: v[first] for k, v in real.items()}, {k: v[second] for k, v in real.items()},
                           n_subsets, seed)


__all__ = [
    "accuracy_at_threshold",
    "argmax_asr",
    "auc_deviation",
    "balanced_accuracy",
    "best_threshold",
    "feature_metrics",
    "frechet_distance",
    "frechet_distance_from_features",
    "kid",
    "rates_at_threshold",
    "real_vs_real_floor",
    "roc_auc",
    "roc_curve",
    "threshold_at_fpr",
    "tpr_at_fpr",
]
