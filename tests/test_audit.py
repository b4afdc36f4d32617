"""library.eval.audit: the set-level audit (Mann-Whitney, images needed), the empirical epsilon lower bound
(Clopper-Pearson) and the suite-wide permutation test of the worst case, against hand computations; and all three
in an evaluation's report on the over-fitted LoRA."""

from __future__ import annotations

import json
import math
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from mia_world import base_args
from scipy import stats

from library.errors import DataError
from library.eval.attacks.base import ScoreSet
from library.eval.audit import (
    MIN_SET_SIZE,
    add_row_epsilons,
    clopper_pearson,
    epsilon_at_decision,
    epsilon_from_counts,
    epsilon_lb,
    epsilon_oracle,
    honest_predictions,
    images_needed,
    mann_whitney_p,
    privacy_audit,
    set_audit,
    subset_median_p,
    suite_null,
    worst_case_null,
)

DELTA = 1e-5


# ---------------------------------------------------------------------------------------------- set-level audit


def test_mann_whitney_p_by_hand_and_against_scipy():
    # Both suspects above both non-members: U = 4, the largest of the C(4, 2) = 6 equally likely rank splits.
    assert mann_whitney_p([3.0, 4.0], [1.0, 2.0]) == pytest.approx(1 / 6)
    assert mann_whitney_p([1.0, 2.0], [3.0, 4.0]) == pytest.approx(1.0)  # one-sided: the wrong direction is p = 1
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1, 20), rng.normal(0, 1, 25)
    assert mann_whitney_p(a, b) == stats.mannwhitneyu(a, b, alternative="greater").pvalue


def test_subset_median_p_is_the_median_over_seeded_subsets():
    rng = np.random.default_rng(2)
    suspect, nonmembers = rng.normal(1, 1, 12), rng.normal(0, 1, 12)
    assert subset_median_p(suspect, nonmembers, 12) == mann_whitney_p(suspect, nonmembers)  # the whole set
    p5 = subset_median_p(suspect, nonmembers, 5, n_subsets=31, seed=3)
    assert p5 == subset_median_p(suspect, nonmembers, 5, n_subsets=31, seed=3)  # seeded
    # Recompute independently: the same subsets, one test at a time.
    picks = np.argsort(np.random.default_rng([3, 5]).random((31, 12)), axis=1)[:, :5]
    assert p5 == pytest.approx(np.median([mann_whitney_p(suspect[i], nonmembers) for i in picks]))
    assert all(len(set(i)) == 5 for i in picks)  # without replacement


def test_images_needed_small_when_separated_none_when_identical():
    rng = np.random.default_rng(4)
    nonmembers = rng.normal(0, 1, 40)
    strong, weak = rng.normal(3, 1, 40), rng.normal(1, 1, 40)
    n_strong, n_weak = images_needed(strong, nonmembers, 0.01), images_needed(weak, nonmembers, 0.01)
    assert n_strong is not None and MIN_SET_SIZE <= n_strong <= 5
    assert n_weak is not None and n_strong < n_weak <= 40  # a weaker signal needs more suspect images
    for suspect, n in ((strong, n_strong), (weak, n_weak)):  # the smallest such n: one fewer does not reach alpha
        assert subset_median_p(suspect, nonmembers, n) < 0.01
        if n > MIN_SET_SIZE:
            assert subset_median_p(suspect, nonmembers, n - 1) >= 0.01
    assert images_needed(nonmembers.copy(), nonmembers, 0.01) is None  # the same distribution: never
    audit = set_audit(nonmembers.copy(), nonmembers, 0.01)
    assert audit["n_needed"] is None and audit["p_value"] > 0.4 and audit["alpha"] == 0.01


def test_the_images_needed_are_counted_at_the_bonferroni_alpha():
    rng = np.random.default_rng(4)
    nonmembers, suspect = rng.normal(0, 1, 40), rng.normal(1, 1, 40)
    audit = set_audit(suspect, nonmembers, 0.05, n_attacks=10)
    # The smallest n whose median p is below 0.05 / 10, by a plain scan (no bisection).
    scan = next(n for n in range(MIN_SET_SIZE, 41) if subset_median_p(suspect, nonmembers, n) < 0.005)
    assert audit["n_needed"] == scan
    assert scan > images_needed(suspect, nonmembers, 0.05)  # the uncorrected alpha would need fewer images
    assert audit["p_value"] == pytest.approx(min(1.0, 10 * mann_whitney_p(suspect, nonmembers)))


