"""library.eval.summary: the worst case over attacks read from a report.json dict (pure, no model)."""

from __future__ import annotations

from library.eval.summary import headline_rows, main_results_table, worst_case


def _row(model, label, auc, tpr1=None, tpr5=None, headline=True, ci=None):
    return {"model": model, "label": label, "attack": label.split()[0], "headline": headline, "auc": auc,
            "auc_ci": ci, "asr_oracle": 0.5, "asr_honest": 0.5, "auc_deviation": abs(auc - 0.5) / 0.5 if auc else None,
            "tpr_at_fpr": {"0.05": tpr5, "0.01": tpr1, "0.001": None}}


REPORT = {"results": [
    _row("base", "loss", 0.52, tpr5=0.1),
    _row("base", "calibrated avg", 0.49, tpr5=0.2),
    _row("lora", "loss", 0.80, tpr1=0.30, tpr5=0.40, ci=[0.7, 0.9]),
    _row("lora", "calibrated avg", 0.90, tpr1=0.10, tpr5=0.60, ci=[0.85, 0.95]),
    _row("lora", "loss t=50", 0.99, tpr1=0.90, headline=False),  # a per-timestep variant: not a headline attack
    _row("smp_lora", "loss", 0.60, ci=[0.5, 0.7]),
    _row("smp_lora", "paper h'", 0.60, ci=[0.4, 0.8]),  # a tie: the first row stays
    {**_row("dp_lora", "loss", 0.5), "auc": None},  # no AUC: the model has no worst case
]}


def test_worst_case_is_the_highest_headline_auc_and_the_highest_tprs():
    worst = worst_case(REPORT)
    assert list(worst) == ["base", "lora", "smp_lora"]
    lora = worst["lora"]
    assert (lora.attack, lora.auc, lora.auc_ci) == ("calibrated avg", 0.90, [0.85, 0.95])
    # TPRs: the maximum over the headline attacks, each level on its own (not the worst-AUC row's)
    assert lora.tpr_at_fpr == {"0.05": 0.60, "0.01": 0.30, "0.001": None}
    assert worst["base"].attack == "loss" and worst["base"].tpr_at_fpr["0.01"] is None
    assert worst["smp_lora"].attack == "loss" and worst["smp_lora"].auc_ci == [0.5, 0.7]


def test_headline_rows_and_the_main_table_come_from_the_report():
    assert [r["label"] for r in headline_rows(REPORT, "lora")] == ["loss", "calibrated avg"]
    table = main_results_table(REPORT)
    assert table[0].startswith("| model | attack |") and len(table) == 2 + 7  # header, rule, the headline rows
    assert any(line.startswith("| lora | calibrated avg |") and "0.900 [0.850, 0.950]" in line for line in table)
    assert not any("loss t=50" in line for line in table)
