"""AFHQ Large 5X (paper Table 2 / Table 4: 3,000 images, 750 per set) from a local AFHQ copy.

Expected input (nothing is downloaded):

* ``--afhq_dir`` — the AFHQ (v1 or v2) folder holding ``train/cat/``, ``train/dog/`` and ``train/wild/`` with
  the 512 x 512 JPEGs (``flickr_cat_000002.jpg`` ...); ``--afhq_dir .../train`` works as well;
* ``--captions`` — BLIP captions (not part of AFHQ): CSV ``image_id,caption`` or JSONL, keyed by file name
  (``flickr_cat_000002.jpg``), stem, or path relative to ``train/`` (``cat/flickr_cat_000002.jpg``).

Selection: the paper builds the 5X sets "using the same approach" as CelebA Large 5X, i.e. a seeded random
sample; we draw 3,000 images uniformly from the union of the three classes (so the class mix follows AFHQ's,
about one third each), among the images that have a caption. Captions are plain BLIP text (no class token),
as in the authors' files. Images are written as ``<class>_<stem>.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from library.data.images import IMAGE_EXTENSIONS
from library.data.prepare.common import (
    CaptionTable,
    PreparedDataset,
    add_output_arguments,
    common_options,
    output_paths,
    preparation_parser,
    prepare_output_dir,
    report,
    rng_for,
    sample_sorted,
    split_and_save,
    split_total,
    write_pair,
)
from library.errors import DataError

CLASSES: tuple[str, ...] = ("cat", "dog", "wild")
PRESET = "afhq_large_5x"


def find_train_dir(afhq_dir: Path) -> Path:
    """``afhq_dir/train`` (or ``afhq_dir`` itself when it already is the train folder), checked."""
    for candidate in (afhq_dir / "train", afhq_dir):
        if all((candidate / c).is_dir() for c in CLASSES):
            return candidate
    raise DataError(f"AFHQ folder {afhq_dir} lacks train/cat/, train/dog/ and train/wild/: point --afhq_dir at "
                    f"the extracted AFHQ folder (the one holding train/ and val/)")


def list_afhq(train_dir: Path) -> list[str]:
    """Every image of the three classes as ``<class>/<file>``, sorted."""
    images = [f"{c}/{p.name}" for c in CLASSES for p in (train_dir / c).iterdir()
              if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DataError(f"{train_dir}/{{cat,dog,wild}} hold no images: extract AFHQ's train split there")
    return sorted(images)


def prepare_afhq(
    afhq_dir: Path,
    captions_file: Path,
    output_dir: Path,
    manifest_path: Path,
    *,
    resolution: int = 512,
    seed: int = 1337,
    sizes: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> PreparedDataset:
    """Sample AFHQ Large 5X, write square crops + captions, split with the ``afhq_large_5x`` preset."""
    train_dir = find_train_dir(Path(afhq_dir))
    images = list_afhq(train_dir)
    captions = CaptionTable.from_file(captions_file)
    captioned = [name for name in images if name in captions]
    total = split_total(PRESET, sizes)
    if len(captioned) < total:
        raise DataError(f"captions file {captions_file} covers {len(captioned)} of the {len(images)} AFHQ train "
                        f"images in {train_dir}, but {total} captioned images are needed: caption more images")
    picks = sample_sorted(captioned, total, rng_for(seed, "afhq"), "captioned AFHQ images")
    out = prepare_output_dir(output_dir, overwrite, [train_dir, captions_file])
    for name in picks:
        cls, file_name = name.split("/", 1)
        write_pair(out, f"{cls}_{Path(file_name).stem}", train_dir / name, captions.require(name), resolution)
    return split_and_save(out, manifest_path, preset=PRESET, seed=seed, sizes=sizes,
                          created_by="scripts/prepare_afhq.py")


def build_parser() -> argparse.ArgumentParser:
    parser = preparation_parser("AFHQ Large 5X", __doc__)
    parser.add_argument("--afhq_dir", type=Path, required=True, help="AFHQ folder holding train/{cat,dog,wild}/")
    parser.add_argument("--captions", type=Path, required=True, help="captions file: CSV image_id,caption or JSONL")
    add_output_arguments(parser, PRESET)
    return parser


def main(argv: Sequence[str] | None = None) -> PreparedDataset:
    args = build_parser().parse_args(argv)
    image_dir, manifest = output_paths(args, PRESET)
    return report(prepare_afhq(args.afhq_dir, args.captions, image_dir, manifest, **common_options(args)))
