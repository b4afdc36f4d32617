"""library.eval.summary: the worst case over attacks read from a report.json dict (pure, no model)."""

from __future__ import annotations

from library.eval.summary import (
    dp_budget,
    floor_row,
    headline_rows,
    main_results_table,
    oracle_extra_rows,
    privacy_utility_table,
    results_table,
    suite_sections,
    worst_case,
)


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


def test_the_results_table_puts_each_value_under_its_own_header():
    """Distinct values in every column, so a value printed under a neighbour's header shows."""
    import re

    row = {**_row("lora", "loss avg", 0.8, tpr1=0.3, tpr5=0.5, ci=[0.7, 0.9]), "asr_oracle": 0.9, "asr_honest": 0.7}
    row["tpr_at_fpr"]["0.001"] = 0.1
    header, _, line = results_table([row])

    def cells(text):  # split on the column pipes, not on the escaped ones of |AUC−0.5|
        return [c.strip() for c in re.split(r"(?<!\\)\|", text)[1:-1]]

    table = dict(zip(cells(header), cells(line)))
    assert table == {"model": "lora", "attack": "loss avg", "ASR % (oracle)": "90.00", "ASR % (honest)": "70.00",
                     "\\|AUC−0.5\\|/0.5": "0.600", "TPR@5%FPR %": "50.00", "AUC [95% CI]": "0.800 [0.700, 0.900]",
                     "TPR@1%FPR %": "30.00", "TPR@0.1%FPR %": "10.00"}


# ---------------------------------------------------------------------------------------------- the attack suite


def _suite_row(model, attack, variant, auc, headline=True, floor=False, selected=None, asr=(0.5, None)):
    row = _row(model, f"{attack} {variant}".strip(), auc, tpr1=0.1, headline=headline, ci=[auc - 0.05, auc + 0.05])
    row.update(attack=attack, variant=variant, floor=floor, asr_honest=asr[0], asr_oracle=asr[1],
               info={"selected_on_aux": selected} if selected else {})
    return row


SUITE = {
    "results": [
        _suite_row("lora", "sima", "selected", 0.80, selected="t=50"),
        _suite_row("lora", "sima", "t=50", 0.80, headline=False, selected="t=50"),
        _suite_row("lora", "sima", "t=100", 0.88, headline=False, selected="t=50"),  # the best on D_te: oracle extra
        _suite_row("lora", "gsa", "", 0.90, asr=(0.85, 0.92)),
        # a classifier without an oracle checkpoint: its oracle ASR is its best threshold on D_te
        {**_suite_row("lora", "blackbox", "", 0.70, asr=(0.66, None)), "best_threshold_balanced_accuracy": 0.69},
        _suite_row("lora", "blind", "", 0.95, floor=True),  # a leaky split would show here; never the worst case
        _suite_row("smp_lora", "gsa", "", 0.60, asr=(0.58, 0.63)),
        _suite_row("smp_lora", "blind", "", 0.50, floor=True),
    ],
    "attacks": {
        "sima": {"threat_model": "gray-box: eps | caption", "queries_per_sample": 2.0, "citation": "Rao et al. 2025",
                 "probes": ["sima"]},
        "gsa": {"threat_model": "white-box", "queries_per_sample": 30.0, "citation": "Pang et al. 2023",
                "probes": ["gsa"]},
        "blackbox": {"threat_model": "black-box", "queries_per_sample": 50.0, "citation": "Wu et al. 2022"},
        "blind": {"threat_model": "no model", "queries_per_sample": 0.0, "citation": "Das et al. 2024", "probes": []},
        "paper": {"threat_model": "gray-box", "queries_per_sample": 16.0, "citation": "the paper", "probes": []},
        "loss": {"threat_model": "gray-box", "queries_per_sample": 8.0, "citation": "Yeom et al.", "probes": []},
    },
    "features": {"probes": {"lora": {"sima": {"queries_computed": 40, "cache_hit": False},
                                     "gsa": {"queries_computed": 600, "cache_hit": False}},
                            "smp_lora": {"sima": {"queries_computed": 0, "cache_hit": True},
                                         "gsa": {"queries_computed": 0, "cache_hit": True}}}},
    "samples": {"counts": {"member_test": 10, "nonmember_test": 10}},
    "privacy_audit": {
        "lora": {"set_audit": {"p_value": 1.2e-5, "n_needed": 4, "alpha": 0.01, "n_suspect": 10, "n_attacks": 3},
                 "epsilon_lb": {"honest": 1.234, "oracle": 2.5, "delta": 1e-5, "confidence": 0.95},
                 "dp_epsilon": None, "worst_case_null": {"p_value": 1e-4, "null_q95": 0.712}},
        "smp_lora": {"set_audit": {"p_value": 0.2, "n_needed": None, "alpha": 0.01, "n_suspect": 10},
                     "epsilon_lb": {"honest": 0.0, "oracle": 0.1, "delta": 1e-5, "confidence": 0.95},
                     "dp_epsilon": {"epsilon": 8.0, "delta": 1e-5}},
    },
}


