#!/usr/bin/env python
"""Prepare the paper's pokemon data from a local copy: square crops + captions and a Table 4 split manifest.

    python scripts/prepare_pokemon.py --source ~/datasets/pokemon-blip-captions            # -> data/pokemon/
    python scripts/prepare_pokemon.py --source ~/datasets/pokemon-blip-captions --table4   # Table 4 sizes

Run with --help for the expected input files. See library/data/prepare/pokemon.py for the details.
"""

from __future__ import annotations

import sys

from library.cli import run_cli
from library.data.prepare.pokemon import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
