"""CelebA subsets of the paper (App. E, Table 4) from a local copy of CelebA plus a captions file.

Expected input (the "Align&Cropped" release; nothing is downloaded):

* ``img_align_celeba/`` — the 202,599 JPEGs ``000001.jpg`` ... (178 x 218 pixels);
* ``identity_CelebA.txt`` — one ``<image> <identity>`` line per image;
* ``list_attr_celeba.txt`` — only for ``--subset gender``: a count line, a header of 40 attribute names,
  then ``<image> <±1 x 40>`` rows (the ``Male`` column decides the gender). Kaggle's
  ``list_attr_celeba.csv`` (``image_id,...,Male,...``) is accepted too;
* a captions file — the paper captions every image with BLIP, and those captions are not part of CelebA:
  CSV ``image_id,caption`` or JSONL ``{"image_id": ..., "caption": ...}``.

Subsets (identities x images each; membership is decided per *image*, so an identity's images are spread
over the four sets, as in the authors' data):

=========  ==========================================================================  =====
subset     selection                                                                     total
=========  ==========================================================================  =====
small      25 random identities x 8 random images                                        200
large      100 x 8                                                                       800
large_5x   500 x 8 (five times Large, fixed seed)                                        4000
gender     20 identities x 8 at a 7:3 female:male ratio of identities (14 F + 6 M)      160
varying    100 identities, 1-4 images each (uniform), exactly 252 in all                 252
=========  ==========================================================================  =====

*Gender:* the paper says "a 7:3 gender ratio" without saying which way round; CelebA is majority female, so
the default is 7 female : 3 male identities (``--gender_ratio 3:7`` flips it). An identity's gender is the
majority vote of the ``Male`` attribute over all its images (identities with a tie are left out).

*Varying:* 100 i.i.d. uniform draws from {1, 2, 3, 4} sum to 250 on average, not 252. We draw the 100 counts
again and again from the seeded generator until they sum to exactly 252 (rejection sampling, i.e. uniform
counts *conditioned* on the paper's total); about 1 draw in 30 succeeds, so this takes microseconds.

Captions become ``cele<ID>, <caption>`` (the identity token the authors prepend; ``--identity_token``).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from library.data.prepare.common import (
    CaptionTable,
    PreparedDataset,
    add_output_arguments,
    check_enough,
    common_options,
    output_paths,
    preparation_parser,
    prepare_output_dir,
    report,
    require_path,
    rng_for,
    sample_sorted,
    split_and_save,
    write_pair,
)
from library.errors import ConfigError, DataError

SUBSETS: tuple[str, ...] = ("small", "large", "gender", "varying", "large_5x")
# identities, images per identity (None: varying)
SUBSET_SHAPES: dict[str, tuple[int, int | None]] = {
    "small": (25, 8),
    "large": (100, 8),
    "large_5x": (500, 8),
    "gender": (20, 8),
    "varying": (100, None),
}
VARYING_TOTAL = 252
VARYING_MAX = 4
IMAGE_DIR = "img_align_celeba"
IDENTITY_FILE = "identity_CelebA.txt"
ATTR_FILE = "list_attr_celeba.txt"
ATTR_FILE_CSV = "list_attr_celeba.csv"
#: What a user short of CelebA identities can do: --sizes re-splits a subset's images, it does not pick fewer people.
_WHOLE_CELEBA = ("or extract the whole img_align_celeba.zip: a subset is a set of identities, which --sizes does not "
                 "shrink (it only re-splits their images)")


@dataclass(frozen=True)
class CelebaPick:
    """One selected image and its identity."""

    image: str
    identity: int


# ---------------------------------------------------------------------------------------------------------
# Reading CelebA's metadata
# ---------------------------------------------------------------------------------------------------------


def read_identities(path: Path) -> dict[str, int]:
    """``identity_CelebA.txt`` -> {image file name: identity}."""
    require_path(path, f"CelebA's {IDENTITY_FILE} ('<image> <identity>' per line, from the CelebA Anno folder)")
    identities: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path} line {lineno} is not '<image> <identity>': is this CelebA's {IDENTITY_FILE}?")
        identities[parts[0]] = int(parts[1])
    if not identities:
        raise DataError(f"{path} lists no images: is this CelebA's {IDENTITY_FILE}?")
    return identities


def read_male_attribute(path: Path) -> dict[str, bool]:
    """{image: is male} from ``list_attr_celeba.txt`` (or Kaggle's ``list_attr_celeba.csv``)."""
    require_path(path, f"CelebA's {ATTR_FILE} (count line, 40 attribute names, then '<image> ±1 ...' rows), "
                       f"needed for --subset gender")
    male: dict[str, bool] = {}
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "Male" not in reader.fieldnames or "image_id" not in reader.fieldnames:
                raise DataError(f"{path} needs 'image_id' and 'Male' columns (Kaggle's {ATTR_FILE_CSV})")
            for row in reader:
                male[row["image_id"]] = row["Male"].strip() == "1"
        return male
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) < 2:
        raise DataError(f"{path} is too short: is this CelebA's {ATTR_FILE}?")
    header = lines[1].split()
    if "Male" not in header:
        raise DataError(f"{path} line 2 has no 'Male' attribute: is this CelebA's {ATTR_FILE}?")
    column = header.index("Male") + 1  # +1: rows start with the image name
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(header) + 1:
            raise DataError(f"{path} line {lineno} has {len(parts) - 1} values for {len(header)} attributes")
        male[parts[0]] = parts[column] == "1"
    return male


