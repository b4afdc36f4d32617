"""Reading a finished evaluation's ``report.json``: the worst case over the attack suite, per model, and the
suite's tables of ``report.md``.

An adversary picks the attack that works best, so a defence is judged by its *worst case*: among a model's
headline attacks (the rows of the "Main results" table, one per attack of the suite), the one with the highest
AUC, reported with its bootstrap CI, next to the highest TPR at each low FPR over those same attacks. Floor rows
(the blind baseline, which uses no model) are never a model's worst case: they are shown beside it. The demo's
findings and the frontier's points both read it from here. Everything is a pure function of the report dict,
so an older report (no attack suite, no privacy audit) still renders: a missing section is left out, a missing
number is "n/a".

Note: the maximum over several attack variants is biased upward on a small test set; the ``base`` model (no
LoRA, no membership signal) shows that floor, and the suite-wide permutation test of
:func:`library.eval.audit.worst_case_null` says how high the maximum reaches by chance alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

# Metadata keys of a DP-SGD LoRA (library.train.methods.dp): the accountant's (epsilon, delta) upper bound.
DP_EPSILON_KEY = "smp_lora.dp_epsilon"
DP_DELTA_KEY = "smp_lora.dp_delta"
# The paper's Table 11 attacks (registry name -> how the paper names them) and its Pokemon numbers.
TABLE11_ATTACKS = {"blackbox": "black-box (Wu et al. 2022)", "gsa": "gradient (Pang et al. 2023)"}
TABLE11_PAPER = "paper, Pokémon: black-box ASR LoRA 72.4 → SMP 55.4; gradient ASR LoRA 92.4 → SMP 63.5"
ORACLE_T = "[oracle t]"


@dataclass(frozen=True)
class WorstCase:
    """A model's worst case over its headline attacks (see the module docstring)."""

    model: str
    row: dict[str, Any]  # the headline result row with the highest AUC (the first one on a tie)
    tpr_at_fpr: dict[str, float | None]  # FPR level ("0.01", ...) -> highest TPR over the attacks; None: n/a
    floor: dict[str, Any] | None = None  # the model's floor row (blind baseline), if it was run

    @property
    def attack(self) -> str:
        """The label of the strongest attack (e.g. ``calibrated avg``)."""
        return self.row["label"]

    @property
    def auc(self) -> float:
        return self.row["auc"]

    @property
    def auc_ci(self) -> list[float] | None:
        """The 95 % bootstrap CI of :attr:`auc` (None when the report has none)."""
        return self.row.get("auc_ci")


def headline_rows(report: dict[str, Any], model: str | None = None, *, floor: bool = True) -> list[dict[str, Any]]:
    """The report's headline result rows that have an AUC, in report order (of one ``model`` if given; without
    the floor rows if ``floor`` is False)."""
    return [r for r in report["results"]
            if r.get("headline") and r.get("auc") is not None and (model is None or r["model"] == model)
            and (floor or not r.get("floor"))]


