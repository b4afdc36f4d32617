"""The demo's findings: plain-language lines computed from an evaluation's ``report.json`` (never written by hand),
printed after the demo's table and written into its ``report.md``.

Pure functions of the report dict: does each defence lower the strongest attack of the suite (95 % CIs against plain
LoRA's), is the base model at chance under the whole suite (the suite-wide permutation test), what the fine-tunes
learned that generalises (conditional accuracy, U), and whether the paper's own attacker sees plain LoRA.
"""

from __future__ import annotations

from library.eval.summary import p_text, paper_honest_row, worst_case


def findings(report: dict) -> list[str]:
    """Plain-language lines computed from the numbers: does each defence lower the strongest attack?"""
    best = worst_case(report)
    audits = report.get("privacy_audit") or {}
    lines = ["## What the numbers say (computed, not written by hand)", ""]
    for model, worst in best.items():
        ci = worst.auc_ci or [float("nan"), float("nan")]
        null = (audits.get(model) or {}).get("worst_case_null")
        lines.append(f"- `{model}`: strongest attack `{worst.attack}`, AUC {worst.auc:.3f} "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}]" + ("" if not null else
                                                    f"; suite-wide permutation p = {p_text(null['p_value'])}"))
    lines += chance_findings(audits.get("base"))
    plain = best.get("lora")
    for method, worst in best.items():
        if plain is None or method in ("base", "lora"):
            continue
        plain_ci, ci = plain.auc_ci, worst.auc_ci
        if ci and plain_ci and ci[1] < plain_ci[0]:
            verdict = "lowers it: the 95 % CIs do not overlap"
        elif ci and plain_ci and ci[0] > plain_ci[1]:
            verdict = "makes it worse: the 95 % CIs do not overlap"
        else:
            verdict = "does NOT measurably reduce it (the 95 % CIs overlap)"
        null = (audits.get(method) or {}).get("worst_case_null")
        signal = "" if not null else (
            f" The suite finds no signal in it at the 5 % level (suite-wide p = {p_text(null['p_value'])})."
            if null["p_value"] >= 0.05 else
            f" The suite still finds its members (suite-wide p = {p_text(null['p_value'])}).")
        lines.append(f"- {method} vs plain LoRA under the strongest attack: {worst.auc:.3f} vs {plain.auc:.3f}; "
                     f"{method} {verdict}.{signal}")
    return lines + utility_findings(report) + [""]


def chance_findings(base_audit: dict | None) -> list[str]:
    """Whether the base model (trained on neither members nor non-members) is at chance under the whole suite,
    by the suite-wide permutation test of its worst case (library.eval.audit.worst_case_null)."""
    null = (base_audit or {}).get("worst_case_null")
    if not null:
        return []
    head = (f"- the base model under the whole suite ({null['n_attacks']} attacks): highest AUC "
            f"{null['observed_max_auc']:.3f}, while the highest of {null['n_attacks']} AUCs with no membership signal "
            f"reaches {null['null_q95']:.3f} in 5 % of label shuffles (median {null['null_median']:.3f}): ")
    if null["p_value"] >= 0.05:
        return [head + f"at chance (p = {p_text(null['p_value'])}), as it must be."]
    return [head + f"NOT at chance (p = {p_text(null['p_value'])}): the split or an attack leaks; do not trust the rows."]


def utility_findings(report: dict) -> list[str]:
    """What the fine-tunes learned that generalises (conditional accuracy, U) and whether the paper's h' sees plain
    LoRA: lines computed from the numbers (none without --quality)."""
    utility = report.get("utility") or {}
    accuracy = {m: row["conditional_accuracy"] for m, row in utility.items()
                if row.get("conditional_accuracy") is not None}
    lines = []
    if "base" in accuracy and "lora" in accuracy:
        lines.append(f"- conditional accuracy (samples of the fine-tuned digits read as the digit asked for): base "
                     f"{100 * accuracy['base']:.1f} %, plain LoRA {100 * accuracy['lora']:.1f} %"
                     + ("" if accuracy["lora"] > accuracy["base"] else " - plain LoRA learned nothing that generalises")
                     + ".")
    for model, row in utility.items():
        if model not in ("base", "lora") and row.get("utility_retained") is not None:
            lines.append(f"- `{model}` keeps U = {row['utility_retained']:.2f} of plain LoRA's gain over the base "
                         f"(conditional accuracy {100 * row['conditional_accuracy']:.1f} %).")
    paper = paper_honest_row(report, "lora")
    if paper is not None and paper.get("auc_ci"):
        seen = paper["auc_ci"][0] > 0.5
        settings = report.get("attacks", {}).get("paper", {})
        drawn = (f" with {settings['draws']} draws per sample at t < "
                 f"{report['features']['settings']['paper_max_timestep']}" if settings.get("draws", 1) > 1 else "")
        lines.append(f"- the paper's own attacker h'{drawn} (honest checkpoint) on plain LoRA: AUC {paper['auc']:.3f} "
                     f"[{paper['auc_ci'][0]:.3f}, {paper['auc_ci'][1]:.3f}]: "
                     + ("it detects membership (CI above 0.5), the paper's regime." if seen else
                        "its CI contains 0.5: the demo is NOT in the paper's regime for this attacker."))
    return lines


__all__ = ["chance_findings", "findings", "utility_findings"]
