#!/usr/bin/env python
"""Plain LoRA fine-tuning of Stable Diffusion v1.x (the baseline: minimises L_ada, paper Eq. 3).

Usage: accelerate launch train_lora.py --config_file configs/<your>.toml [--flag value ...]
Every flag can also be a key of the TOML file; run with --help for the list.
"""

import sys

from library.train.cli import train_entry

if __name__ == "__main__":
    sys.exit(train_entry("lora", __doc__.splitlines()[0]))