def floor_row(report: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The headline floor row (the blind baseline) of ``model``; None when no floor attack was run."""
    return next((r for r in headline_rows(report, model) if r.get("floor")), None)


def worst_case_candidates(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per model (in report order), the rows its worst case is the maximum of: the headline rows with an AUC,
    without the floor rows and without the rows whose checkpoint was chosen on D_te."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in headline_rows(report, floor=False):
        if row.get("checkpoint") != "oracle":
            by_model.setdefault(row["model"], []).append(row)
    return by_model


def worst_case(report: dict[str, Any]) -> dict[str, WorstCase]:
    """Per model (in the order of the report's rows), the worst case over its headline attacks, floor excluded,
    and without the rows whose checkpoint was chosen on D_te (``h' [oracle ckpt]``, the paper's protocol: reported,
    but a headline must not be tuned on the data it is scored on).

    Models without a headline AUC are left out. The TPRs are maximised over the attacks independently of the
    AUC (the attack with the best TPR at 1 % FPR need not be the one with the best AUC); an FPR level none of
    the attacks reaches (``tpr_at_fpr`` null: too few non-members) stays None.
    """
    worst = {}
    for model, rows in worst_case_candidates(report).items():
        levels = dict.fromkeys(level for r in rows for level in r.get("tpr_at_fpr") or {})
        tprs = {level: [r["tpr_at_fpr"][level] for r in rows if r["tpr_at_fpr"].get(level) is not None]
                for level in levels}
        worst[model] = WorstCase(model=model, row=max(rows, key=lambda r: r["auc"]),
                                 tpr_at_fpr={level: max(v) if v else None for level, v in tprs.items()},
                                 floor=floor_row(report, model))
    return worst


def dp_budget(metadata: dict[str, str] | None) -> dict[str, float] | None:
    """The DP-SGD accountant's ``{"epsilon", "delta"}`` recorded in a LoRA's metadata; None for other models."""
    metadata = metadata or {}
    try:
        return {"epsilon": float(metadata[DP_EPSILON_KEY]), "delta": float(metadata.get(DP_DELTA_KEY, "nan"))}
    except (KeyError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ markdown


def p_text(p: float, alpha: float = 0.05, digits: int = 3) -> str:
    """``p`` to ``digits`` significant digits, or more where those would round it across ``alpha`` or onto it
    (p = 0.049995 is "0.049995", not "0.05", beside a verdict that it is below 0.05)."""
    for more in range(digits, digits + 4):
        text = f"{p:.{more}g}"
        if (float(text) < alpha) == (p < alpha) and (float(text) != alpha or p == alpha):
            return text
    return repr(p)


def fmt(value: Any, pct: bool = False) -> str:
    """A number as report.md prints it (``pct``: times 100, two decimals); None -> "n/a"."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if pct else f"{value:.3f}"


def fmt_ci(ci: Sequence[float] | None) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of result rows, the paper's Table 1 columns first."""
    lines = [
        "| model | attack | ASR % (oracle) | ASR % (honest) | \\|AUC−0.5\\|/0.5 | TPR@5%FPR % | AUC [95% CI] | "
        "TPR@1%FPR % | TPR@0.1%FPR % |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        tpr = r["tpr_at_fpr"]
        lines.append(
            f"| {r['model']} | {r['label']} | {fmt(r['asr_oracle'], True)} | {fmt(r['asr_honest'], True)} | "
            f"{fmt(r['auc_deviation'])} | {fmt(tpr.get('0.05'), True)} | {fmt(r['auc'])}{fmt_ci(r.get('auc_ci'))} | "
            f"{fmt(tpr.get('0.01'), True)} | {fmt(tpr.get('0.001'), True)} |"
        )
    return lines


def main_results_table(report: dict[str, Any]) -> list[str]:
    """The "Main results" markdown table of ``report.md`` (every headline row), rebuilt from ``report.json``."""
    return results_table([r for r in report["results"] if r["headline"]])


def _audit_cells(block: dict[str, Any]) -> list[str]:
    """Set audit and empirical-epsilon cells of one model's ``privacy_audit`` block ("n/a" where absent)."""
    sets = block.get("set_audit") or {}
    eps = block.get("epsilon_lb") or {}
    dp = block.get("dp_epsilon")
    n_needed = sets.get("n_needed")
    needed = "n/a" if not sets else (f"{n_needed} of {sets.get('n_suspect')}" if n_needed is not None
                                     else f"not reached ({sets.get('n_suspect')})")
    p_value = "n/a" if sets.get("p_value") is None else p_text(sets["p_value"], sets.get("alpha") or 0.05, 2)
    if sets and "n_attacks" not in sets:  # a report from before the correction for the choice of attack
        p_value, needed = f"{p_value} (uncorrected)", f"{needed} (uncorrected)"
    null = block.get("worst_case_null")
    chance = "n/a" if not null else f"{null['p_value']:.3g} ({fmt(null['null_q95'])})"
    return [chance, p_value, needed, fmt(eps.get("honest")), fmt(eps.get("oracle")), _dp_cell(dp)]


def _dp_cell(dp: dict[str, Any] | None) -> str:
    """The accountant's epsilon (delta) of a DP-SGD model; report.json holds an infinite epsilon (no noise) as null."""
    if not dp:
        return "—"
    epsilon = "∞ (no noise)" if dp.get("epsilon") is None or math.isinf(dp["epsilon"]) else f"{dp['epsilon']:.3g}"
    return epsilon if dp.get("delta") is None else f"{epsilon} (δ {dp['delta']:.0e})"


def worst_case_table(report: dict[str, Any]) -> list[str]:
    """"Worst case over the attack suite": per model the strongest non-floor attack, the floor beside it, the
    set-level audit and the empirical epsilon lower bound next to a DP accountant's upper bound."""
    worst = worst_case(report)
    if not worst:
        return []
    audits = report.get("privacy_audit") or {}
    any_audit = next(iter(audits.values()), {})
    alpha = (any_audit.get("set_audit") or {}).get("alpha")
    eps = any_audit.get("epsilon_lb") or {}
    lines = [
        "| model | worst-case attack | AUC [95% CI] | TPR@1%FPR % | floor (blind) AUC [95% CI] | "
        f"suite-wide p (chance q95) | set audit p | suspect images for p < {alpha if alpha is not None else 'alpha'} | ε lower bound (honest) | "
        "ε lower bound (oracle) | DP ε (accountant, upper bound) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, w in worst.items():
        floor = "—" if w.floor is None else f"{fmt(w.floor['auc'])}{fmt_ci(w.floor.get('auc_ci'))}"
        lines.append(f"| {model} | {w.attack} | {fmt(w.auc)}{fmt_ci(w.auc_ci)} | {fmt(w.tpr_at_fpr.get('0.01'), True)} "
                     f"| {floor} | " + " | ".join(_audit_cells(audits.get(model) or {})) + " |")
    lines += ["", "- worst case: the headline attack with the highest AUC on D_te (floor rows and h' at its oracle "
              "checkpoint, chosen on D_te, excluded); TPR@1%FPR: the highest over those attacks."]
    if audits:
        lines += [
            "- suite-wide p: a permutation test of the worst case (the same shuffle of D_te's member labels for every "
            "headline attack, the maximum AUC recomputed): the chance that the suite's highest AUC reaches the observed "
            "one with no membership signal at all; chance q95: the highest AUC the suite reaches in 95 % of shuffles.",
            "- set audit (dataset inference): one-sided Mann-Whitney U test of the worst-case attack's scores on "
            "D^m_te (the suspect set) against D^nm_te (known non-members); suspect images needed: the smallest n "
            "whose median p over seeded random n-subsets is below alpha. The attack is the best of the model's k "
            "headline attacks on this same D_te, so the p is Bonferroni-corrected for that choice (k × p; the "
            "images needed are counted at alpha / k), and so is the honest ε (Clopper-Pearson at 1 − 0.05 / k).",
            f"- ε lower bound at δ = {eps.get('delta')} from two-sided Clopper-Pearson intervals on TPR and FPR on "
            "D_te: honest at the decision rule fixed on D_aux; oracle = the maximum over every D_te "
            "threshold (multiple testing: optimistic, not a valid bound). A DP-SGD LoRA's accountant ε is an upper "
            "bound on the same axis.",
        ]
    return lines


def oracle_extra_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (model, attack with candidates): the candidate with the best AUC on D_te itself, labelled
    ``[oracle t]`` (the attacker-favourable choice; the headline ``selected`` one is chosen on D_aux)."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report["results"]:
        if r.get("headline") or r.get("auc") is None or not (r.get("info") or {}).get("selected_on_aux"):
            continue
        key = (r["model"], r["attack"])
        if key not in best or r["auc"] > best[key]["auc"]:
            best[key] = r
    return [{**r, "label": f"{r['label']} {ORACLE_T}"} for r in best.values()]


def table11_table(report: dict[str, Any]) -> list[str]:
    """The paper's Table 11 rows (black-box and gradient attacks) in its format: ASR % and |AUC−0.5|/0.5."""
    rows = [r for r in report["results"] if r.get("headline") and r.get("attack") in TABLE11_ATTACKS]
    if not rows:
        return []
    lines = ["| attack (paper Table 11) | model | variant | ASR % (honest) | ASR % (oracle) | \\|AUC−0.5\\|/0.5 | "
             "AUC [95% CI] |", "|---|---|---|---:|---:|---:|---|"]
    for name in TABLE11_ATTACKS:
        for r in (r for r in rows if r["attack"] == name):
            # Both attacks are classifiers fitted on D_aux (their honest ASR: the balanced accuracy of p(member) >
            # 0.5); their oracle ASR is the best threshold on D_te of the same score, as for a threshold attack.
            oracle = r.get("asr_oracle") if r.get("asr_oracle") is not None else \
                r.get("best_threshold_balanced_accuracy")
            lines.append(f"| {TABLE11_ATTACKS[name]} | {r['model']} | {r['label']} | "
                         f"{fmt(r.get('asr_honest'), True)} | {fmt(oracle, True)} | "
                         f"{fmt(r.get('auc_deviation'))} | {fmt(r.get('auc'))}{fmt_ci(r.get('auc_ci'))} |")
    return lines + ["", f"- {TABLE11_PAPER} (ASR as the paper prints it, oracle: the best threshold on D_te of the "
                        "classifier's p(member), as the main table's oracle column is for threshold attacks (it "
                        "leaves these classifier rows n/a); honest: p(member) > 0.5 of the classifier fitted on D_aux; "
                        "both balanced accuracies)."]


def _computed_queries(report: dict[str, Any], name: str, probes: list[str] | None, nominal: float | None) -> str:
    """Per model: UNet forwards the attack's probes triggered (a query shared with an earlier probe is counted
    once, at that probe), total and per sample; "cached" when every probe came from the cache."""
    if probes is None:
        return "n/a"
    if not probes:
        if not nominal:
            return "0"
        own = name == "paper" and (report.get("config") or {}).get("paper_features") != "multi_t_loss"
        return "its own random-t draws (feature engine)" if own else "shared fixed-t losses"
    runs = (report.get("features") or {}).get("probes") or {}
    n = sum(((report.get("samples") or {}).get("counts") or {}).values()) or None
    cells = []
    for model, by_probe in runs.items():
        mine = [by_probe[p] for p in probes if p in by_probe]
        if not mine:
            continue
        total = sum(int(run.get("queries_computed") or 0) for run in mine)
        cached = all(run.get("cache_hit") for run in mine)
        per = f" ({total / n:.3g}/sample)" if n else ""
        cells.append(f"{model}: cached" if cached else f"{model}: {total}{per}")
    return "; ".join(cells) or "n/a"


def cost_table(report: dict[str, Any]) -> list[str]:
    """Per attack: threat model, nominal UNet queries per sample, queries computed per model, citation."""
    attacks = report.get("attacks") or {}
    if not attacks:
        return []
    lines = ["| attack | threat model | UNet queries / sample (nominal) | queries computed per model | citation |",
             "|---|---|---:|---|---|"]
    for name, settings in attacks.items():
        nominal = settings.get("queries_per_sample")
        lines.append(f"| {name} | {_cell(settings.get('threat_model') or 'n/a')} | "
                     f"{'n/a' if nominal is None else f'{nominal:g}'} | "
                     f"{_cell(_computed_queries(report, name, settings.get('probes'), nominal))} | "
                     f"{_cell(settings.get('citation') or '—')} |")
    return lines + ["", "- a backward pass counts as 2 forwards; a UNet query shared by several probes (same sample, "
                        "t, noise, caption) is computed once and counted at the first probe that asked for it."]


def suite_sections(report: dict[str, Any]) -> list[str]:
    """The attack-suite sections of report.md: worst case, oracle extras, paper Table 11 rows, attack cost."""
    lines: list[str] = []
    sections = [("Worst case over the attack suite", worst_case_table(report)),
                (f"Oracle extras: the best candidate on D_te {ORACLE_T}", results_table(oracle_extra_rows(report))
                 if oracle_extra_rows(report) else []),
                ("Paper Table 11 rows (black-box and gradient attacks)", table11_table(report)),
                ("Attack cost", cost_table(report))]
    for title, body in sections:
        if body:
            lines += [f"## {title}", "", *body, ""]
    return lines


def paper_honest_row(report: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The paper's h' row of ``model`` at the honest checkpoint (D_te never seen), if the paper attack ran."""
    return next((r for r in report["results"] if r["model"] == model and r.get("attack") == "paper"
                 and "honest" in str(r.get("label"))), None)


def privacy_utility_table(report: dict[str, Any],
                          extra: Sequence[tuple[str, dict[str, Any], str]] = ()) -> list[str]:
    """Per model the worst case over the suite beside the paper's h' and the utility that generalises
    (conditional accuracy and the utility retained U, with --quality and a classifier; proxy FD): issue 16's table.
    ``extra``: rows of other reports, ``(label, report, model)`` (the demo's best defence from the frontier's report,
    attacked on the same D_te with the same settings)."""
    lines = ["| model | worst-case attack | AUC [95% CI] | TPR@1%FPR % | paper h' (honest) AUC / ASR % | "
             "conditional accuracy % | U | proxy FD (digits) |", "|---|---|---|---:|---|---:|---:|---:|"]
    rows = [(model, report, model) for model in worst_case(report)] + list(extra)
    for label, source, model in rows:
        w = worst_case(source).get(model)
        if w is None:
            continue
        paper = paper_honest_row(source, model)
        paper_cell = "—" if paper is None else f"{fmt(paper.get('auc'))} / {fmt(paper.get('asr_honest'), True)}"
        row = (source.get("utility") or {}).get(model) or {}
        cells = [label, w.attack, f"{fmt(w.auc)}{fmt_ci(w.auc_ci)}", fmt(w.tpr_at_fpr.get("0.01"), True), paper_cell,
                 fmt(row.get("conditional_accuracy"), True), fmt(row.get("utility_retained")),
                 fmt(row.get("proxy_fd_digits"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


__all__ = ["DP_EPSILON_KEY", "ORACLE_T", "WorstCase", "cost_table", "dp_budget", "floor_row", "headline_rows",
           "main_results_table", "oracle_extra_rows", "paper_honest_row", "privacy_utility_table", "results_table",
           "suite_sections", "table11_table", "worst_case", "worst_case_candidates", "worst_case_table"]
