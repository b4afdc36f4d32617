#!/usr/bin/env python
"""Prepare the paper's coco data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_coco.py --images_dir ~/datasets/coco/train2017 \
        --annotations ~/datasets/coco/annotations/captions_train2017.json             # -> data/coco_large_5x/

Run with --help for the expected input files. See library/data/prepare/coco.py for the details.
"""

from __future__ import annotations

import sys

from library.cli import run_cli
from library.data.prepare.coco import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
