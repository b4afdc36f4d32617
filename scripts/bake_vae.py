"""Put a VAE into an SD v1.x single-file checkpoint (kohya's --vae, done once on disk; the original is kept).

    python scripts/bake_vae.py --checkpoint merge.safetensors --vae vae-ft-mse-840000-ema-pruned.safetensors \
        --output merge-vae.safetensors

Train and evaluate with the new file: the VAE is part of the base model (its fingerprint covers it). The VAE may
be an LDM-layout file, a diffusers-layout file or a diffusers VAE folder; see ``library/sd/bake_vae.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from library.cli import ArgumentParser, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="SD v1.x single .safetensors checkpoint (with or without a VAE)")
    parser.add_argument("--vae", required=True, type=Path,
                        help="the VAE: a .safetensors file (LDM or diffusers layout) or a diffusers VAE folder")
    parser.add_argument("--output", required=True, type=Path, help="the new checkpoint (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from library.sd.bake_vae import bake_vae

    output = bake_vae(args.checkpoint, args.vae, args.output, overwrite=args.overwrite)  # UserError: run_cli's line
    print(f"wrote {output}: {args.checkpoint} with the VAE of {args.vae}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
