"""MIA metrics against scikit-learn and brute force; FID / KID maths against closed forms and torchmetrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from library.errors import DataError
from library.eval.bootstrap import bootstrap_auc_tpr_ci, bootstrap_ci
from library.eval.metrics import (
    accuracy_at_threshold,
    argmax_asr,
    auc_deviation,
    balanced_accuracy,
    best_threshold,
    frechet_distance,
    frechet_distance_from_features,
    kid,
    rates_at_threshold,
    real_vs_real_floor,
    roc_auc,
    roc_curve,
    threshold_at_fpr,
    tpr_at_fpr,
)


def _data(seed: int, n_pos: int = 60, n_neg: int = 50, ties: bool = True):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = rng.normal(size=y.size) + 0.7 * y
    if ties:
        s = np.round(s * 2) / 2
    perm = rng.permutation(y.size)
    return y[perm], s[perm]


def _brute_auc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# ----------------------------------------------------------------------------- ROC / AUC


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [True, False])
def test_roc_matches_sklearn(seed, ties):
    y, s = _data(seed, ties=ties)
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert np.isinf(thr[0])
    auc = roc_auc(y, s)
    assert auc == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert auc == pytest.approx(_brute_auc(y, s), abs=1e-12)


def test_auc_extremes_and_deviation():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auc_deviation(0.5) == 0.0
    assert auc_deviation(0.75) == pytest.approx(0.5)
    assert auc_deviation(0.25) == pytest.approx(0.5)
    assert auc_deviation(1.0) == 1.0


def test_bad_inputs():
    with pytest.raises(DataError, match="both members and non-members"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError, match="0 \\(non-member\\) or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        roc_auc([0, 1, 1], [0.1, 0.2])
    assert roc_auc(np.array([False, True]), [0.1, 0.2]) == 1.0


# ----------------------------------------------------------------------------- TPR @ FPR


def _brute_tpr_at_fpr(y, s, alpha):
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return max(t for f, t in zip(fpr, tpr) if f <= alpha + 1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.1, 0.3, 1.0])
def test_tpr_at_fpr_matches_brute_force(seed, alpha):
    y, s = _data(seed, n_pos=80, n_neg=100, ties=seed % 2 == 0)
    assert tpr_at_fpr(y, s, alpha) == pytest.approx(_brute_tpr_at_fpr(y, s, alpha))


def test_tpr_at_fpr_is_conservative_and_exact_at_grid_points():
    # 4 non-members: achievable FPRs 0, .25, .5, .75, 1.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.55, 0.3, 0.85, 0.6, 0.5, 0.1])
    assert tpr_at_fpr(y, s, 0.25) == 0.5  # FPR exactly 0.25 is admissible
    assert tpr_at_fpr(y, s, 0.49) == 0.5  # next point (FPR .5) would overshoot
    assert tpr_at_fpr(y, s, 0.5) == 0.75
    tau = threshold_at_fpr(y, s, 0.5)
    assert tau == 0.55
    assert rates_at_threshold(y, s, tau) == (0.75, 0.5)


def test_tpr_at_fpr_na_rule():
    y, s = _data(0, n_pos=50, n_neg=200)
    assert tpr_at_fpr(y, s, 0.05) is not None
    assert tpr_at_fpr(y, s, 0.005) is not None  # 1/200 == 0.005: measurable (one false positive)
    assert tpr_at_fpr(y, s, 0.001) is None  # 1/200 > 0.001
    y, s = _data(1, n_pos=30, n_neg=20)
    assert tpr_at_fpr(y, s, 0.05) is not None  # 1/20 == 0.05
    assert tpr_at_fpr(y, s, 0.049) is None
    with pytest.raises(ValueError):
        tpr_at_fpr(y, s, 0.0)


# ----------------------------------------------------------------------------- accuracies and thresholds


def _brute_best_balanced(y, s):
    best = 0.5
    for tau in np.unique(s):
        pred = s >= tau
        best = max(best, 0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean()))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_matches_brute_force(seed):
    y, s = _data(seed, n_pos=40 + seed * 7, n_neg=45, ties=seed % 2 == 0)
    tau, bal = best_threshold(y, s)
    assert bal == pytest.approx(_brute_best_balanced(y, s))
    assert balanced_accuracy(y, s >= tau) == pytest.approx(bal)
    # The threshold is a real number between data points, usable on new data.
    assert np.isfinite(tau)
    if tau not in set(s.tolist()):
        assert s.min() < tau < s.max()


def test_best_threshold_midpoint_and_ties():
    y = np.array([0, 0, 1, 1])
    tau, bal = best_threshold(y, [0.1, 0.2, 0.8, 0.9])
    assert (tau, bal) == (pytest.approx(0.5), 1.0)
    # All scores tied: the only finite point predicts everyone a member.
    tau, bal = best_threshold(y, [0.3, 0.3, 0.3, 0.3])
    assert (tau, bal) == (0.3, 0.5)
    # Adjacent floats: the midpoint must not round onto the lower score.
    a = 1.0
    b = np.nextafter(a, 2.0)
    tau, bal = best_threshold([0, 1], [a, b])
    assert bal == 1.0 and accuracy_at_threshold([0, 1], [a, b], tau) == 1.0


def test_best_threshold_ties_go_to_the_highest_threshold():
    # By hand, member iff score >= tau on y = [0, 1, 0, 1], s = [1, 2, 3, 4]: tau = 4 gives TPR 1/2, FPR 0 and
    # tau = 2 gives TPR 1, FPR 1/2, both balanced accuracy 3/4 (tau = 3 and 1: 1/2). The documented tie rule
    # keeps the higher one (lowest FPR), returned as the midpoint 3.5 between 4 and the next lower score 3.
    assert best_threshold([0, 1, 0, 1], [1, 2, 3, 4]) == (3.5, 0.75)


def test_accuracy_and_balanced_accuracy():
    y = np.array([1, 1, 1, 0])
    s = np.array([0.9, 0.4, 0.7, 0.2])
    assert accuracy_at_threshold(y, s, 0.5) == 0.75
    assert accuracy_at_threshold(y, s, 0.4) == 1.0  # >= threshold is "member"
    assert balanced_accuracy(y, s >= 0.5) == pytest.approx(0.5 * (2 / 3 + 1))
    assert balanced_accuracy(y, s >= 0.5) == pytest.approx(skm.balanced_accuracy_score(y, s >= 0.5))


def test_argmax_asr():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.5, 0.5, 0.2, 0.7])  # 0.5 -> non-member (torch.argmax picks class 0 on ties)
    assert argmax_asr(y, p) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        argmax_asr(y, p + 1)


def test_a_probability_of_exactly_one_half_is_a_non_member():
    # argmax over two equal logits is class 0: p = 0.5 is "non-member". Both 0.5s below sit on non-members, so
    # the rule p > 0.5 is right on all four samples; p >= 0.5 would call both members (accuracy 1/2).
    y = np.array([1, 0, 0, 1])
    p = np.array([0.9, 0.5, 0.5, 0.6])
    assert argmax_asr(y, p) == 1.0


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_estimate_and_narrows():
    widths = []
    for n in (50, 800):
        y, s = _data(3, n_pos=n, n_neg=n, ties=False)
        lo, hi = bootstrap_ci(y, s, roc_auc, n_boot=300, seed=1)
        assert lo <= roc_auc(y, s) <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]
    # Deterministic for a seed; the non-stratified variant works too.
    y, s = _data(4, n_pos=30, n_neg=30)
    assert bootstrap_ci(y, s, roc_auc, n_boot=50, seed=7) == bootstrap_ci(y, s, roc_auc, n_boot=50, seed=7)
    lo, hi = bootstrap_ci(y, s, roc_auc, n_boot=100, stratified=False)
    assert lo <= roc_auc(y, s) <= hi


def test_bootstrap_ci_stratified_keeps_class_counts_and_skips_na():
    y, s = _data(5, n_pos=7, n_neg=13)
    seen = []

    def spy(yy, ss):
        seen.append((int(yy.sum()), int((yy == 0).sum())))
        return roc_auc(yy, ss)

    bootstrap_ci(y, s, spy, n_boot=20)
    assert set(seen) == {(7, 13)}
    assert bootstrap_ci(y, s, lambda yy, ss: tpr_at_fpr(yy, ss, 0.01), n_boot=10) is None
    lo, hi = bootstrap_ci(y, s, lambda yy, ss: tpr_at_fpr(yy, ss, 0.1), n_boot=50)
    assert 0.0 <= lo <= hi <= 1.0


def test_unstratified_bootstrap_skips_one_class_resamples_and_draws_every_sample():
    """A tiny set often resamples to one class (skipped, not a crash), and its only member must be drawable."""
    y, s = np.array([1, 0, 0]), np.array([2.0, 0.0, 1.0])  # the only member first: index 0 must be drawable
    lo, hi = bootstrap_ci(y, s, roc_auc, n_boot=200, stratified=False)
    assert lo == hi == 1.0  # every two-class resample separates perfectly


@pytest.mark.parametrize("n_boot, alpha", [(0, 0.05), (10, 0.0), (10, 1.0)])
def test_bootstrap_refuses_no_resamples_and_a_degenerate_alpha(n_boot, alpha):
    """n_boot = 0 would give no CI at all and alpha 0 or 1 a meaningless one: both are refused, not reported."""
    y, s = _data(6, n_pos=20, n_neg=20)
    with pytest.raises(ValueError):
        bootstrap_ci(y, s, roc_auc, n_boot=n_boot, alpha=alpha)
    with pytest.raises(ValueError):
        bootstrap_auc_tpr_ci(y, s, 0.05, n_boot=n_boot, alpha=alpha)


def test_vectorised_bootstrap_tpr_ci_follows_its_fpr_target():
    """The TPR CI is n/a exactly where tpr_at_fpr is at the requested FPR (not 5 %), and FPR 1 admits all."""
    y = np.r_[np.ones(30), np.zeros(30)]
    s = np.random.default_rng(8).normal(size=y.size) + y
    assert bootstrap_auc_tpr_ci(y, s, 0.01, n_boot=50)[1] is None  # 30 non-members cannot measure 1 % FPR
    assert bootstrap_auc_tpr_ci(y, s, 1.0, n_boot=50)[1] == (1.0, 1.0)
    # The default is the report's TPR@5%FPR.
    assert bootstrap_auc_tpr_ci(y, s, n_boot=50) == bootstrap_auc_tpr_ci(y, s, 0.05, n_boot=50)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_full_covariance_commuting_case():
    # Σ2 = c·Σ1 commutes with Σ1: Tr((Σ1Σ2)^½) = √c·Tr(Σ1), so d² = ||Δμ||² + (1 + c − 2√c)·Tr(Σ1).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    s1 = a @ a.T + 0.1 * np.eye(6)
    c = 2.5
    mu1, mu2 = np.zeros(6), np.ones(6)
    expected = 6.0 + (1 + c - 2 * np.sqrt(c)) * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c * s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 0.5  # n < d: rank-deficient
    d = frechet_distance_from_features(f1, f2)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_distance_from_features_behaviour():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    assert frechet_distance_from_features(a, b) < 0.05
    assert frechet_distance_from_features(a, b + 1.0) == pytest.approx(4.0, abs=0.2)


# ----------------------------------------------------------------------------- KID


def test_kid_same_vs_shifted():
    rng = np.random.default_rng(4)
    real, same = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 0.5
    m_same, sd_same = kid(real, same, subset_size=100, n_subsets=20)
    m_shift, _ = kid(real, shifted, subset_size=100, n_subsets=20)
    assert abs(m_same) < sd_same  # unbiased: zero up to subset noise
    assert m_shift > 20 * abs(m_same) and m_shift > 0.5
    # Default subset size = min(1000, n_real, n_fake) = 300 here: all subsets are the full sets.
    assert kid(real, same, n_subsets=3)[1] == pytest.approx(0.0, abs=1e-12)
    # Small sets: the default subset size adapts to the smaller set.
    assert np.isfinite(kid(real[:30], shifted[:50], n_subsets=5)[0])
    with pytest.raises(DataError):
        kid(real[:30], shifted, subset_size=40)


def _hand_mmd2(x, y, degree=3):
    """Unbiased MMD² with k(u, v) = (u·v/d + 1)^degree, one kernel value at a time (Bińkowski et al. 2018, eq. 4)."""
    m, d = len(x), len(x[0])

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** degree

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_is_the_polynomial_kernel_mmd_by_hand():
    # The torchmetrics comparison below is skipped where torchmetrics is absent; this one always runs. With
    # subset_size == n every subset is a permutation of the full sets, and MMD² does not depend on the order.
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) * 1.5 + 0.4
    mean, std = kid(a, b, subset_size=5, n_subsets=3)
    assert mean == pytest.approx(_hand_mmd2(a.tolist(), b.tolist()), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_std_is_the_population_std_over_subsets():
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=(9, 3)), rng.normal(size=(8, 3)) + 0.3
    # One subset: the population std (ddof=0) is 0; the sample std (ddof=1) would be undefined.
    assert kid(a, b, subset_size=4, n_subsets=1, seed=2)[1] == 0.0
    # Several subsets: the per-subset values recomputed by hand on the same seeded draws (the documented
    # sampling: per subset, `subset_size` real then `subset_size` fake rows without replacement).
    draw = np.random.default_rng(2)
    values = []
    for _ in range(4):
        x, y = a[draw.choice(9, 4, replace=False)], b[draw.choice(8, 4, replace=False)]
        values.append(_hand_mmd2(x.tolist(), y.tolist()))
    assert len(set(values)) == 4  # distinct values, so ddof matters
    mean, std = kid(a, b, subset_size=4, n_subsets=4, seed=2)
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values, ddof=0), rel=1e-10)
    assert std != pytest.approx(np.std(values, ddof=1), rel=1e-3)


def test_the_real_vs_real_floor_compares_two_disjoint_halves():
    # Half against itself would give a Fréchet distance of exactly 0; the floor is the documented fixed
    # permutation's first half against its second half, and the two halves share no sample.
    rng = np.random.default_rng(13)
    real = {"f": rng.normal(size=(10, 3))}
    floor = real_vs_real_floor({"f": ("fd", "kid")}, real, n_subsets=3, seed=7)
    order = np.random.default_rng(7).permutation(10)
    first, second = order[:5], order[5:]
    assert not set(first) & set(second)
    assert floor["fd"] == pytest.approx(frechet_distance_from_features(real["f"][first], real["f"][second]))
    assert floor["fd"] > 0.1
    assert floor["kid"] == pytest.approx(_hand_mmd2(real["f"][first].tolist(), real["f"][second].tolist()), rel=1e-10)


def test_kid_matches_torchmetrics_maths():
    torch = pytest.importorskip("torch")
    kid_mod = pytest.importorskip("torchmetrics.image.kid")
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) * 1.3 + 0.2
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    expected = kid_mod.poly_mmd(ta, tb, degree=3, gamma=None, coef=1.0).item()
    # subset_size == n: every subset is a permutation of the full sets, and MMD² is permutation invariant.
    mean, std = kid(a, b, subset_size=40, n_subsets=3)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n1, n2, d", [(50, 40, 8), (6, 24, 64), (300, 200, 16)])
def test_frechet_from_features_matches_the_sqrtm_closed_form(n1, n2, d):
    # Both branches (low-rank SVD when a set is not larger than d, d x d eigh otherwise) agree with the
    # moments formula evaluated with scipy's sqrtm.
    rng = np.random.default_rng(d)
    a, b = rng.normal(size=(n1, d)), rng.normal(size=(n2, d)) * 1.3 + 0.2
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n_pos, n_neg, levels", [(50, 50, None), (30, 70, 5), (12, 20, 3), (40, 10, None)])
def test_vectorised_bootstrap_equals_one_roc_curve_per_resample(n_pos, n_neg, levels):
    """The same resamples, the same AUC and TPR@5%FPR CIs as bootstrap_ci (ties included: few score levels)."""
    rng = np.random.default_rng(n_pos)
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    s = rng.normal(size=y.size) + 0.8 * y
    if levels:
        s = np.round(s * levels / 3.0)
    auc_ci, tpr_ci = bootstrap_auc_tpr_ci(y, s, 0.05, n_boot=200, seed=3)
    assert auc_ci == pytest.approx(bootstrap_ci(y, s, roc_auc, n_boot=200, seed=3), abs=1e-12)
    expected = bootstrap_ci(y, s, lambda a, b: tpr_at_fpr(a, b, 0.05), n_boot=200, seed=3)
    assert (tpr_ci is None) == (n_neg < 20)  # 10 non-members cannot measure a 5 % FPR
    if tpr_ci is not None:
        assert tpr_ci == pytest.approx(expected, abs=1e-12)


def test_a_classifiers_asr_is_balanced_on_an_unbalanced_test_set():
    """The ASR column reads private = 50 for every attack: a classifier that calls everyone a non-member scores 80 %
    plain accuracy on 30 members vs 120 non-members, and 50 % in the column (its plain accuracy stays argmax_asr)."""
    from library.eval.attacks.base import ScoreSet
    from library.eval.run import score_metrics

    y = np.array([1] * 30 + [0] * 120)
    probs = np.full(150, 0.2)
    probs[:6] = 0.9  # 6 of the 30 members called members
    row = score_metrics(y, ScoreSet("paper", "[honest ckpt]", probs, "classifier", member_probs=probs,
                                    checkpoint="honest"), n_bootstrap=0, seed=0)
    assert row["asr_honest"] == pytest.approx(0.5 * (6 / 30 + 1.0))
    assert row["argmax_asr"] == pytest.approx((6 + 120) / 150)


def test_score_metrics_honest_and_oracle_asr_by_hand():
    """A threshold row: the honest ASR applies the D_aux threshold to D_te; the oracle ASR is the best balanced
    accuracy over every threshold on D_te (neither is the AUC)."""
    from library.eval.attacks.base import ScoreSet
    from library.eval.run import score_metrics

    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([1.0, 2.0, 5.0, 3.0, 4.0, 6.0])
    row = score_metrics(y, ScoreSet("loss", "avg", s, "threshold", threshold=3.5), n_bootstrap=0, seed=0)
    # score >= 3.5: members 4 and 6 (TPR 2/3), non-member 5 (FPR 1/3); balanced accuracy (2/3 + 2/3) / 2.
    assert row["honest_tpr"] == pytest.approx(2 / 3) and row["honest_fpr"] == pytest.approx(1 / 3)
    assert row["asr_honest"] == pytest.approx(2 / 3)
    # Oracle: tau = 3 calls all members and only the non-member 5 a member: (1 + 2/3) / 2 = 5/6. AUC: 7 of 9 pairs.
    assert row["asr_oracle"] == pytest.approx(5 / 6)
    assert row["auc"] == pytest.approx(7 / 9) and skm.roc_auc_score(y, s) == pytest.approx(7 / 9)
    assert row["asr_oracle"] == pytest.approx(max(balanced_accuracy(y, s >= t) for t in s))


def test_score_metrics_counts_a_classifier_probability_of_one_half_as_non_member():
    from library.eval.attacks.base import ScoreSet
    from library.eval.run import score_metrics

    # Members called at 0.9 and 0.8, non-members at 0.5 and 0.1: p > 0.5 is right on all four (balanced
    # accuracy 1); p >= 0.5 would call the non-member at 0.5 a member (3/4).
    y = np.array([1, 1, 0, 0])
    probs = np.array([0.9, 0.8, 0.5, 0.1])
    row = score_metrics(y, ScoreSet("paper", "[oracle ckpt]", probs, "classifier", member_probs=probs,
                                    checkpoint="oracle"), n_bootstrap=0, seed=0)
    assert row["asr_oracle"] == 1.0 and row["asr_honest"] is None


def test_kid_of_two_samples_per_set_is_reported():
    # Two samples per set is the smallest the unbiased estimator allows (m - 1 = 1 in its denominator).
    from library.eval.metrics import feature_metrics

    a, b = np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([[2.0, 1.0], [1.0, 3.0]])
    out = feature_metrics({"f": ("fd", "kid")}, {"f": a}, {"f": b}, n_subsets=1)
    assert out["kid"] == pytest.approx(_hand_mmd2(a.tolist(), b.tolist()), rel=1e-12) and out["kid_std"] == 0.0


def test_score_metrics_counts_each_class_and_bootstraps_the_auc_and_tpr_at_5pct_fpr():
    """The report's sample counts and CIs on an unbalanced D_te (members are not half of it, as in Pokemon's)."""
    from library.eval.attacks.base import ScoreSet
    from library.eval.run import score_metrics

    y = np.array([1] * 10 + [0] * 30)
    s = np.random.default_rng(0).normal(size=40) + y
    row = score_metrics(y, ScoreSet("loss", "avg", s, "threshold"), n_bootstrap=50, seed=4)
    assert (row["n_members"], row["n_nonmembers"]) == (10, 30)
    assert row["tpr_at_fpr"] == {str(a): tpr_at_fpr(y, s, a) for a in (0.05, 0.01, 0.001)}
    auc_ci, tpr_ci = bootstrap_auc_tpr_ci(y, s, 0.05, n_boot=50, seed=4)
    assert tpr_ci is not None  # 30 non-members measure a 5 % FPR
    assert row["auc_ci"] == list(auc_ci) and row["tpr_at_5pct_fpr_ci"] == list(tpr_ci)
