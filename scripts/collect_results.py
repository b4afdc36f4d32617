#!/usr/bin/env python
"""Mean ± standard error over seeds of every metric in several evaluation reports (paper Table 1 style).

    .venv/bin/python scripts/collect_results.py --output_dir runs/pokemon runs/pokemon/seed*/eval/report.json

Input schema (what ``evaluate_mia.py`` writes as ``report.json``; read tolerantly): either a JSON list of
rows, or an object whose ``rows`` (or ``results``) key holds that list. A row is an object with

* ``model`` — which LoRA / base model (e.g. ``lora``, ``smp_lora``); required,
* ``attack`` — which attack or evaluation (e.g. ``loss``, ``fid``) and ``variant`` (e.g. ``t=50``, ``avg``) or
  ``label`` (both in one: ``loss avg``); optional,
* ``headline`` — whether the row is its attack's headline; when rows carry it, only headline rows are
  collected unless ``--all_variants`` (a headline whose variant each report chose, ``info.headline_on_aux``,
  is collected as ``<attack> selected``),
* any number of metric fields: a number, or an object holding ``value`` / ``mean`` / ``estimate``;
  ``tpr_at_fpr`` (``{"0.05": x, "0.01": y}``) becomes ``tpr@5%fpr``, ``tpr@1%fpr``, ...

Other fields (strings, lists, confidence intervals ...) are ignored. Rows are grouped by (model, attack with
its variant) across reports — one report per seed — and each metric's mean, standard error (sample s.d. /
sqrt(n)) and n are written to ``<output_dir>/summary.json`` and ``summary.md`` and printed. When a group has
``auc`` but no ``auc_dev``, the paper's AUC deviation ``|AUC - 0.5| / 0.5`` is added. A report with two rows of
one (model, attack, variant) is refused: they would count as two seeds. Needs only the standard library and this
project (its ``library`` package: run it with the project's ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from library.fileio import atomic_write_text

ID_FIELDS = ("model", "attack", "variant", "label", "headline")
SKIP_FIELDS = {"seed", "n", "num_members", "num_nonmembers", "n_members", "n_nonmembers"}
# Preferred column order (the paper's Table 1 order); any other metric follows alphabetically.
COLUMN_ORDER = ("fid", "kid", "asr", "auc", "auc_dev", "tpr@5%fpr", "tpr_at_5fpr", "tpr@1%fpr", "tpr_at_1fpr",
                "tpr@0.1%fpr")


class CollectError(Exception):
    """A report that cannot be used at all; printed as one line."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        for key in ("value", "mean", "estimate", "point"):
            if key in value:
                return _number(value[key])
    return None


def report_rows(doc: Any, source: str) -> list[dict[str, Any]]:
    """The list of rows of one report (see the module doc)."""
    rows = doc
    if isinstance(doc, dict):
        rows = next((doc[k] for k in ("rows", "results") if isinstance(doc.get(k), list)), None)
    if not isinstance(rows, list):
        raise CollectError(f"{source}: expected a list of rows or an object with a 'rows' list")
    return [row for row in rows if isinstance(row, dict)]


def _attack_label(row: dict[str, Any], headline_only: bool = False) -> str:
    """The row's attack with its variant (``loss t=50``): rows of one attack's variants are different results.
    Among headline rows, one whose variant each report chose on D_aux (GSA's ``gsa1`` or ``gsa2``, its
    ``info.headline_on_aux``) is ``<attack> selected``, as the other attacks' chosen rows are labelled: one
    result across seeds whichever variant each seed chose."""
    info = row.get("info")
    if headline_only and isinstance(info, dict) and info.get("headline_on_aux") and row.get("attack"):
        return f"{row['attack']} selected"
    if row.get("label"):
        return str(row["label"])
    return " ".join(str(row[k]) for k in ("attack", "variant") if row.get(k) not in (None, ""))


