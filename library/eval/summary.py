"""Reading a finished evaluation's ``report.json``: the worst case over the attacks, per model.

An adversary picks the attack that works best, so a defence is judged by its *worst case*: among a model's
headline attacks (the rows of the "Main results" table, one per attack of the suite), the one with the highest
AUC, reported with its bootstrap CI, next to the highest TPR at each low FPR over those same attacks. The demo's
findings and the frontier's points both read it from here. Everything is a pure function of the report dict.

Note: the maximum over several attack variants is biased upward on a small test set; the ``base`` model (no
LoRA, no membership signal) shows that floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from library.eval.report import results_table


@dataclass(frozen=True)
class WorstCase:
    """A model's worst case over its headline attacks (see the module docstring)."""

    model: str
    row: dict[str, Any]  # the headline result row with the highest AUC (the first one on a tie)
    tpr_at_fpr: dict[str, float | None]  # FPR level ("0.01", ...) -> highest TPR over the attacks; None: n/a

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


def headline_rows(report: dict[str, Any], model: str | None = None) -> list[dict[str, Any]]:
    """The report's headline result rows that have an AUC, in report order (of one ``model`` if given)."""
    return [r for r in report["results"]
            if r.get("headline") and r.get("auc") is not None and (model is None or r["model"] == model)]


def worst_case(report: dict[str, Any]) -> dict[str, WorstCase]:
    """Per model (in the order of the report's rows), the worst case over its headline attacks.

    Models without a headline AUC are left out. The TPRs are maximised over the attacks independently of the
    AUC (the attack with the best TPR at 1 % FPR need not be the one with the best AUC); an FPR level none of
    the attacks reaches (``tpr_at_fpr`` null: too few non-members) stays None.
    """
    by_model: dict[str, list[dict[str, Any]]] = {}
    for row in headline_rows(report):
        by_model.setdefault(row["model"], []).append(row)
    worst = {}
    for model, rows in by_model.items():
        levels = dict.fromkeys(level for r in rows for level in r.get("tpr_at_fpr") or {})
        tprs = {level: [r["tpr_at_fpr"][level] for r in rows if r["tpr_at_fpr"].get(level) is not None]
                for level in levels}
        worst[model] = WorstCase(model=model, row=max(rows, key=lambda r: r["auc"]),
                                 tpr_at_fpr={level: max(v) if v else None for level, v in tprs.items()})
    return worst


def main_results_table(report: dict[str, Any]) -> list[str]:
    """The "Main results" markdown table of ``report.md`` (every headline row), rebuilt from ``report.json``."""
    return results_table([r for r in report["results"] if r["headline"]])


__all__ = ["WorstCase", "headline_rows", "main_results_table", "worst_case"]
