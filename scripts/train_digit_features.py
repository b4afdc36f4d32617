#!/usr/bin/env python
"""Train the small digit CNN whose features give the demo's *proxy* FID / KID (never real FID).

    python scripts/train_digit_features.py --manifest data/digits_split.json --output runs/digit_features.safetensors
    python scripts/train_digit_features.py --dataset_dir data/pretrain_images --output digit_features.safetensors

With ``--manifest`` only the manifest's ``pretrain`` images are used (disjoint from members and non-members).
Labels come from the captions ("a handwritten digit seven" -> 7). A seeded 15% of the images is held out and the
accuracy on it is printed and stored in the file's metadata. An existing output file is kept unless
``--overwrite``. Takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.data.manifest import pretrain_records
from library.demo import digit_classifier as D
from library.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="split manifest JSON; its 'pretrain' images are used")
    source.add_argument("--dataset_dir", type=Path, help="a captioned digit dataset folder used whole")
    parser.add_argument("--output", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=D.DEFAULT_EPOCHS)
    parser.add_argument("--batch_size", type=int, default=D.DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=D.DEFAULT_LR)
    parser.add_argument("--holdout_fraction", type=float, default=D.DEFAULT_HOLDOUT)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--overwrite", action="store_true", help="re-train and replace an existing output file")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.output.is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give a .safetensors file path")
    if args.output.exists() and not args.overwrite:
        net = D.load_digit_feature_net(args.output)  # a foreign file here is an error, not something to skip
        print(f"{args.output} already exists (held-out accuracy {net.metadata.get('heldout_accuracy', '?')}); "
              "skipping (pass --overwrite to re-train)")
        return
    result = D.train_digit_feature_net_on_records(
        pretrain_records(args.manifest, args.dataset_dir), seed=args.seed, epochs=args.epochs, out_path=args.output,
        batch_size=args.batch_size, lr=args.lr, holdout_fraction=args.holdout_fraction, threads=args.threads,
    )
    print(f"wrote {args.output}: held-out accuracy {result.heldout_accuracy:.4f} ({result.num_heldout} images), "
          f"{result.seconds:.1f}s; its {D.FEATURE_DIM}-d features are for proxy FID/KID only")


if __name__ == "__main__":
    sys.exit(run_cli(main))
