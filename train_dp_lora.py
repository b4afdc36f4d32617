#!/usr/bin/env python
"""DP-LoRA: the LoRA trained with DP-SGD, per-sample clipping + Gaussian noise, epsilon reported (baseline).

Usage: python train_dp_lora.py --config_file configs/<your>.toml --dp_noise_multiplier S --dp_clip_norm C
One process only; every flag can also be a key of the TOML file; run with --help for the list.
"""

import sys

from library.train.cli import train_entry

if __name__ == "__main__":
    sys.exit(train_entry("dp_lora", __doc__.splitlines()[0]))
