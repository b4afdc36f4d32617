"""library.demo.findings: the demo's verdicts are computed from the report's numbers, and change with them."""

from __future__ import annotations

from library.demo.findings import chance_findings, findings, utility_findings


def _row(model: str, attack: str, auc: float, ci: tuple[float, float], label: str | None = None) -> dict:
    return {"model": model, "attack": attack, "label": label or attack, "headline": True, "floor": False, "auc": auc,
            "auc_ci": list(ci), "tpr_at_fpr": {"0.01": 0.1}}


def _null(p_value: float, observed: float) -> dict:
    return {"worst_case_null": {"p_value": p_value, "observed_max_auc": observed, "null_median": 0.58,
                                "null_q95": 0.64, "n_attacks": 9}}


def _report(smp_auc: float, smp_ci: tuple[float, float], base_p: float) -> dict:
    return {
        "results": [_row("base", "loss", 0.57, (0.46, 0.68)), _row("lora", "calibrated", 0.92, (0.87, 0.97)),
                    _row("smp_lora", "clid", smp_auc, smp_ci)],
        "privacy_audit": {"base": _null(base_p, 0.57), "lora": _null(1e-4, 0.92), "smp_lora": _null(0.01, smp_auc)},
        "utility": {"base": {"conditional_accuracy": 0.1}, "lora": {"conditional_accuracy": 0.9},
                    "smp_lora": {"conditional_accuracy": 0.85, "utility_retained": 0.94}},
    }


def test_a_defence_is_judged_against_plain_lora_by_the_cis():
    lower = "\n".join(findings(_report(0.65, (0.54, 0.75), base_p=0.6)))
    assert "smp_lora vs plain LoRA under the strongest attack: 0.650 vs 0.920; smp_lora lowers it" in lower
    assert "The suite still finds its members (suite-wide p = 0.01)." in lower
    quiet = _report(0.65, (0.54, 0.75), base_p=0.6)
    quiet["privacy_audit"]["smp_lora"]["worst_case_null"]["p_value"] = 0.0501
    assert "The suite finds no signal in it at the 5 % level (suite-wide p = 0.0501)." in "\n".join(findings(quiet))
    assert "`lora`: strongest attack `calibrated`, AUC 0.920 [0.870, 0.970]; suite-wide permutation p = 0.0001" in lower
    same = "\n".join(findings(_report(0.90, (0.84, 0.95), base_p=0.6)))
    assert "smp_lora does NOT measurably reduce it (the 95 % CIs overlap)" in same


def test_the_base_is_called_at_chance_only_when_the_suite_wide_test_says_so():
    (at_chance,) = chance_findings(_report(0.65, (0.54, 0.75), base_p=0.6)["privacy_audit"]["base"])
    assert "highest AUC 0.570" in at_chance and "reaches 0.640 in 5 % of label shuffles" in at_chance
    assert at_chance.endswith("at chance (p = 0.6), as it must be.")
    (leaking,) = chance_findings(_report(0.65, (0.54, 0.75), base_p=0.01)["privacy_audit"]["base"])
    assert "NOT at chance (p = 0.01)" in leaking
    assert chance_findings(None) == [] and chance_findings({"set_audit": {}}) == []  # an older report: no line


def test_utility_lines_read_conditional_accuracy_and_u():
    lines = utility_findings(_report(0.65, (0.54, 0.75), base_p=0.6))
    assert lines[0] == ("- conditional accuracy (samples of the fine-tuned digits read as the digit asked for): base "
                        "10.0 %, plain LoRA 90.0 %.")
    assert "`smp_lora` keeps U = 0.94 of plain LoRA's gain over the base (conditional accuracy 85.0 %)." in lines[1]


def test_a_p_value_is_never_printed_across_the_line_its_verdict_draws():
    from library.eval.summary import p_text

    assert p_text(500 / 10001) == "0.049995" and p_text(0.0123456) == "0.0123" and p_text(0.62) == "0.62"
    (line,) = chance_findings({"worst_case_null": {"p_value": 500 / 10001, "n_attacks": 11, "observed_max_auc": 0.7,
                                                   "null_q95": 0.65, "null_median": 0.58}})
    assert "NOT at chance (p = 0.049995)" in line


def _verdict(smp_ci: tuple[float, float], lora_ci: tuple[float, float] = (0.87, 0.97)) -> str:
    report = _report(0.5 * sum(smp_ci), smp_ci, base_p=0.6)
    report["results"][1]["auc_ci"] = list(lora_ci)
    (line,) = [line for line in findings(report) if " vs plain LoRA under the strongest attack" in line]
    return line


def test_the_ci_verdict_needs_the_whole_interval_on_one_side():
    # "makes it worse" only when the defence's LOWER bound clears plain LoRA's UPPER one (guards the bounds and the
    # strictness of the "worse" branch, never exercised above); touching CIs overlap: no verdict either way.
    assert "smp_lora makes it worse: the 95 % CIs do not overlap" in _verdict((0.75, 0.95), (0.50, 0.70))
    assert "does NOT measurably reduce it" in _verdict((0.65, 0.80), (0.50, 0.70))  # higher, but overlapping
    assert "does NOT measurably reduce it" in _verdict((0.70, 0.80), (0.50, 0.70))  # touching from above
    assert "does NOT measurably reduce it" in _verdict((0.60, 0.87))  # touching from below
    # plain LoRA is the reference, never judged against itself
    assert not any(line.startswith("- lora vs plain LoRA") for line in findings(_report(0.65, (0.54, 0.75), 0.6)))


