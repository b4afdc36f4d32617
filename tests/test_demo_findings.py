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
