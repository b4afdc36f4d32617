"""Privacy auditing from attack scores: the set-level audit (dataset inference) and the empirical epsilon.

Pure functions of numpy arrays (scipy for the test and the beta quantiles; no torch, no model).

**Set-level audit** (issue 15 item 8; the data owner's question "was my collection used?", answered as dataset
inference does, e.g. Dubinski et al., CDI, CVPR 2025): the per-sample scores of a suspect set against those of
known non-members, one-sided Mann-Whitney U test (``scipy.stats.mannwhitneyu``, alternative "greater": the
suspects score higher, i.e. look like members; scipy's default method: exact for small samples without ties,
else the normal approximation with continuity correction) -> a p-value. *Images needed*: the smallest n
(from :data:`MIN_SET_SIZE` up) such that the **median** p-value over :data:`N_SUBSETS` seeded random
n-subsets of the suspect set (each against all the known non-members) is below alpha; found by bisection, which
assumes the median p falls with n (it does in expectation); None ("not reached") when the whole suspect set
does not reach alpha. A model's audit runs on its worst-case attack, the best of k attacks on the same D_te:
the p-value is multiplied by k and the images needed are counted at alpha / k (Bonferroni), and the honest
epsilon of that attack uses Clopper-Pearson intervals at confidence 1 - 0.05 / k, so that the choice does not
make a leak-free model look leaky (uncorrected, the best of 11 null attacks reaches p < 0.05 in ~40 % of draws).

**Empirical epsilon** (issue 15 item 9; Jagielski et al. 2020, "Auditing differentially private machine
learning"; Nasr et al. 2021, "Adversary instantiation"): an attack's decision on D_te has a TPR and an FPR;
(epsilon, delta)-DP implies TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta, so

    eps >= max( log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo)) ),  floored at 0,

with TPR_lo and FPR_hi the bounds of two-sided Clopper-Pearson intervals at :data:`CONFIDENCE` (each bound is
a one-sided 97.5 % bound; both terms use the same two bounds, so the maximum holds with probability >= 95 %).
Note the second term: the numerator uses the *lower* bound of TNR (1 - FPR_hi) and the denominator the *upper*
bound of FNR (1 - TPR_lo), the conservative ends. "honest": the decision rule fitted on D_aux (a threshold
attack's threshold, ``score >= threshold``; a classifier's ``p(member) > 0.5``, its argmax as in the paper's
ASR). "oracle": the maximum over every threshold on D_te: multiple testing on the evaluation set, optimistic,
not a valid bound; a labelled extra.

**Worst case at chance?** A model's worst case is the highest AUC over ~10 attacks on the same D_te, so it sits
above 0.5 with no membership signal at all, and with ten attacks some 95 % CI excludes 0.5 in up to 40 % of
leak-free models by chance alone. :func:`worst_case_null` answers "is there *any* signal in the suite?" with one
permutation test: under H0 (no attack's score depends on membership) the member labels of D_te are exchangeable,
so the same random relabelling applied to every attack at once draws the null distribution of the maximum AUC,
attacks' correlations included; the p-value is exact up to Monte Carlo error. A model trained on neither
set (the demo's base: members and non-members are i.i.d. draws from one pool) satisfies H0 by construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from scipy import stats

from library.eval.summary import dp_budget, worst_case, worst_case_candidates

if TYPE_CHECKING:
    from library.eval.attacks.base import ScoreSet

CONFIDENCE = 0.95  # two-sided Clopper-Pearson
N_SUBSETS = 200  # random subsets per set size in images_needed
MIN_SET_SIZE = 2  # the smallest suspect set tried: a set-level test needs a set
N_PERMUTATIONS = 10_000  # label shuffles of worst_case_null: p-values resolved to 1e-4
SUSPECT_SPLIT, NONMEMBER_SPLIT = "member_test", "nonmember_test"


# ------------------------------------------------------------------------------------------------ set-level audit


def mann_whitney_p(suspect: np.ndarray, nonmembers: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value that the ``suspect`` scores are stochastically greater than the
    ``nonmembers`` scores (higher score = member)."""
    suspect, nonmembers = np.asarray(suspect, float).ravel(), np.asarray(nonmembers, float).ravel()
    if suspect.size == 0 or nonmembers.size == 0:
        raise ValueError("the set-level test needs at least one suspect and one known non-member score")
    return float(stats.mannwhitneyu(suspect, nonmembers, alternative="greater").pvalue)