def identity_genders(identities: Mapping[str, int], male: Mapping[str, bool]) -> dict[int, bool]:
    """{identity: is male} by majority vote of its images' ``Male`` attribute; ties are left out."""
    votes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for image, identity in identities.items():
        if image in male:
            votes[identity][1 if male[image] else 0] += 1
    return {identity: m > f for identity, (f, m) in votes.items() if m != f}


def parse_ratio(text: str) -> tuple[int, int]:
    """``"7:3"`` -> (7, 3) (female : male)."""
    parts = text.split(":")
    try:
        female, male = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--gender_ratio must look like 7:3 (female:male), got {text!r}") from None
    if female < 0 or male < 0 or female + male == 0:
        raise ConfigError(f"--gender_ratio must be two non-negative integers, not both 0, got {text!r}")
    return female, male


# ---------------------------------------------------------------------------------------------------------
# Selection (pure: no image is read)
# ---------------------------------------------------------------------------------------------------------


def varying_counts(num_identities: int, total: int, seed: int, max_images: int = VARYING_MAX) -> list[int]:
    """``num_identities`` counts, each uniform on 1..max_images, conditioned (by rejection) on summing to ``total``."""
    if not num_identities <= total <= num_identities * max_images:
        raise ConfigError(f"cannot give {num_identities} identities 1-{max_images} images each and {total} in all")
    rng = rng_for(seed, "varying")
    for _ in range(1_000_000):
        counts = rng.integers(1, max_images + 1, size=num_identities)
        if int(counts.sum()) == total:
            return [int(c) for c in counts]
    raise ConfigError(f"no draw of {num_identities} counts summed to {total}; choose a total nearer "
                      f"{num_identities * (max_images + 1) / 2:.0f}")


def select_celeba(
    identities: Mapping[str, int],
    subset: str,
    seed: int,
    *,
    genders: Mapping[int, bool] | None = None,
    gender_ratio: tuple[int, int] = (7, 3),
) -> list[CelebaPick]:
    """Choose the images of a subset: identities first, then images within each identity (all seeded).

    ``identities`` maps the *available* images to their identity. ``genders`` (identity -> is male) is needed
    for ``gender``. Returns picks sorted by image name.
    """
    if subset not in SUBSET_SHAPES:
        raise ConfigError(f"unknown CelebA subset {subset!r}; choose one of: {', '.join(SUBSETS)}")
    by_identity: dict[int, list[str]] = defaultdict(list)
    for image, identity in identities.items():
        by_identity[identity].append(image)
    num_ids, per_id = SUBSET_SHAPES[subset]
    rng = rng_for(seed, f"celeba-{subset}")

    if subset == "varying":
        counts = varying_counts(num_ids, VARYING_TOTAL, seed)
        eligible = [str(i) for i, images in by_identity.items() if len(images) >= VARYING_MAX]
        chosen = [int(i) for i in sample_sorted(eligible, num_ids, rng, f"identities with >= {VARYING_MAX} images",
                                                    _WHOLE_CELEBA)]
        # Counts are assigned to identities in the (shuffled) order drawn, not by identity number.
        order = rng.permutation(len(chosen))
        wanted = {chosen[j]: counts[k] for k, j in enumerate(order)}
    else:
        assert per_id is not None
        eligible_ids = [i for i, images in by_identity.items() if len(images) >= per_id]
        if subset == "gender":
            if genders is None:
                raise ConfigError("the gender subset needs the Male attribute (list_attr_celeba.txt)")
            female_w, male_w = gender_ratio
            n_female = round(num_ids * female_w / (female_w + male_w))
            groups = {False: n_female, True: num_ids - n_female}
            chosen = []
            for is_male, count in groups.items():
                pool = [str(i) for i in eligible_ids if genders.get(i) is is_male]
                label = "male" if is_male else "female"
                chosen += [int(i) for i in sample_sorted(pool, count, rng, f"{label} identities with >= {per_id} images",
                                                           _WHOLE_CELEBA)]
        else:
            pool = [str(i) for i in eligible_ids]
            chosen = [int(i) for i in sample_sorted(pool, num_ids, rng, f"identities with >= {per_id} images",
                                                        _WHOLE_CELEBA)]
        wanted = {identity: per_id for identity in chosen}

    picks: list[CelebaPick] = []
    for identity in sorted(wanted):
        images = sample_sorted(by_identity[identity], wanted[identity], rng, f"images of identity {identity}")
        picks.extend(CelebaPick(image, identity) for image in images)
    return sorted(picks, key=lambda p: p.image)


