"""MS-COCO Large 5X (paper Table 2 / Table 4: 4,000 images, 1,000 per set) from a local COCO copy.

Expected input (nothing is downloaded):

* ``--images_dir`` — a COCO image folder, e.g. ``train2017/`` (``000000000009.jpg`` ...);
* ``--annotations`` — a ``captions_train2017.json``-style file: ``{"images": [{"id", "file_name"}, ...],
  "annotations": [{"image_id", "caption"}, ...]}`` (from ``annotations_trainval2017.zip``).

COCO has about five human captions per image; the paper captions its sets with BLIP, whose captions we do
not have, so each image gets its **first** caption in the annotation file's order (documented substitute).
Selection: a seeded uniform sample of 4,000 images among those that are on disk and have a caption. COCO
photos are not square: each is scaled (short side = ``--resolution``) and centre-cropped. Images are written
as ``<stem>.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping, Sequence

from library.data.prepare.common import (
    PreparedDataset,
    add_output_arguments,
    common_options,
    output_paths,
    preparation_parser,
    prepare_output_dir,
    report,
    require_path,
    rng_for,
    sample_sorted,
    split_and_save,
    split_total,
    write_pair,
)
from library.errors import DataError

PRESET = "coco_large_5x"


def first_captions(annotation_file: Path) -> dict[str, str]:
    """{image file name: its first caption} from a COCO captions annotation JSON."""
    require_path(annotation_file, "a COCO captions annotation JSON such as annotations/captions_train2017.json "
                                  "(with 'images' and 'annotations' lists)")
    try:
        doc = json.loads(annotation_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {annotation_file} as JSON ({exc}): is it captions_train2017.json?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise DataError(f"{annotation_file} lacks the 'images' and 'annotations' lists of a COCO captions file "
                        f"(instances_*.json has no captions: use captions_*.json)")
    names: dict[int, str] = {}
    for image in doc["images"]:
        try:
            names[int(image["id"])] = str(image["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{annotation_file}: an 'images' entry lacks id / file_name") from None
    captions: dict[str, str] = {}
    for ann in doc["annotations"]:
        try:
            image_id, caption = int(ann["image_id"]), ann["caption"]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{annotation_file}: an 'annotations' entry lacks image_id / caption "
                            f"(instances_*.json has no captions: use captions_*.json)") from None
        name = names.get(image_id)
        if name is None or name in captions or not isinstance(caption, str) or not caption.strip():
            continue  # first non-empty caption wins
        captions[name] = " ".join(caption.split())
    if not captions:
        raise DataError(f"{annotation_file} holds no captions for its images: is it a COCO captions file?")
    return captions


def prepare_coco(
    images_dir: Path,
    annotation_file: Path,
    output_dir: Path,
    manifest_path: Path,
    *,
    resolution: int = 512,
    seed: int = 1337,
    sizes: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> PreparedDataset:
    """Sample COCO Large 5X, write square crops + first captions, split with the ``coco_large_5x`` preset."""
    images_dir = require_path(Path(images_dir), "a COCO image folder such as train2017/ (000000000009.jpg ...)",
                              folder=True)
    captions = first_captions(Path(annotation_file))
    on_disk = {p.name for p in images_dir.iterdir()}
    usable = [name for name in captions if name in on_disk]
    total = split_total(PRESET, sizes)
    if len(usable) < total:
        raise DataError(f"only {len(usable)} images of {annotation_file} are in {images_dir}, {total} are needed: "
                        f"is --images_dir the folder matching the annotation file (train2017 for captions_train2017)?")
    picks = sample_sorted(usable, total, rng_for(seed, "coco"), "captioned COCO images")
    out = prepare_output_dir(output_dir, overwrite, [images_dir, annotation_file])
    for name in picks:
        write_pair(out, Path(name).stem, images_dir / name, captions[name], resolution)
    return split_and_save(out, manifest_path, preset=PRESET, seed=seed, sizes=sizes,
                          created_by="scripts/prepare_coco.py")


def build_parser() -> argparse.ArgumentParser:
    parser = preparation_parser("MS-COCO Large 5X", __doc__)
    parser.add_argument("--images_dir", type=Path, required=True, help="COCO image folder, e.g. train2017/")
    parser.add_argument("--annotations", type=Path, required=True,
                        help="COCO captions JSON, e.g. annotations/captions_train2017.json")
    add_output_arguments(parser, PRESET)
    return parser


def main(argv: Sequence[str] | None = None) -> PreparedDataset:
    args = build_parser().parse_args(argv)
    image_dir, manifest = output_paths(args, PRESET)
    return report(prepare_coco(args.images_dir, args.annotations, image_dir, manifest, **common_options(args)))