def test_the_floor_is_never_the_worst_case_but_is_shown_beside_it():
    worst = worst_case(SUITE)
    assert worst["lora"].attack == "gsa" and worst["lora"].auc == 0.90  # not the blind row's 0.95
    assert worst["lora"].floor["label"] == "blind" and floor_row(SUITE, "smp_lora")["auc"] == 0.50
    assert floor_row(REPORT, "lora") is None and worst_case(REPORT)["lora"].floor is None
    assert [r["label"] for r in headline_rows(SUITE, "lora", floor=False)] == ["sima selected", "gsa", "blackbox"]
    only_floor = {"results": [_suite_row("m", "blind", "", 0.7, floor=True)]}
    assert worst_case(only_floor) == {}  # a model with only the floor has no worst case


def test_suite_sections_worst_case_oracle_extras_table11_and_cost():
    text = "\n".join(suite_sections(SUITE))
    lines = text.splitlines()
    assert "## Worst case over the attack suite" in text and "suspect images for p < 0.01" in text
    lora = next(line for line in lines if line.startswith("| lora | gsa |"))
    assert "0.900 [0.850, 0.950]" in lora and "0.950 [0.900, 1.000]" in lora  # the floor beside the worst case
    assert "| 0.0001 (0.712) | 1.2e-05 | 4 of 10 | 1.234 | 2.500 | — |" in lora  # suite-wide p (chance q95)
    smp = next(line for line in lines if line.startswith("| smp_lora | gsa |"))
    assert "| n/a | 0.2 (uncorrected) | not reached (10) (uncorrected)" in smp  # a report from before the correction
    assert "| 8 (δ 1e-05) |" in smp  # the accountant's upper bound beside the bound
    # Oracle extras: sima's best candidate on D_te (t=100), labelled; the D_aux choice stays the headline.
    extras = oracle_extra_rows(SUITE)
    assert [(r["model"], r["label"], r["auc"]) for r in extras] == [("lora", "sima t=100 [oracle t]", 0.88)]
    assert "| lora | sima t=100 [oracle t] |" in text
    # Table 11: black-box and gradient rows with ASR % and |AUC-0.5|/0.5.
    assert "| gradient (Pang et al. 2023) | lora | gsa | 85.00 | 92.00 | 0.800 |" in text
    assert "| black-box (Wu et al. 2022) | lora | blackbox | 66.00 | 69.00 | 0.400 |" in text
    assert "| gradient (Pang et al. 2023) | smp_lora | gsa | 58.00 | 63.00 | 0.200 |" in text
    # Cost: nominal, computed per model (per sample over the 20 samples), cached, unknown probes, escaped pipes.
    assert "| sima | gray-box: eps \\| caption | 2 | lora: 40 (2/sample); smp_lora: cached | Rao et al. 2025 |" in text
    assert "| blackbox | black-box | 50 | n/a |" in text and "| blind | no model | 0 | 0 |" in text
    assert "| paper | gray-box | 16 | its own random-t draws (feature engine) |" in text  # not the shared losses
    assert "| loss | gray-box | 8 | shared fixed-t losses |" in text


def test_an_older_report_renders_without_the_suite():
    text = "\n".join(suite_sections(REPORT))
    assert "## Worst case over the attack suite" in text and "| lora | calibrated avg | 0.900 [0.850, 0.950] |" in text
    assert "| n/a | n/a | n/a | n/a | — |" in text  # no privacy audit: every audit cell n/a
    for absent in ("Oracle extras", "Table 11", "Attack cost", "set audit (dataset inference)"):
        assert absent not in text
    assert suite_sections({"results": []}) == []


def test_dp_budget_reads_the_accountant_from_lora_metadata():
    assert dp_budget({"smp_lora.dp_epsilon": "3.5", "smp_lora.dp_delta": "1e-05"}) == {"epsilon": 3.5, "delta": 1e-5}
    assert dp_budget({"smp_lora.method": "lora"}) is None and dp_budget(None) is None
    assert dp_budget({"smp_lora.dp_epsilon": "not a number"}) is None  # unreadable metadata: no budget, no crash


