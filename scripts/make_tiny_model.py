"""Write the tiny SD-shaped model (random weights) as a diffusers folder and, optionally, one .safetensors file.

    python scripts/make_tiny_model.py --output_dir runs/tiny-sd [--single_file runs/tiny-sd.safetensors] [--seed 0]

Both outputs load with ``library.sd.loading.load_sd_model`` (and the folder with diffusers'
``StableDiffusionPipeline.from_pretrained``); see ``library/demo/tiny.py`` for the architecture.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Runs from a checkout without installation: make ``library`` importable.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from library.cli import ArgumentParser, run_cli
from library.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, type=Path, help="diffusers folder to write")
    parser.add_argument("--single_file", type=Path, default=None, help="also write this LDM-layout .safetensors")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing tiny model folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from library.demo.tiny import save_tiny_model
    from library.outputs import remove_leftovers_of
    from library.sd.bundle import fingerprint

    for output in (args.output_dir, args.single_file):  # what a run killed while writing them left
        if output is not None:
            remove_leftovers_of(output)
    try:
        bundle = save_tiny_model(
            args.output_dir, seed=args.seed, single_file=args.single_file, overwrite=args.overwrite
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote tiny SD model (seed {args.seed}) to {args.output_dir}")
    if args.single_file is not None:
        print(f"wrote single-file checkpoint to {args.single_file}")
    print(f"fingerprint {fingerprint(bundle)[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
