#!/usr/bin/env python
"""Pre-train the tiny SD-shaped base model (VAE, then UNet) on the split's disjoint ``pretrain`` images.

    python scripts/pretrain_base.py --manifest data/digits_split.json --output_dir runs/base --seed 0
    python scripts/pretrain_base.py --dataset_dir data/pretrain_images --output_dir runs/base --threads 1

With ``--manifest`` only the manifest's ``pretrain`` list is used (make it with ``make_split.py --pretrain
rest``), so no member or non-member image ever reaches the base model. The result is a diffusers folder
(plus ``pretrain.json``) that every smp-lora script loads as ``--pretrained_model_name_or_path``. An existing
output folder is kept (the work is skipped) unless ``--overwrite``. Defaults take about 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from library.cli import ArgumentParser, run_cli
from library.data.manifest import pretrain_records
from library.demo import pretrain as P
from library.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="split manifest JSON; its 'pretrain' images are used")
    source.add_argument("--dataset_dir", type=Path, help="a kohya / imagefolder dataset used whole")
    parser.add_argument("--output_dir", type=Path, required=True, help="diffusers folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, batches and noise (default 0)")
    parser.add_argument("--vae_steps", type=int, default=P.DEFAULT_VAE_STEPS)
    parser.add_argument("--unet_steps", type=int, default=P.DEFAULT_UNET_STEPS)
    parser.add_argument("--batch_size", type=int, default=P.DEFAULT_BATCH_SIZE, help="UNet batch size")
    parser.add_argument("--vae_batch_size", type=int, default=P.DEFAULT_VAE_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=P.DEFAULT_UNET_LR, help="UNet peak learning rate")
    parser.add_argument("--vae_lr", type=float, default=P.DEFAULT_VAE_LR, help="VAE peak learning rate")
    parser.add_argument("--kl_weight", type=float, default=P.DEFAULT_KL_WEIGHT)
    parser.add_argument("--caption_dropout", type=float, default=P.DEFAULT_CAPTION_DROPOUT,
                        help="probability of training on an empty caption (for classifier-free guidance)")
    parser.add_argument("--freeze_text_encoder", action="store_true",
                        help="keep the text encoder at its random init (the UNet then tends to ignore captions)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own; 1 is fastest on a busy 2-core box)")
    parser.add_argument("--overwrite", action="store_true", help="re-train and replace an existing output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out: Path = args.output_dir
    if out.exists() and not args.overwrite and (out / "model_index.json").is_file():
        print(f"{out} already holds a model; skipping pre-training (pass --overwrite to re-train)")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file; choose a folder")
    records = pretrain_records(args.manifest, args.dataset_dir)
    P.pretrain_base_model(
        records, out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
        batch_size=args.batch_size, vae_batch_size=args.vae_batch_size, lr=args.lr, vae_lr=args.vae_lr,
        kl_weight=args.kl_weight, threads=args.threads, caption_dropout=args.caption_dropout,
        train_text_encoder=not args.freeze_text_encoder, overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
