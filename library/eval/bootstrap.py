"""Percentile bootstrap confidence intervals of the membership metrics (stratified: members and non-members
resampled apart, so every resample keeps both classes and their balance).

:func:`bootstrap_ci` takes any metric and recomputes it per resample; :func:`bootstrap_auc_tpr_ci` gives the two the
report carries on every row (AUC, TPR at 5 % FPR) for all resamples at once, from the same resamples.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from library.errors import DataError
from library.eval.metrics import _labels_scores, tpr_at_fpr


def bootstrap_ci(
    labels,
    scores,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
) -> tuple[float, float] | None:
    """Percentile bootstrap (1 − alpha) confidence interval of ``metric_fn(labels, scores)``.

    ``stratified=True`` resamples members and non-members separately (with replacement, keeping both
    counts), so every resample has both classes and the same class balance as the data. With
    ``stratified=False`` the whole set is resampled and resamples missing a class are skipped.
    Resamples where ``metric_fn`` returns None (e.g. an n/a TPR@FPR) are skipped; returns None when all
    are. Deterministic for a given ``seed``.
    """
    _check_bootstrap(n_boot, alpha)
    y, s = _labels_scores(labels, scores)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values: list[float] = []
    for _ in range(n_boot):
        if stratified:
            idx = _stratified_draw(rng, pos, neg)
        else:
            idx = rng.integers(0, y.size, y.size)
            n_pos = int(y[idx].sum())
            if n_pos == 0 or n_pos == idx.size:
                continue
        v = metric_fn(y[idx], s[idx])
        if v is not None:
            values.append(float(v))
    if not values:
        return None
    lo, hi = np.quantile(np.asarray(values), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def _check_bootstrap(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _stratified_draw(rng: np.random.Generator, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """One stratified resample: members then non-members, each drawn with replacement at its own count."""
    return np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])


def bootstrap_auc_tpr_ci(labels, scores, fpr_target: float = 0.05, n_boot: int = 1000, alpha: float = 0.05,
                         seed: int = 0) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """The stratified percentile bootstrap CIs of :func:`roc_auc` and :func:`tpr_at_fpr` at ``fpr_target``, both
    from the resamples :func:`bootstrap_ci` draws with ``seed`` (the same numbers up to float rounding), computed for
    all resamples at once: AUC as the Mann-Whitney statistic of average ranks, the TPR against the (k+1)-th highest
    non-member score, k the false positives ``fpr_target`` admits. The TPR CI is None where :func:`tpr_at_fpr` is n/a.
    ~100x faster than one ROC curve per resample, which made the CIs most of an evaluation's attack time.
    """
    from scipy.stats import rankdata  # noqa: PLC0415 - scipy is imported by sklearn anyway

    _check_bootstrap(n_boot, alpha)
    y, s = _labels_scores(labels, scores)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        raise DataError("a bootstrap CI needs members and non-members")
    resampled = s[np.stack([_stratified_draw(rng, pos, neg) for _ in range(n_boot)])]  # [B, n]: members first
    member, nonmember = resampled[:, :pos.size], resampled[:, pos.size:]
    ranks = rankdata(resampled, axis=1)  # ties get their average rank: AUC counts a tie as 1/2
    auc = (ranks[:, :pos.size].sum(1) - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size)
    quantiles = [alpha / 2.0, 1.0 - alpha / 2.0]
    auc_ci = tuple(float(q) for q in np.quantile(auc, quantiles))
    if tpr_at_fpr(y, s, fpr_target) is None:
        return auc_ci, None
    # The largest number of false positives k with k / n_neg <= fpr_target (tpr_at_fpr's tolerance); the best
    # admissible threshold lies just above the (k+1)-th highest non-member score.
    k = int(np.sum(np.arange(1, neg.size + 1) / neg.size <= fpr_target + 1e-12))
    if k >= neg.size:
        tpr = np.ones(n_boot)
    else:
        cut = -np.sort(-nonmember, axis=1)[:, k]
        tpr = (member > cut[:, None]).mean(1)
    return auc_ci, tuple(float(q) for q in np.quantile(tpr, quantiles))


__all__ = ["bootstrap_auc_tpr_ci", "bootstrap_ci"]