def subset_median_p(suspect: np.ndarray, nonmembers: np.ndarray, n: int, *, n_subsets: int = N_SUBSETS,
                    seed: int = 0) -> float:
    """The median one-sided p-value over ``n_subsets`` random n-subsets of ``suspect`` (each without
    replacement; seeded by ``(seed, n)``, so a size always gets the same subsets) against all ``nonmembers``."""
    suspect, nonmembers = np.asarray(suspect, float).ravel(), np.asarray(nonmembers, float).ravel()
    if not 1 <= n <= suspect.size:
        raise ValueError(f"subset size must be in [1, {suspect.size}], got {n}")
    if n == suspect.size:  # every subset is the whole set
        return mann_whitney_p(suspect, nonmembers)
    rng = np.random.default_rng([seed, n])
    picks = np.argsort(rng.random((n_subsets, suspect.size)), axis=1)[:, :n]
    others = np.broadcast_to(nonmembers, (n_subsets, nonmembers.size))
    p = stats.mannwhitneyu(suspect[picks], others, alternative="greater", axis=1).pvalue
    return float(np.median(p))


def images_needed(suspect: np.ndarray, nonmembers: np.ndarray, alpha: float, *, n_subsets: int = N_SUBSETS,
                  seed: int = 0) -> int | None:
    """The smallest suspect-set size n >= :data:`MIN_SET_SIZE` whose median p (:func:`subset_median_p`) is below
    ``alpha``, by bisection between MIN_SET_SIZE and the whole set; None when the whole set is not below it."""
    size = np.asarray(suspect).size

    def reached(n: int) -> bool:
        return subset_median_p(suspect, nonmembers, n, n_subsets=n_subsets, seed=seed) < alpha

    if size < MIN_SET_SIZE or not reached(size):
        return None
    lo, hi = MIN_SET_SIZE - 1, size  # invariant: hi reaches alpha, lo does not (MIN_SET_SIZE - 1: not tried)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reached(mid) else (mid, hi)
    return hi


def set_audit(suspect: np.ndarray, nonmembers: np.ndarray, alpha: float, *, n_attacks: int = 1,
              n_subsets: int = N_SUBSETS, seed: int = 0) -> dict[str, Any]:
    """The set-level audit of one attack's scores: p-value of the whole suspect set and images needed.

    ``n_attacks``: how many attacks this one was chosen from on the same data (the worst case is the best of the
    suite on D_te). Both numbers are Bonferroni-corrected for that choice: ``p_value`` is ``min(1, k p)`` and
    ``n_needed`` is the size whose median p is below ``alpha / k``; ``p_value_single`` is the test of this one
    attack as if it had been fixed in advance (optimistic after the choice)."""
    if n_attacks < 1:
        raise ValueError(f"n_attacks must be >= 1, got {n_attacks}")
    p_single = mann_whitney_p(suspect, nonmembers)
    return {"p_value": min(1.0, n_attacks * p_single), "p_value_single": p_single,
            "n_needed": images_needed(suspect, nonmembers, alpha / n_attacks, n_subsets=n_subsets, seed=seed),
            "alpha": alpha, "n_attacks": n_attacks, "n_suspect": int(np.asarray(suspect).size),
            "n_nonmembers": int(np.asarray(nonmembers).size), "n_subsets": n_subsets, "seed": seed,
            "test": "one-sided Mann-Whitney U (suspects score higher), Bonferroni over the n_attacks the attack was "
                    "chosen from; n_needed: median p over random n-subsets below alpha / n_attacks"}


# ------------------------------------------------------------------------------------------------ empirical epsilon


def clopper_pearson(k: Any, n: Any, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """The two-sided Clopper-Pearson interval of a binomial proportion: ``k`` successes of ``n`` (arrays
    broadcast). Lower bound 0 at k = 0, upper bound 1 at k = n."""
    k, n = np.asarray(k, float), np.asarray(n, float)
    tail = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(tail, np.maximum(k, 1e-300), n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1.0 - tail, k + 1, np.maximum(n - k, 1e-300)), 1.0)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def epsilon_from_counts(tp: Any, n_members: int, fp: Any, n_nonmembers: int, delta: float,
                        confidence: float = CONFIDENCE) -> Any:
    """The epsilon lower bound (module docstring) of a decision with ``tp`` of ``n_members`` members and ``fp``
    of ``n_nonmembers`` non-members called "member" (arrays broadcast); 0 when nothing can be concluded."""
    tpr_lo, _ = clopper_pearson(tp, n_members, confidence)
    _, fpr_hi = clopper_pearson(fp, n_nonmembers, confidence)
    tpr_lo, fpr_hi = np.asarray(tpr_lo), np.asarray(fpr_hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        # FPR_hi > 0 and 1 - TPR_lo > 0 always (Clopper-Pearson never claims certainty): both ratios are finite.
        forward = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        backward = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0) / (1.0 - tpr_lo))
    eps = np.maximum(np.maximum(forward, backward), 0.0)
    return float(eps) if eps.ndim == 0 else eps


