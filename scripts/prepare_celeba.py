#!/usr/bin/env python
"""Prepare the paper's celeba data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_celeba.py --celeba_dir ~/datasets/celeba --captions celeba_blip.csv --subset small
    (subsets: small, large, gender, varying, large_5x; output data/celeba_<subset>/)

Run with --help for the expected input files. See library/data/prepare/celeba.py for the details.
"""

from __future__ import annotations

import sys

from library.cli import run_cli
from library.data.prepare.celeba import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
