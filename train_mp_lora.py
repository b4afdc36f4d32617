#!/usr/bin/env python
"""MP-LoRA: LoRA fine-tuning with a min-max membership-privacy game (paper Eq. 4-6, Algorithm 2).

Usage: accelerate launch train_mp_lora.py --config_file configs/<your>.toml [--flag value ...]
Every flag can also be a key of the TOML file; run with --help for the list.
"""

import sys

from library.train.cli import train_entry

if __name__ == "__main__":
    sys.exit(train_entry("mp_lora", __doc__.splitlines()[0]))