def epsilon_at_decision(labels: np.ndarray, predictions: np.ndarray, delta: float,
                        confidence: float = CONFIDENCE) -> float:
    """The epsilon lower bound of fixed member predictions (bool) against ``labels`` (1 = member)."""
    y, pred = np.asarray(labels).astype(bool), np.asarray(predictions).astype(bool)
    return epsilon_from_counts(int((pred & y).sum()), int(y.sum()), int((pred & ~y).sum()), int((~y).sum()),
                               delta, confidence)


def epsilon_oracle(labels: np.ndarray, scores: np.ndarray, delta: float, confidence: float = CONFIDENCE) -> float:
    """The maximum epsilon lower bound over every threshold "member iff score >= tau" on these samples
    (optimistic: chosen on the data it is measured on)."""
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, float)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    cut = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # last index of each run of equal scores
    tp, fp = np.cumsum(y)[cut], np.cumsum(~y)[cut]
    return float(np.max(epsilon_from_counts(tp, int(y.sum()), fp, int((~y).sum()), delta, confidence), initial=0.0))


def corrected_confidence(n_attacks: int, confidence: float = CONFIDENCE) -> float:
    """The per-attack confidence at which the bound of the best of ``n_attacks`` attacks still holds with
    probability ``confidence`` (Bonferroni: every attack's bound holds at once)."""
    return 1.0 - (1.0 - confidence) / n_attacks


def honest_predictions(score_set: ScoreSet, index: np.ndarray) -> np.ndarray | None:
    """The decision fitted on D_aux, on the samples ``index``: p(member) > 0.5 for a classifier, score >=
    threshold for a threshold attack; None when the score set has neither."""
    if score_set.member_probs is not None:
        return np.asarray(score_set.member_probs)[index] > 0.5
    if score_set.threshold is not None:
        return np.asarray(score_set.scores)[index] >= score_set.threshold
    return None