def test_the_dp_cell_says_no_noise_for_an_infinite_epsilon_and_shows_delta_only_when_known():
    """An accountant epsilon of inf (no noise) must not print as a number, and a missing delta as no "(δ ...)"."""
    from library.eval.summary import _audit_cells

    def dp_cell(dp):
        return _audit_cells({"dp_epsilon": dp})[-1]

    assert dp_cell({"epsilon": float("inf"), "delta": 1e-5}) == "∞ (no noise) (δ 1e-05)"
    assert dp_cell({"epsilon": None, "delta": None}) == "∞ (no noise)"
    assert dp_cell({"epsilon": 3.5, "delta": None}) == "3.5" and dp_cell(None) == "—"


def test_the_worst_case_table_prints_the_tpr_at_1pct_fpr():
    """The TPR@1%FPR column holds the 1 % level (0.30 for lora), not the 5 % one (0.60) the rows also carry."""
    from library.eval.summary import worst_case_table

    lora = next(line for line in worst_case_table(REPORT) if line.startswith("| lora |"))
    assert lora.startswith("| lora | calibrated avg | 0.900 [0.850, 0.950] | 30.00 |")


def test_oracle_extras_skip_headline_rows_and_rows_without_an_auc():
    """An oracle extra is a D_te-chosen candidate beside the headline, never the headline itself or an n/a AUC."""
    rows = [_suite_row("lora", "sima", "selected", 0.90, selected="t=50"),
            _suite_row("lora", "sima", "t=50", 0.80, headline=False, selected="t=50"),
            {**_suite_row("lora", "sima", "t=100", 0.70, headline=False, selected="t=50"), "auc": None}]
    assert [r["label"] for r in oracle_extra_rows({"results": rows})] == ["sima t=50 [oracle t]"]


def test_privacy_utility_table_puts_the_worst_case_beside_the_paper_attacker_and_the_utility():
    paper = {**_row("lora", "paper h' [honest ckpt]", 0.70, ci=[0.6, 0.8]), "attack": "paper", "asr_honest": 0.66}
    report = {"results": REPORT["results"] + [paper],
              "utility": {"base": {"conditional_accuracy": 0.1, "utility_retained": 0.0, "proxy_fd_digits": 30.0},
                          "lora": {"conditional_accuracy": 0.9, "utility_retained": 1.0, "proxy_fd_digits": 5.0}}}
    table = privacy_utility_table(report)
    assert table[0].startswith("| model | worst-case attack |") and len(table) == 2 + 3
    lora = next(line for line in table if line.startswith("| lora |"))
    assert lora == ("| lora | calibrated avg | 0.900 [0.850, 0.950] | 30.00 | 0.700 / 66.00 | 90.00 | 1.000 | "
                    "5.000 |")
    smp = next(line for line in table if line.startswith("| smp_lora |"))
    assert smp.endswith("| — | n/a | n/a | n/a |")  # no paper row, no utility: said, not invented
    # Rows of another report (the demo's fifth row, from the frontier's evaluation) come last, under their label.
    extra = privacy_utility_table(report, [("best (frontier)", report, "lora"), ("absent", report, "nothing")])
    assert extra[:-1] == table and extra[-1] == lora.replace("| lora |", "| best (frontier) |", 1)


def test_the_oracle_checkpoint_is_never_the_worst_case():
    """h' at its D_te-chosen checkpoint is reported, but the headline worst case is never tuned on D_te."""
    oracle = {**_row("lora", "paper h' [oracle ckpt]", 0.99), "attack": "paper", "checkpoint": "oracle"}
    honest = {**_row("lora", "paper h' [honest ckpt]", 0.60), "attack": "paper", "checkpoint": "honest"}
    worst = worst_case({"results": [_row("lora", "loss avg", 0.70), oracle, honest]})["lora"]
    assert worst.attack == "loss avg" and worst.auc == 0.70
    assert worst_case({"results": [oracle]}) == {}


def test_the_set_audit_p_is_never_printed_across_its_alpha():
    from library.eval.summary import _audit_cells

    cells = _audit_cells({"set_audit": {"p_value": 0.010441, "n_needed": None, "alpha": 0.01, "n_suspect": 50,
                                        "n_attacks": 11}})
    assert cells[1:3] == ["0.0104", "not reached (50)"]  # not "0.01" beside "not reached at p < 0.01"