# ---------------------------------------------------------------------------------------------------------
# The whole preparation
# ---------------------------------------------------------------------------------------------------------


def prepare_celeba(
    celeba_dir: Path,
    captions_file: Path,
    subset: str,
    output_dir: Path,
    manifest_path: Path,
    *,
    resolution: int = 512,
    seed: int = 1337,
    gender_ratio: tuple[int, int] = (7, 3),
    identity_token: str = "cele",
    sizes: Mapping[str, int] | None = None,
    overwrite: bool = False,
    identity_file: Path | None = None,
    attr_file: Path | None = None,
) -> PreparedDataset:
    """Select a subset from a local CelebA, write it (square crops + ``cele<ID>, `` captions), split it."""
    celeba_dir = Path(celeba_dir)
    image_dir = require_path(celeba_dir / IMAGE_DIR, f"CelebA's aligned images ({IMAGE_DIR}/000001.jpg ...) "
                                                     f"inside {celeba_dir}", folder=True)
    identity_file = identity_file or _find(celeba_dir, IDENTITY_FILE)
    identities = read_identities(identity_file)
    on_disk = {p.name for p in image_dir.iterdir()}
    available = {image: identity for image, identity in identities.items() if image in on_disk}
    if not available:
        raise DataError(f"none of the images listed in {identity_file} is in {image_dir}: extract "
                        f"img_align_celeba.zip there")
    genders, genders_from = None, []
    if subset == "gender":
        attr = attr_file or _find(celeba_dir, ATTR_FILE, ATTR_FILE_CSV)
        genders = identity_genders(available, read_male_attribute(attr))
        genders_from = [attr]
    picks = select_celeba(available, subset, seed, genders=genders, gender_ratio=gender_ratio)
    check_enough(len(picks), f"celeba_{subset}", sizes, f"--subset {subset}")
    captions = CaptionTable.from_file(captions_file)
    missing = [p.image for p in picks if p.image not in captions]
    if missing:
        raise DataError(f"captions file {captions_file} has no caption for {len(missing)} selected image(s), "
                        f"e.g. {missing[0]}: caption every image of {IMAGE_DIR} (the paper used BLIP)")

    out = prepare_output_dir(output_dir, overwrite, [image_dir, identity_file, captions_file, *genders_from])
    for pick in picks:
        caption = f"{identity_token}{pick.identity}, {captions.require(pick.image)}"
        write_pair(out, Path(pick.image).stem, image_dir / pick.image, caption, resolution)
    return split_and_save(out, manifest_path, preset=f"celeba_{subset}", seed=seed, sizes=sizes,
                          created_by=f"scripts/prepare_celeba.py --subset {subset}")


def _find(celeba_dir: Path, *names: str) -> Path:
    """A metadata file in the CelebA folder or its ``Anno/`` subfolder (the official archive layout)."""
    for name in names:
        for candidate in (celeba_dir / name, celeba_dir / "Anno" / name):
            if candidate.is_file():
                return candidate
    return celeba_dir / names[0]  # require_path() then names the file that is missing


def build_parser() -> argparse.ArgumentParser:
    parser = preparation_parser("a CelebA subset of the paper", __doc__)
    parser.add_argument("--celeba_dir", type=Path, required=True,
                        help=f"folder holding {IMAGE_DIR}/ and {IDENTITY_FILE} (also looked for in Anno/)")
    parser.add_argument("--captions", type=Path, required=True,
                        help="captions file: CSV image_id,caption or JSONL (BLIP captions, not part of CelebA)")
    parser.add_argument("--subset", choices=SUBSETS, required=True)
    parser.add_argument("--gender_ratio", default="7:3", help="female:male identities for --subset gender (7:3)")
    parser.add_argument("--identity_token", default="cele", help="caption prefix before the identity number")
    add_output_arguments(parser, "celeba_small")
    return parser


def main(argv: Sequence[str] | None = None) -> PreparedDataset:
    args = build_parser().parse_args(argv)
    image_dir, manifest = output_paths(args, f"celeba_{args.subset}")
    return report(prepare_celeba(
        args.celeba_dir, args.captions, args.subset, image_dir, manifest, gender_ratio=parse_ratio(args.gender_ratio),
        identity_token=args.identity_token, **common_options(args),
    ))