def test_the_set_test_refuses_an_empty_set_and_a_subset_size_out_of_range():
    """An empty set would give a NaN p-value, not an error; one suspect is a valid subset, 0 and size + 1 are not."""
    for suspect, nonmembers in (([], [1.0, 2.0]), ([1.0], [])):
        with pytest.raises(ValueError, match="at least one suspect"):
            mann_whitney_p(suspect, nonmembers)
    suspect, nonmembers = np.arange(3.0, 6.0), np.arange(3.0)
    assert subset_median_p(suspect, nonmembers, 1, n_subsets=5) == pytest.approx(1 / 4)  # one above three: 1 / C(4, 1)
    for n in (0, 4):
        with pytest.raises(ValueError, match="subset size"):
            subset_median_p(suspect, nonmembers, n)


def test_a_p_value_equal_to_alpha_does_not_reach_it():
    """"Below alpha" is strict: an exact p-value that lands on alpha must not count as reaching it."""
    suspect, nonmembers = [3.0, 4.0], [0.0, 1.0, 2.0]
    assert mann_whitney_p(suspect, nonmembers) == 0.1  # both above all three: exactly 1 / C(5, 2)
    assert images_needed(suspect, nonmembers, 0.1) is None
    assert images_needed(suspect, nonmembers, 0.1001) == 2


def test_set_audit_refuses_fewer_than_one_attack():
    """A correction over zero attacks would divide alpha by zero or scale p by a non-positive count."""
    with pytest.raises(ValueError, match="n_attacks"):
        set_audit([3.0, 4.0], [0.0, 1.0], 0.05, n_attacks=0)


# ---------------------------------------------------------------------------------------------- epsilon


def test_clopper_pearson_known_values():
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0))
    assert clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)  # the textbook 5/10 interval
    lo, hi = clopper_pearson(np.array([0, 5, 10]), 10)
    assert lo == pytest.approx([0.0, 0.187086, 0.025 ** 0.1], abs=1e-6) and hi[0] == pytest.approx(1 - 0.025 ** 0.1)


def test_epsilon_zero_for_identical_and_the_hand_value_for_perfect_separation():
    y = np.r_[np.ones(20), np.zeros(20)]
    same = np.r_[np.arange(20.0), np.arange(20.0)]
    assert epsilon_oracle(y, same, DELTA) == 0.0
    assert epsilon_at_decision(y, same >= 10, DELTA) == 0.0  # TPR = FPR = 1/2: nothing to conclude
    # Perfect separation of 20 vs 20: TPR_lo = 0.025^(1/20), FPR_hi = 1 - 0.025^(1/20), and symmetric.
    lo = 0.025 ** (1 / 20)
    expected = math.log((lo - DELTA) / (1 - lo))
    assert epsilon_at_decision(y, y == 1, DELTA) == pytest.approx(expected)
    assert epsilon_oracle(y, y.copy(), DELTA) == pytest.approx(expected) and expected > 1.5
    assert epsilon_from_counts(200, 200, 0, 200, DELTA) > expected  # more samples, tighter intervals, larger bound


def test_epsilon_takes_the_backward_term_when_it_is_the_larger():
    # 20 of 20 members and 10 of 20 non-members called members. Clopper-Pearson at 95 %, by hand: TPR_lo solves
    # p^20 = 0.025; FPR_hi solves P(Binomial(20, p) <= 10) = 0.025. The forward term log((TPR_lo - delta) /
    # FPR_hi) is ~0.13; the backward one, log((1 - FPR_hi - delta) / (1 - TPR_lo)), is ~0.48 and is the bound.
    from scipy.optimize import brentq

    tpr_lo = 0.025 ** (1 / 20)
    fpr_hi = brentq(lambda p: stats.binom.cdf(10, 20, p) - 0.025, 0.5, 0.99, xtol=1e-15)
    forward = math.log((tpr_lo - DELTA) / fpr_hi)
    backward = math.log((1 - fpr_hi - DELTA) / (1 - tpr_lo))
    assert forward == pytest.approx(0.1329, abs=1e-4) and backward == pytest.approx(0.4791, abs=1e-4)
    assert epsilon_from_counts(20, 20, 10, 20, DELTA) == pytest.approx(backward, rel=1e-9)
    # Mirrored (10 of 20 members, 0 of 20 non-members): TPR_lo = 1 - fpr_hi and FPR_hi = 1 - tpr_lo, so the two
    # terms swap places: the forward one is now the larger, with the same value.
    assert epsilon_from_counts(10, 20, 0, 20, DELTA) == pytest.approx(backward, rel=1e-9)