def test_p_exactly_at_005_is_no_signal_as_documented():
    # p >= 0.05: the suite finds no signal / the base is at chance (docs: "p >= 0.05"); 0.05 itself is on that side
    report = _report(0.65, (0.54, 0.75), base_p=0.05)
    report["privacy_audit"]["smp_lora"]["worst_case_null"]["p_value"] = 0.05
    text = "\n".join(findings(report))
    assert "The suite finds no signal in it at the 5 % level (suite-wide p = 0.05)." in text
    assert "at chance (p = 0.05), as it must be." in text


def test_utility_lines_say_when_plain_lora_learned_nothing_and_skip_its_own_u():
    report = _report(0.65, (0.54, 0.75), base_p=0.6)
    report["utility"]["lora"].update(conditional_accuracy=0.1, utility_retained=1.0)  # its own U: 1 by definition
    lines = utility_findings(report)
    assert lines[0].endswith("plain LoRA 10.0 % - plain LoRA learned nothing that generalises.")  # equal: no gain
    assert not any("`lora` keeps U" in line for line in lines) and any("`smp_lora` keeps U" in line for line in lines)
    assert findings(report)[-len(lines) - 1:-1] == lines  # the demo prints them after the privacy verdicts
    # a model without a conditional accuracy (no classifier reading) gives no accuracy line, not a crash
    report["utility"]["base"]["conditional_accuracy"] = None
    assert not any(line.startswith("- conditional accuracy") for line in utility_findings(report))


def _paper(auc: float, ci: tuple[float, float], draws: int = 1) -> dict:
    report = _report(0.65, (0.54, 0.75), base_p=0.6)
    report["results"] += [{**_row("lora", "paper", auc, ci, label="h' [honest ckpt]"), "headline": False},
                          {**_row("base", "paper", 0.9, (0.85, 0.95), label="h' [honest ckpt]"), "headline": False}]
    report["attacks"] = {"paper": {"draws": draws}}
    report["features"] = {"settings": {"paper_max_timestep": 400}}
    return report


def test_the_paper_attacker_line_reads_plain_loras_honest_row_and_its_lower_ci_bound():
    # the paper's regime: plain LoRA's h' CI lies above 0.5 (its lower bound, not the point estimate or upper bound)
    (seen,) = [line for line in utility_findings(_paper(0.62, (0.51, 0.73))) if "paper's own attacker" in line]
    assert seen == ("- the paper's own attacker h' (honest checkpoint) on plain LoRA: AUC 0.620 [0.510, 0.730]: "
                    "it detects membership (CI above 0.5), the paper's regime.")
    for ci in ((0.45, 0.75), (0.50, 0.70)):  # contains 0.5 (or touches it): not the paper's regime
        (line,) = [line for line in utility_findings(_paper(0.6, ci)) if "paper's own attacker" in line]
        assert line.endswith("its CI contains 0.5: the demo is NOT in the paper's regime for this attacker.")
    # several draws per sample are said, one draw is not
    (drawn,) = [line for line in utility_findings(_paper(0.62, (0.51, 0.73), draws=4)) if "attacker h'" in line]
    assert "h' with 4 draws per sample at t < 400 (honest checkpoint)" in drawn


def test_a_defence_without_a_ci_is_judged_as_not_reducing_the_attack():
    """A row without a bootstrap CI (n_bootstrap 0) must give "n/a"-like text and no verdict, never a crash."""
    report = _report(0.65, (0.54, 0.75), base_p=0.6)
    report["results"][2]["auc_ci"] = None
    text = "\n".join(findings(report))
    assert "`smp_lora`: strongest attack `clid`, AUC 0.650 [nan, nan]" in text
    assert "smp_lora does NOT measurably reduce it (the 95 % CIs overlap)" in text


def test_each_models_line_carries_its_own_suite_wide_p():
    """The p beside a model's strongest attack and in its verdict is that model's permutation test, not another's."""
    report = _report(0.65, (0.54, 0.75), base_p=0.6)
    report["results"].append(_row("mp_lora", "loss", 0.88, (0.80, 0.95)))
    report["privacy_audit"]["mp_lora"] = _null(0.3, 0.88)
    text = "\n".join(findings(report))
    assert "`base`: strongest attack `loss`, AUC 0.570 [0.460, 0.680]; suite-wide permutation p = 0.6" in text
    assert "`mp_lora`: strongest attack `loss`, AUC 0.880 [0.800, 0.950]; suite-wide permutation p = 0.3" in text
    assert "smp_lora does NOT" not in text and "The suite still finds its members (suite-wide p = 0.01)." in text
    assert "mp_lora does NOT measurably reduce it (the 95 % CIs overlap). The suite finds no signal in it at the 5 % " \
           "level (suite-wide p = 0.3)." in text


def test_a_paper_row_without_a_ci_gives_no_regime_line():
    """Without a CI the regime cannot be judged: no h' line (not a crash on the missing bounds)."""
    report = _paper(0.62, (0.51, 0.73))
    report["results"][3]["auc_ci"] = None
    assert not any("paper's own attacker" in line for line in utility_findings(report))