def epsilon_lb(score_set: ScoreSet, labels: np.ndarray, index: np.ndarray, delta: float,
               confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Honest and oracle epsilon lower bounds of one score set on the samples ``index`` (D_te)."""
    y = np.asarray(labels)[index]
    pred = honest_predictions(score_set, index)
    return {"honest": None if pred is None else epsilon_at_decision(y, pred, delta, confidence),
            "oracle": epsilon_oracle(y, np.asarray(score_set.scores)[index], delta, confidence),
            "delta": delta, "confidence": confidence}


# ------------------------------------------------------------------------------------------------ worst case at chance


def worst_case_null(scores: np.ndarray, labels: np.ndarray, *, n_permutations: int = N_PERMUTATIONS,
                    seed: int = 0) -> dict[str, Any]:
    """The suite-wide permutation test of the worst case (module docstring).

    ``scores``: ``[attacks, samples]``, every attack's scores on D_te (higher = member); ``labels``: ``[samples]``,
    1 = member. Returns the observed maximum AUC over the attacks, the p-value ``(1 + #{null max >= observed}) /
    (1 + n_permutations)``, and the null maximum's median and 95th percentile (how high the suite's worst case
    reaches with no signal).
    """
    scores, labels = np.atleast_2d(np.asarray(scores, float)), np.asarray(labels).astype(bool).ravel()
    n_members, n = int(labels.sum()), labels.size
    if scores.shape[1] != n or not 0 < n_members < n:
        raise ValueError(f"need [attacks, {n}] scores and both members and non-members, got {scores.shape}")
    ranks = stats.rankdata(scores, axis=1)  # ties get their average rank: the AUC counts a tie as 1/2

    def max_auc(member_masks: np.ndarray) -> np.ndarray:  # [B, n] bool -> [B]: the Mann-Whitney AUC, maximised
        rank_sums = member_masks.astype(float) @ ranks.T
        return ((rank_sums - n_members * (n_members + 1) / 2.0) / (n_members * (n - n_members))).max(axis=1)

    rng = np.random.default_rng(seed)
    # A uniformly random member set per row (where a random permutation puts 0 .. n_members - 1), 1,000 rows at a time.
    null = np.concatenate([max_auc(np.argsort(rng.random((min(1000, n_permutations - i), n)), axis=1) < n_members)
                           for i in range(0, n_permutations, 1000)])
    observed = float(max_auc(labels[None])[0])
    return {"observed_max_auc": observed, "p_value": float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size)),
            "null_median": float(np.median(null)), "null_q95": float(np.quantile(null, 0.95)),
            "n_attacks": int(scores.shape[0]), "n_permutations": n_permutations, "seed": seed}


# ------------------------------------------------------------------------------------------------ one evaluation


def _split_index(splits: Sequence[str], *names: str) -> np.ndarray:
    return np.flatnonzero(np.isin(np.asarray(splits), names))


def add_row_epsilons(rows: list[dict[str, Any]], scores: Mapping[str, Sequence[ScoreSet]], splits: Sequence[str],
                     delta: float) -> None:
    """Add ``epsilon_lb`` (honest, oracle) on D_te to every result row in place."""
    test = _split_index(splits, SUSPECT_SPLIT, NONMEMBER_SPLIT)
    labels = np.isin(np.asarray(splits), SUSPECT_SPLIT).astype(int)
    by_label = {(model, s.label): s for model, sets in scores.items() for s in sets}
    for row in rows:
        score_set = by_label.get((row["model"], row["label"]))
        if score_set is not None:
            row["epsilon_lb"] = epsilon_lb(score_set, labels, test, delta)


def privacy_audit(rows: list[dict[str, Any]], scores: Mapping[str, Sequence[ScoreSet]], splits: Sequence[str],
                  metadata: Mapping[str, Mapping[str, str]], alpha: float, delta: float,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """report.json's ``privacy_audit``: per model, its worst-case attack (:func:`library.eval.summary.worst_case`,
    floor excluded), the set-level audit of that attack's scores (suspects D^m_te, known non-members D^nm_te),
    its epsilon lower bounds on D_te, and a DP-SGD LoRA's accountant epsilon from ``metadata`` (model ->
    LoRA metadata)."""
    splits_arr = np.asarray(splits)
    suspect, nonmembers = _split_index(splits, SUSPECT_SPLIT), _split_index(splits, NONMEMBER_SPLIT)
    test = np.sort(np.r_[suspect, nonmembers])
    labels = (splits_arr == SUSPECT_SPLIT).astype(int)
    out = {}
    candidates = worst_case_candidates({"results": rows})
    for model, worst in worst_case({"results": rows}).items():
        score_set = next((s for s in scores.get(model, ()) if s.label == worst.attack), None)
        if score_set is None or suspect.size == 0 or nonmembers.size == 0:
            continue
        values = np.asarray(score_set.scores, float)
        # The worst case is the best of these attacks on this same D_te: its tests are corrected for that choice
        # (Bonferroni; set_audit), so that a leak-free model reaches alpha at most alpha of the time.
        n_attacks = len(candidates[model])
        out[model] = {
            "worst_case_attack": worst.attack, "attack": worst.row.get("attack"), "auc": worst.auc,
            "auc_ci": worst.auc_ci, "tpr_at_1pct_fpr": worst.tpr_at_fpr.get("0.01"),
            "floor": None if worst.floor is None else {k: worst.floor.get(k) for k in ("label", "auc", "auc_ci")},
            "set_audit": set_audit(values[suspect], values[nonmembers], alpha, n_attacks=n_attacks, seed=seed),
            "epsilon_lb": {**epsilon_lb(score_set, labels, test, delta, corrected_confidence(n_attacks)),
                           "n_attacks": n_attacks,
                           "oracle_note": "maximum over D_te thresholds: multiple testing, optimistic"},
            "dp_epsilon": dp_budget(dict(metadata.get(model) or {})),
            "worst_case_null": suite_null(candidates[model], {s.label: s.scores for s in scores.get(model, ())},
                                          labels, test, seed),
        }
    return out


def suite_null(rows: Sequence[dict[str, Any]], scores: Mapping[str, Any], labels: np.ndarray, test: np.ndarray,
               seed: int) -> dict[str, Any] | None:
    """:func:`worst_case_null` over a model's worst-case candidate ``rows`` (:func:`worst_case_candidates`), their
    per-sample ``scores`` by row label restricted to the samples ``test`` (D_te); None when a row has no scores."""
    if any(row["label"] not in scores for row in rows):
        return None
    matrix = np.stack([np.asarray(scores[row["label"]], float)[test] for row in rows])
    return {**worst_case_null(matrix, np.asarray(labels)[test], seed=seed), "attacks": [row["label"] for row in rows]}


__all__ = ["CONFIDENCE", "MIN_SET_SIZE", "N_SUBSETS", "add_row_epsilons", "clopper_pearson", "corrected_confidence",
           "epsilon_at_decision", "epsilon_from_counts", "epsilon_lb", "epsilon_oracle", "honest_predictions", "images_needed",
           "mann_whitney_p", "privacy_audit", "set_audit", "subset_median_p", "suite_null", "worst_case_null"]