def test_epsilon_decreases_in_delta_and_oracle_is_the_max_over_thresholds():
    values = [epsilon_from_counts(18, 20, 2, 20, d) for d in (0.0, 0.1, 0.3, 0.6)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == 0.0
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(15), np.zeros(15)]
    s = np.round(rng.normal(y, 1.0), 1)  # rounding makes ties
    brute = max(epsilon_at_decision(y, s >= tau, DELTA) for tau in np.unique(s))
    assert epsilon_oracle(y, s, DELTA) == pytest.approx(brute)


def test_honest_epsilon_uses_the_fitted_rule():
    y = np.r_[np.ones(10), np.zeros(10)]
    scores = np.r_[np.full(10, 2.0), np.full(10, 1.0)]
    index = np.arange(20)
    good = ScoreSet("a", "", scores, "threshold", threshold=1.5)
    bad = ScoreSet("a", "", scores, "threshold", threshold=3.0)  # fitted on D_aux, calls nobody a member
    probs = ScoreSet("h", "", scores, "classifier", member_probs=np.r_[np.full(10, 0.9), np.full(10, 0.5)])
    assert epsilon_lb(good, y, index, DELTA)["honest"] == pytest.approx(epsilon_at_decision(y, y == 1, DELTA))
    assert epsilon_lb(bad, y, index, DELTA)["honest"] == 0.0 and epsilon_lb(bad, y, index, DELTA)["oracle"] > 0.5
    assert epsilon_lb(probs, y, index, DELTA)["honest"] == epsilon_lb(good, y, index, DELTA)["honest"]  # p > 0.5
    assert epsilon_lb(ScoreSet("a", "", scores, "threshold"), y, index, DELTA)["honest"] is None


def test_a_score_at_the_threshold_is_called_a_member():
    """The fitted rule is ``score >= threshold``: a tie at the threshold is a member, as the threshold was fitted."""
    at = ScoreSet("a", "", np.array([1.0, 2.0, 2.0, 3.0]), "threshold", threshold=2.0)
    assert honest_predictions(at, np.arange(4)).tolist() == [False, True, True, True]


# ---------------------------------------------------------------------------------------------- worst case at chance


def test_worst_case_null_observes_the_highest_auc_and_a_signal():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30), np.zeros(30)]
    scores = rng.normal(size=(6, 60))
    scores[2] = np.round(scores[2])  # ties count 1/2, as in roc_auc_score
    noise = worst_case_null(scores, labels, n_permutations=2000)
    assert noise["observed_max_auc"] == pytest.approx(max(roc_auc_score(labels, s) for s in scores))
    assert noise["null_median"] > 0.55 and noise["null_q95"] > noise["null_median"]  # the max of 6 is not 0.5
    scores[4] += 1.5 * labels
    signal = worst_case_null(scores, labels, n_permutations=2000)
    assert signal["p_value"] == pytest.approx(1 / 2001) and signal["observed_max_auc"] > signal["null_q95"]
    flat = worst_case_null(np.zeros((3, 60)), labels, n_permutations=100)
    assert flat["observed_max_auc"] == 0.5 and flat["p_value"] == 1.0


def test_worst_case_null_is_calibrated_where_one_ci_per_attack_is_not():
    # 200 models with no membership signal, 8 correlated attacks each: the suite-wide test rejects at the 5 % level
    # about 5 % of the time; "some attack's AUC is above its own 95 % one-sided cut" happens far more often.
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(20), np.zeros(20)]
    p_values, any_single = [], []
    for _ in range(200):
        shared = rng.normal(size=40)
        scores = 0.5 * shared + rng.normal(size=(8, 40))
        result = worst_case_null(scores, labels, n_permutations=200, seed=int(rng.integers(1 << 30)))
        p_values.append(result["p_value"])
        z = [(stats.mannwhitneyu(s[:20], s[20:], alternative="greater").pvalue) for s in scores]
        any_single.append(min(z) < 0.05)
    rejected = np.mean(np.asarray(p_values) < 0.05)
    print(f"suite-wide test rejects {rejected:.3f}, any single attack {np.mean(any_single):.3f}")
    assert 0.01 <= rejected <= 0.10 and np.mean(any_single) > 0.2


def test_worst_case_null_refuses_one_class():
    with pytest.raises(ValueError, match="members and non-members"):
        worst_case_null(np.zeros((2, 4)), np.ones(4))


