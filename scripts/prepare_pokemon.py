#!/usr/bin/env python
"""Prepare the paper's pokemon data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_pokemon.py --source ~/datasets/pokemon-blip-captions            # -> data/pokemon/
    python scripts/prepare_pokemon.py --source ~/datasets/pokemon-blip-captions --table4   # Table 4 sizes

Run with --help for the expected input files. See library/prepare/pokemon.py for the details.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from library.cli import run_cli  # noqa: E402
from library.prepare.pokemon import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
