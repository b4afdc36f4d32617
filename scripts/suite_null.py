#!/usr/bin/env python
"""The suite-wide permutation test of each model's worst case, re-derived from a finished evaluation's files.

    python scripts/suite_null.py runs/demo/eval runs/demo/frontier/eval

For every evaluation folder (``report.json`` + ``scores.csv`` from ``evaluate_mia.py``), per model: the worst case
over the suite, the permutation p that the suite reaches it with no membership signal, and the chance q95
(docs/evaluation.md, "Reading the demo's table"). Reports written since the test exists carry the same numbers in
``privacy_audit.<model>.worst_case_null``; this reads older ones without re-running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, run_cli
from library.eval.rederive import suite_null_from_files


def _main(argv: Sequence[str] | None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="evaluate_mia output folders")
    parser.add_argument("--seed", type=int, default=None, help="permutation seed (default: the evaluation's seed)")
    args = parser.parse_args(argv)
    for eval_dir in args.eval_dirs:
        nulls = suite_null_from_files(eval_dir, args.seed)
        print(f"{eval_dir}\n| model | worst case AUC | suite-wide p | chance median | chance q95 | attacks |\n"
              "|---|---:|---:|---:|---:|---:|")
        for model, null in nulls.items():
            print(f"| {model} | {null['observed_max_auc']:.3f} | {null['p_value']:.3g} | {null['null_median']:.3f} | "
                  f"{null['null_q95']:.3f} | {null['n_attacks']} |")


if __name__ == "__main__":
    raise SystemExit(run_cli(_main))