def test_worst_case_null_refuses_no_members():
    """Without members the AUC divides by zero: refused, never a NaN p-value."""
    with pytest.raises(ValueError, match="members and non-members"):
        worst_case_null(np.zeros((2, 4)), np.zeros(4))


def test_worst_case_null_shuffles_as_many_members_as_there_are():
    """One attack's null AUC is centred on 0.5 only if each shuffle keeps the member count; else p is off."""
    scores = np.random.default_rng(3).normal(size=(1, 40))
    null = worst_case_null(scores, np.r_[np.ones(20), np.zeros(20)], n_permutations=2000)
    assert null["null_median"] == pytest.approx(0.5, abs=0.02)


def _row(model, attack, auc, floor=False):
    return {"model": model, "attack": attack, "label": attack, "headline": True, "floor": floor, "auc": auc,
            "auc_ci": [auc - 0.1, auc + 0.1], "tpr_at_fpr": {"0.01": 0.2}}


def test_privacy_audit_uses_the_worst_case_attack_never_the_floor():
    splits = ["member_aux"] * 4 + ["member_test"] * 20 + ["nonmember_test"] * 20
    rng = np.random.default_rng(6)
    noise = rng.normal(0, 1, 44)
    strong = noise + np.r_[np.zeros(4), np.full(20, 4.0), np.zeros(20)]
    sets = {"m": [ScoreSet("weak", "", noise, "threshold", threshold=0.0, headline=True),
                  ScoreSet("strong", "", strong, "threshold", threshold=2.0, headline=True),
                  ScoreSet("blind", "", -strong, "threshold", threshold=0.0, headline=True)]}
    rows = [_row("m", "weak", 0.55), _row("m", "strong", 0.98), _row("m", "blind", 0.99, floor=True)]
    meta = {"m": {"smp_lora.dp_epsilon": "8", "smp_lora.dp_delta": "1e-05"}}
    block = privacy_audit(rows, sets, splits, meta, alpha=0.01, delta=DELTA)["m"]
    assert block["worst_case_attack"] == "strong" and block["floor"]["label"] == "blind"
    # Chosen as the best of two attacks on this D_te: Bonferroni over the two (the floor is not a candidate).
    p_single = mann_whitney_p(strong[4:24], strong[24:])
    assert block["set_audit"]["n_attacks"] == 2 and block["set_audit"]["p_value_single"] == pytest.approx(p_single)
    assert block["set_audit"]["p_value"] == pytest.approx(2 * p_single)
    assert block["set_audit"]["n_needed"] is not None and block["set_audit"]["n_needed"] <= 4
    assert block["epsilon_lb"]["confidence"] == pytest.approx(0.975) and block["epsilon_lb"]["n_attacks"] == 2
    assert block["epsilon_lb"]["honest"] == pytest.approx(
        epsilon_at_decision(np.r_[np.ones(20), np.zeros(20)], strong[4:] >= 2.0, DELTA, confidence=0.975))
    assert block["dp_epsilon"] == {"epsilon": 8.0, "delta": 1e-5}
    null = block["worst_case_null"]  # over the worst-case candidates: the floor is not one of them
    assert null["attacks"] == ["weak", "strong"] and null["p_value"] < 0.001
    assert null == {**worst_case_null(np.stack([noise[4:], strong[4:]]), np.r_[np.ones(20), np.zeros(20)]),
                    "attacks": ["weak", "strong"]}
    add_row_epsilons(rows, sets, splits, DELTA)
    # A row's own bound (95 %, no choice made) is looser-conditioned, so higher than the corrected worst case's.
    assert rows[1]["epsilon_lb"]["honest"] > block["epsilon_lb"]["honest"] > 0 and rows[0]["epsilon_lb"]["oracle"] >= 0