def _metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of a row, ``tpr_at_fpr`` spread out as ``tpr@<percent>%fpr``."""
    fields = {k: v for k, v in row.items() if k not in ID_FIELDS and k not in SKIP_FIELDS}
    rates = fields.pop("tpr_at_fpr", None)
    if isinstance(rates, dict):
        for fpr, tpr in rates.items():
            try:
                fields[f"tpr@{float(fpr) * 100:g}%fpr"] = tpr
            except ValueError:
                continue
    metrics = {k: _number(v) for k, v in fields.items()}
    return {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}


def collect(reports: Sequence[tuple[str, Any]], all_variants: bool = False) -> list[dict[str, Any]]:
    """Aggregate rows of several reports: one entry per (model, attack label, metric) with mean, se, n, values."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for source, doc in reports:
        rows = report_rows(doc, source)
        headline_only = not all_variants and any("headline" in row for row in rows)
        if headline_only:
            rows = [row for row in rows if row.get("headline")]
        seen: set[tuple[str, str]] = set()
        for row in rows:
            if "model" not in row:
                print(f"warning: {source}: a row without 'model' is ignored", file=sys.stderr)
                continue
            model, attack = str(row["model"]), _attack_label(row, headline_only)
            if (model, attack) in seen:
                raise CollectError(f"{source}: two rows for model {model!r}, attack {attack!r}; give each variant "
                                   "its own 'variant' or 'label' (they would be averaged as if they were seeds)")
            seen.add((model, attack))
            metrics = _metrics(row)
            if "auc" in metrics and not any(k in metrics for k in ("auc_dev", "auc_deviation")):
                metrics["auc_dev"] = abs(metrics["auc"] - 0.5) / 0.5
            for name, value in metrics.items():
                values[(model, attack, name)].append(value)
    summary = []
    for (model, attack, name), vals in values.items():
        n = len(vals)
        mean = sum(vals) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n) if n > 1 else None
        summary.append({"model": model, "attack": attack, "metric": name, "mean": mean, "se": se, "n": n,
                        "values": vals})
    return summary


def _column_key(name: str) -> tuple[int, str]:
    return (COLUMN_ORDER.index(name), name) if name in COLUMN_ORDER else (len(COLUMN_ORDER), name)


def to_markdown(summary: list[dict[str, Any]]) -> str:
    """A table: one line per (model, attack), one column per metric, cells 'mean ± se (n)'."""
    metrics = sorted({e["metric"] for e in summary}, key=_column_key)
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = defaultdict(dict)
    for entry in summary:
        groups[(entry["model"], entry["attack"])][entry["metric"]] = entry
    lines = ["| model | attack | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (model, attack) in sorted(groups):
        cells = []
        for metric in metrics:
            e = groups[(model, attack)].get(metric)
            if e is None:
                cells.append("")
            elif e["se"] is None:
                cells.append(f"{e['mean']:.4g} (n={e['n']})")
            else:
                cells.append(f"{e['mean']:.4g} ± {e['se']:.2g} (n={e['n']})")
        lines.append(f"| {model} | {attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files (one per seed)")
    parser.add_argument("--output_dir", type=Path, default=None, help="write summary.json and summary.md here")
    parser.add_argument("--allow_missing", action="store_true", help="skip report files that do not exist")
    parser.add_argument("--all_variants", action="store_true",
                        help="every row of every attack (each timestep, candidate, ...), not only the headline rows")
    args = parser.parse_args(argv)
    loaded = []
    seen: set[Path] = set()
    contents: dict[str, Path] = {}
    try:
        for path in args.reports:
            if path.is_dir():
                raise CollectError(f"report {path} is a folder: pass the report.json inside it")
            if path.resolve() in seen:
                raise CollectError(f"report {path} is given twice: it would count as two seeds")
            seen.add(path.resolve())
            if not path.is_file():
                if args.allow_missing:
                    print(f"warning: {path} does not exist; skipped", file=sys.stderr)
                    continue
                raise CollectError(f"report {path} does not exist: did evaluate_mia.py finish for that seed? "
                                   f"(--allow_missing skips it)")
            try:
                text = path.read_text(encoding="utf-8")
                loaded.append((str(path), json.loads(text)))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CollectError(f"report {path} is not readable JSON ({exc})") from None
            if (copy := contents.get(text)) is not None:  # two evaluations never write the same bytes (timings)
                raise CollectError(f"report {path} is a copy of {copy}: it would count as two seeds")
            contents[text] = path
        if not loaded:
            raise CollectError("no report to collect")
        summary = collect(loaded, args.all_variants)
        if not summary:
            raise CollectError("the reports hold no rows with a 'model' and numeric metrics")
    except CollectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = to_markdown(summary)
    print(table, end="")
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        doc = {"reports": [src for src, _ in loaded], "summary": summary}
        atomic_write_text(args.output_dir / "summary.json", json.dumps(doc, indent=2) + "\n")
        header = f"Mean ± s.e. over {len(loaded)} report(s): " + ", ".join(src for src, _ in loaded) + "\n\n"
        atomic_write_text(args.output_dir / "summary.md", header + table)
        print(f"wrote {args.output_dir / 'summary.json'} and summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
