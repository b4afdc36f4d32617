"""Numbers re-derived from a finished evaluation's files (``report.json`` and ``scores.csv``), without re-running it.

An evaluation written before a statistic existed keeps every per-sample score in ``scores.csv`` (one column per
(model, attack variant), :func:`library.eval.report.score_column`); :func:`suite_null_from_files` recomputes from
it the suite-wide permutation test of each model's worst case (:func:`library.eval.audit.worst_case_null`), over
the same rows the report's worst case is the maximum of, on D_te. ``scripts/suite_null.py`` is the command.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from library.errors import DataError
from library.eval.audit import NONMEMBER_SPLIT, SUSPECT_SPLIT, suite_null
from library.eval.report import score_column
from library.eval.summary import worst_case_candidates


def read_scores_csv(path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(the split of every sample, {scores.csv column: the scores}) of an evaluation's ``scores.csv``."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot read the evaluation's per-sample scores ({exc.strerror})") from None
    if not rows or "split" not in rows[0]:
        raise DataError(f"{path}: no per-sample scores (expected evaluate_mia's scores.csv with a 'split' column)")
    columns = [name for name in rows[0] if name not in ("file", "split", "label")]
    try:
        scores = {name: np.array([float(row[name]) for row in rows]) for name in columns}
    except (TypeError, ValueError):
        raise DataError(f"{path}: a score is not a number (a truncated or edited file?)") from None
    return np.array([row["split"] for row in rows]), scores


def suite_null_from_files(eval_dir: Path, seed: int | None = None) -> dict[str, dict[str, Any]]:
    """Per model of ``eval_dir/report.json``: :func:`~library.eval.audit.worst_case_null` of its worst-case
    candidates on D_te, from ``eval_dir/scores.csv``: what ``privacy_audit.<model>.worst_case_null`` holds in a
    report written since the test exists (``seed``: the evaluation's own seed unless given)."""
    report_path = Path(eval_dir) / "report.json"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{report_path}: not a readable evaluation report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise DataError(f"{report_path}: not an evaluation report (no 'results'; expected evaluate_mia's report.json)")
    if seed is None:
        seed = int((report.get("seeds") or {}).get("noise_attacks_bootstrap") or 0)
    splits, scores = read_scores_csv(Path(eval_dir) / "scores.csv")
    counts = (report.get("samples") or {}).get("counts") or {}
    for split, expected in counts.items():  # a copy cut at a line end parses, with samples missing
        if int((splits == split).sum()) != expected:
            raise DataError(f"{eval_dir}/scores.csv holds {int((splits == split).sum())} {split} samples where "
                            f"report.json counts {expected}: a truncated or edited file, or another evaluation's")
    test = np.flatnonzero(np.isin(splits, (SUSPECT_SPLIT, NONMEMBER_SPLIT)))
    labels = (splits == SUSPECT_SPLIT).astype(int)
    out = {}
    for model, rows in worst_case_candidates(report).items():
        missing = [row["label"] for row in rows if score_column(model, row["label"]) not in scores]
        if missing:
            raise DataError(f"{eval_dir}/scores.csv has no column for {model} {missing[0]!r}: not this report's scores")
        by_label = {row["label"]: scores[score_column(model, row["label"])] for row in rows}
        out[model] = suite_null(rows, by_label, labels, test, seed)
    return out


__all__ = ["read_scores_csv", "suite_null_from_files"]
