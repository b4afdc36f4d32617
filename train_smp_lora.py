#!/usr/bin/env python
"""SMP-LoRA: stable membership-private LoRA fine-tuning (paper Eq. 9-10, Algorithm 1).

Usage: accelerate launch train_smp_lora.py --config_file configs/<your>.toml [--flag value ...]
Every flag can also be a key of the TOML file; run with --help for the list.
"""

import sys

from library.train.cli import train_entry

if __name__ == "__main__":
    sys.exit(train_entry("smp_lora", __doc__.splitlines()[0]))