def test_privacy_audit_is_not_fooled_by_choosing_the_best_of_many_null_attacks(monkeypatch):
    """With no membership signal, the worst case's set audit must reach p < alpha at most alpha of the time even
    though its attack is the best of eleven on the same D_te (uncorrected it does in ~40 % of draws at 0.05)."""
    import library.eval.audit as audit

    monkeypatch.setattr(audit, "suite_null", lambda *args: None)  # not under test here, and 10,000 shuffles a draw
    splits = ["member_test"] * 16 + ["nonmember_test"] * 16
    rng = np.random.default_rng(11)
    corrected, single, eps_positive = [], [], []
    for _ in range(300):
        scores = rng.normal(size=(11, 32))  # eleven independent attacks, none of which sees membership
        aucs = [stats.mannwhitneyu(s[:16], s[16:]).statistic / 256 for s in scores]
        sets = {"m": [ScoreSet(f"a{i}", "", s, "threshold", threshold=1.0, headline=True) for i, s in enumerate(scores)]}
        rows = [_row("m", f"a{i}", auc) for i, auc in enumerate(aucs)]
        block = audit.privacy_audit(rows, sets, splits, {}, alpha=0.05, delta=DELTA)["m"]
        corrected.append(block["set_audit"]["p_value"] < 0.05)
        single.append(block["set_audit"]["p_value_single"] < 0.05)
        eps_positive.append(block["epsilon_lb"]["honest"] > 0)
    assert np.mean(single) > 0.25  # the selection bias is real on this data
    assert np.mean(corrected) <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / 300)  # and corrected away
    assert np.mean(eps_positive) <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / 300)


def test_privacy_audit_skips_a_model_when_a_test_set_is_missing():
    """Without known non-members (or suspects) there is no set test: the audit is left out, not a crash."""
    scores = np.arange(24.0)
    sets = {"m": [ScoreSet("a", "", scores, "threshold", threshold=10.0, headline=True)]}
    splits = ["member_aux"] * 4 + ["member_test"] * 20
    assert privacy_audit([_row("m", "a", 0.9)], sets, splits, {}, alpha=0.05, delta=DELTA) == {}


def test_privacy_audit_reports_the_tpr_at_1pct_fpr():
    """The block's ``tpr_at_1pct_fpr`` is the 1 % level, not another FPR the rows also carry."""
    splits = ["member_test"] * 10 + ["nonmember_test"] * 10
    sets = {"m": [ScoreSet("a", "", np.arange(20.0)[::-1], "threshold", threshold=10.0, headline=True)]}
    row = {**_row("m", "a", 0.9), "tpr_at_fpr": {"0.01": 0.2, "0.05": 0.6}}
    assert privacy_audit([row], sets, splits, {}, alpha=0.05, delta=DELTA)["m"]["tpr_at_1pct_fpr"] == 0.2


def test_suite_null_is_none_when_any_candidate_has_no_scores():
    """The permutation test must cover every candidate: one without per-sample scores means no test, not a crash."""
    rows = [_row("m", "a", 0.6), _row("m", "b", 0.7)]
    labels, test = np.r_[np.ones(5), np.zeros(5)], np.arange(10)
    assert suite_null(rows, {"a": np.arange(10.0)}, labels, test, seed=0) is None
    assert suite_null(rows, {"a": np.arange(10.0), "b": np.zeros(10)}, labels, test, seed=0)["attacks"] == ["a", "b"]


def _finished_evaluation(folder, **report):
    """A finished evaluation's report.json and scores.csv: one model, two candidates (attack "a" separates D_te,
    "b" is noise) and a floor row, on 2 D_aux + 6 + 6 D_te samples; ``report`` replaces top-level keys."""
    from library.eval.report import score_column

    splits = ["member_aux", "nonmember_aux"] + ["member_test"] * 6 + ["nonmember_test"] * 6
    scores = {"a": np.r_[9.0, -9.0, np.arange(6) + 6.0, np.arange(6.0)],
              "b": np.random.default_rng(1).normal(size=14), "blind": np.zeros(14)}
    report = {"results": [_row("m", "a", 1.0), _row("m", "b", 0.5), _row("m", "blind", 0.5, floor=True)],
              "seeds": {"noise_attacks_bootstrap": 5, "split": 11},
              "samples": {"counts": {s: splits.count(s) for s in dict.fromkeys(splits)}}, **report}
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    header = ["file", "split", "label", *(score_column("m", name) for name in scores)]
    lines = [",".join(header)] + [",".join([f"{i}.png", split, str(int(split.startswith("member"))),
                                            *(repr(float(v[i])) for v in scores.values())])
                                  for i, split in enumerate(splits)]
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    labels = np.array([int(s == "member_test") for s in splits])
    return folder, scores, labels, np.arange(2, 14)


