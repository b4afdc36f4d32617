#!/usr/bin/env python
"""RelaxLoss LoRA: a loss-level target for the members (baseline; Chen et al. 2022, see library.train.methods).

Usage: accelerate launch train_relaxloss.py --config_file configs/<your>.toml --relaxloss_alpha A [--flag value ...]
Every flag can also be a key of the TOML file; run with --help for the list.
"""

import sys

from library.train.cli import train_entry

if __name__ == "__main__":
    sys.exit(train_entry("relaxloss", __doc__.splitlines()[0]))
