#!/usr/bin/env python
r"""Choose member / non-member images of a dataset by file and save the split manifest (JSON).

    python scripts/make_split.py --dataset_dir data/digits --output data/digits_split.json \
        --preset digits_demo --seed 0 --pretrain rest
    python scripts/make_split.py --dataset_dir data/pokemon --output pokemon_split.json \
        --member_aux 200 --member_test 233 --nonmember_aux 200 --nonmember_test 200 --seed 1337

An existing --output file is kept unless --overwrite (a LoRA trained on the old split would be mislabelled).

Presets (paper Table 4): {presets}
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, run_cli
from library.data.dataset import caption_source, scan_dataset
from library.data.manifest import CORE_SPLITS, manifest_sha256, write_manifest
from library.data.prepare.common import check_output_file
from library.data.splits import PRESETS, check_images_decode, make_split
from library.outputs import remove_leftovers_of


def _pretrain(value: str) -> int | str:
    if value == "rest":
        return value
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'rest', got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'rest', got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.format(presets=", ".join(f"{k} {v.member_aux}/{v.member_test}/{v.nonmember_aux}/{v.nonmember_test}"
                                           for k, v in PRESETS.items()))
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, type=Path,
                        help="kohya folder or imagefolder with metadata.jsonl")
    parser.add_argument("--output", required=True, type=Path, help="manifest JSON to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="sizes from the paper's Table 4 (or digits_demo)")
    for name in CORE_SPLITS:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"number of {name} images (overrides the preset)")
    parser.add_argument("--seed", type=int, required=True, help="the split depends on this seed only")
    parser.add_argument("--pretrain", type=_pretrain, default=None,
                        help="also reserve N images (or 'rest') for pre-training a base model, disjoint from all sets")
    parser.add_argument("--base_domain_caption_regex", default=None, metavar="REGEX",
                        help="a new-concept split: images whose caption matches REGEX (re.search) are the base model's "
                             "pretrain set and never members or non-members; the four sets are drawn from the others")
    parser.add_argument("--caption_extension", default=".txt")
    parser.add_argument("--caption_column", default="text", help="caption column of metadata.jsonl")
    parser.add_argument("--allow_unbalanced_aux", action="store_true",
                        help="allow member_aux != nonmember_aux (the paper's D_aux is balanced)")
    parser.add_argument("--allow_duplicates", action="store_true", help="allow byte-identical images")
    return parser


def _main(argv: Sequence[str] | None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) for name in CORE_SPLITS if getattr(args, name) is not None}
    if args.preset is None and len(sizes) != len(CORE_SPLITS):
        parser.error("give --preset or all of " + ", ".join(f"--{n}" for n in CORE_SPLITS))
    if args.seed < 0:
        parser.error(f"--seed must be an integer >= 0, got {args.seed}")
    base_domain = None
    if args.base_domain_caption_regex is not None:
        try:
            pattern = re.compile(args.base_domain_caption_regex)
        except re.error as exc:
            parser.error(f"--base_domain_caption_regex {args.base_domain_caption_regex!r} is not a regular expression: "
                         f"{exc}")
        base_domain = lambda record: pattern.search(record.caption) is not None  # noqa: E731
    remove_leftovers_of(args.output)  # a run killed while writing it left its temporary file beside it
    check_output_file(args.output, "--output", args.overwrite)  # before the dataset is hashed
    records = scan_dataset(args.dataset_dir, args.caption_extension, caption_column=args.caption_column)
    manifest = make_split(
        records, sizes=sizes, preset=args.preset, seed=args.seed, dataset_root=args.dataset_dir,
        pretrain=args.pretrain, allow_unbalanced_aux=args.allow_unbalanced_aux,
        allow_duplicates=args.allow_duplicates, base_domain=base_domain,
    )
    check_images_decode(manifest)  # a corrupt image fails now, not at the start of a training run
    manifest.created_by += " scripts/make_split.py"
    manifest.caption_source = caption_source(args.dataset_dir, args.caption_extension, args.caption_column)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, args.output)
    digest = manifest_sha256(args.output)
    print(f"{len(records)} images in {args.dataset_dir}; split (seed {args.seed}):")
    for name, size in manifest.sizes().items():
        print(f"  {name:15s} {size}")
    print(f"  D_tr (members) {len(manifest.members())}, D_aux {len(manifest.aux())}, D_te {len(manifest.test())}")
    print(f"wrote {args.output} (sha256 {digest[:16]}…)")


def main(argv: Sequence[str] | None = None) -> int:
    """The whole CLI; returns the exit status (2 with one 'error: ...' line for bad input)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