def test_suite_null_from_files_tests_the_candidates_on_d_te_at_the_evaluations_seed(tmp_path):
    """scripts/suite_null.py must give the number the report would hold: same rows, D_te only, the report's seed."""
    from library.eval.rederive import suite_null_from_files

    folder, scores, labels, test = _finished_evaluation(tmp_path / "eval")
    rows = [_row("m", "a", 1.0), _row("m", "b", 0.5)]
    expected = suite_null(rows, scores, labels, test, seed=5)
    assert expected["attacks"] == ["a", "b"] and expected["seed"] == 5 and expected["observed_max_auc"] == 1.0
    assert suite_null_from_files(folder) == {"m": expected}
    assert suite_null_from_files(folder, seed=3) == {"m": suite_null(rows, scores, labels, test, seed=3)}
    lines = (folder / "scores.csv").read_text().splitlines(keepends=True)
    (folder / "scores.csv").write_text("".join(lines[:-1]))  # cut at a line end: it parses, a sample short
    with pytest.raises(DataError, match="holds 5 nonmember_test samples where report.json counts 6"):
        suite_null_from_files(folder)


@pytest.mark.parametrize("broken, message", [
    ({"report.json": "{not json"}, "not a readable evaluation report"),
    ({"report.json": json.dumps({"summary": []})}, "no 'results'"),
    ({"scores.csv": ""}, "no per-sample scores"),
    ({"scores.csv": "file,label,m|a\n0.png,1,0.5\n"}, "no per-sample scores"),
    ({"scores.csv": "file,split,label,m|a,m|b\n0.png,member_test,1,high,0.5\n"}, "a score is not a number"),
    ({"scores.csv": "file,split,label,m|a\n0.png,member_test,1,0.5\n"}, "no column for m 'b'"),
])
def test_suite_null_from_files_names_what_is_wrong_with_the_files(tmp_path, broken, message):
    """A wrong or damaged folder is one DataError saying what is wrong, never a traceback or a silent number."""
    from library.eval.rederive import suite_null_from_files

    folder = _finished_evaluation(tmp_path / "eval", samples={})[0]
    for name, text in broken.items():
        (folder / name).write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        suite_null_from_files(folder)


# ---------------------------------------------------------------------------------------------- end to end


def test_report_audits_the_overfitted_lora_and_not_the_base(mia_world):
    import evaluate_mia

    out = mia_world["root"] / "eval_audit"
    args = base_args(mia_world, out, "--network_weights", str(mia_world["lora"]), "--attacks", "loss", "calibrated",
                     "--no-plots")
    assert evaluate_mia.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    audit = report["privacy_audit"]
    overfit, base = audit["overfit"], audit["base"]
    print({m: (a["worst_case_attack"], a["auc"], a["set_audit"], a["epsilon_lb"]) for m, a in audit.items()})
    assert overfit["auc"] > 0.9 and overfit["set_audit"]["p_value"] < 0.01
    assert overfit["set_audit"]["n_needed"] is not None and overfit["set_audit"]["n_needed"] <= 8
    assert overfit["epsilon_lb"]["oracle"] >= overfit["epsilon_lb"]["honest"] > 0
    assert base["set_audit"]["n_needed"] is None and base["set_audit"]["p_value"] > 0.01
    assert base["epsilon_lb"]["honest"] == 0.0 and overfit["dp_epsilon"] is None
    assert overfit["worst_case_null"]["p_value"] < 0.01 and base["worst_case_null"]["p_value"] > 0.01
    # scripts/suite_null.py re-derives the same test from report.json + scores.csv (for reports older than it).
    from library.eval.rederive import suite_null_from_files

    assert suite_null_from_files(out) == {model: block["worst_case_null"] for model, block in audit.items()}
    cut = out.parent / "cut"  # a copy cut at a line end parses: its missing samples are named, not tested without
    cut.mkdir()
    (cut / "report.json").write_text((out / "report.json").read_text())
    (cut / "scores.csv").write_text("".join((out / "scores.csv").read_text().splitlines(keepends=True)[:-3]))
    with pytest.raises(DataError, match=r"scores\.csv holds \d+ \w+ samples where report\.json counts"):
        suite_null_from_files(cut)
    assert all("epsilon_lb" in row for row in report["results"])
    # what it ran on: seeded trainings can end in other files on another CPU model (docs/results.md §23)
    assert report["machine"]["cpu"] and report["machine"]["cores"] == os.cpu_count() and report["machine"]["torch"]
    assert report["provenance"]["command"] == sys.argv and report["provenance"]["smp_lora"]
    assert report["attacks"]["loss"]["probes"] == []
    md = (out / "report.md").read_text()
    assert "## Worst case over the attack suite" in md and "## Attack cost" in md
    assert "| overfit | " + overfit["worst_case_attack"] + " |" in md
    assert "Table 11" not in md  # neither black-box nor gradient attack ran: no such section
