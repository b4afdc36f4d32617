#!/usr/bin/env python
"""Prepare the paper's afhq data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_afhq.py --afhq_dir ~/datasets/afhq --captions afhq_blip.csv   # -> data/afhq_large_5x/

Run with --help for the expected input files. See library/data/prepare/afhq.py for the details.
"""

from __future__ import annotations

import sys

from library.cli import run_cli
from library.data.prepare.afhq import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
