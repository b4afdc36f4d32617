#!/usr/bin/env python
"""Prepare the paper's afhq data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_afhq.py --afhq_dir ~/datasets/afhq --captions afhq_blip.csv   # -> data/afhq_large_5x/

Run with --help for the expected input files. See library/prepare/afhq.py for the details.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from library.cli import run_cli  # noqa: E402
from library.prepare.afhq import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
