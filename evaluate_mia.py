#!/usr/bin/env python
"""Membership-inference evaluation of SD v1.x LoRAs (and the base model) on a split manifest.

Usage: python evaluate_mia.py --pretrained_model_name_or_path M --network_weights A.safetensors [B.safetensors ...]
       --split_manifest split.json --output_dir D [--config_file eval.toml] [--flag value ...]
Writes report.json, report.md, scores.csv, roc.png, roc_loglog.png and hist.png into D; run with --help for the flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from library.cli import run_cli


def _main(argv: Sequence[str] | None) -> None:
    from library.config import parse_config  # noqa: PLC0415 - fast --help and clean error paths
    from library.eval.config import EvalConfig  # noqa: PLC0415
    from library.eval.run import evaluate  # noqa: PLC0415

    config = parse_config(EvalConfig, argv, __doc__.splitlines()[0])
    result = evaluate(config)
    if result is not None:  # None: --dry_run
        print(f"wrote {config.output_dir}/report.md ({len(result.rows)} results for {len(result.models)} models)")


def main(argv: Sequence[str] | None = None) -> int:
    """The whole CLI; returns the exit status (2 with one 'error: ...' line for bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
