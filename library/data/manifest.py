"""The split manifest: what a membership split is, and how it is stored as JSON and read back.

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
How a split is drawn (the paper's Table 4 presets, the seeded permutation) is :mod:`library.data.splits`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from library import __version__
from library.data.dataset import ImageCaption, current_captions, scan_dataset
from library.errors import ConfigError, DataError, warn
from library.fileio import atomic_write_text, sha256_file

FORMAT_NAME = "smp-lora-split"
FORMAT_VERSION = 1
CORE_SPLITS: tuple[str, ...] = ("member_aux", "member_test", "nonmember_aux", "nonmember_test")
EXTRA_SPLITS: tuple[str, ...] = ("pretrain", "unused")
ALL_SPLITS: tuple[str, ...] = CORE_SPLITS + EXTRA_SPLITS


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


def norm_path(rel_path: str | os.PathLike) -> str:
    """A relative path as the manifest stores it (POSIX separators)."""
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
    # Where the captions were read (dataset.caption_source), so that a caption edited since is noticed; None for
    # manifests written by code or before 2026-12-06 (their captions are not compared).
    caption_source: dict[str, str] | None = None

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
        return self._where.get(norm_path(rel_path))

    def is_member(self, rel_path: str | os.PathLike) -> bool:
        return self.split_of(rel_path) in ("member_aux", "member_test")

    def abs_path(self, entry: SplitEntry | str) -> Path:
        """Absolute path of an entry's image."""
        rel = entry.path if isinstance(entry, SplitEntry) else norm_path(entry)
        return self.dataset_root / rel


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
    if manifest.caption_source is not None:
        doc["captions"] = manifest.caption_source
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
    return SplitEntry(norm_path(path), caption, digest.lower(), repeats)


def read_manifest(
    path: str | Path, *, verify: bool = True, dataset_root: str | Path | None = None,
    verify_splits: Sequence[str] = CORE_SPLITS,
) -> SplitManifest:
    """Read a split manifest; with ``verify`` check that every image of ``verify_splits`` (those a training or an
    evaluation reads) still has its recorded sha256.

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
    captions = doc.get("captions")
    if captions is not None and not (isinstance(captions, dict) and all(isinstance(v, str) for v in captions.values())):
        raise DataError(f"split manifest {path}: 'captions' must be an object of strings (where the captions were read)")
    manifest = SplitManifest(
        dataset_root=root,
        seed=seed,
        preset=doc.get("preset"),
        format_version=FORMAT_VERSION,
        created_by=str(doc.get("created_by", "")),
        caption_source=captions,
        **lists,
    )
    if verify:
        verify_manifest(manifest, path, verify_splits)
    return manifest


def verify_manifest(manifest: SplitManifest, manifest_path: str | Path = "the split manifest",
                    splits: Sequence[str] = CORE_SPLITS) -> None:
    """Check every image of ``splits`` exists with its recorded sha256; raise :class:`DataError` naming the first.

    By default the four membership sets, which trainings and attacks read: ``unused`` and ``pretrain`` (the base's
    pre-training images, read by a base's pre-training only) are not checked, as hashing a large dataset's other
    images at every start would cost minutes (a missing spare image never made a run stale)."""
    for name, entries in manifest.splits().items():
        for entry in entries if name in splits else ():
            image = manifest.abs_path(entry)
            try:
                digest = sha256_file(image)
            except FileNotFoundError:
                raise DataError(
                    f"image {image} ({name} in {manifest_path}) is missing: the manifest is stale — restore "
                    f"the file, or re-run scripts/make_split.py (if the dataset moved: same --seed and sizes, and "
                    "the LoRAs and states of this split stay valid)"
                ) from None
            except OSError as exc:
                raise DataError(f"cannot read image {image} ({name} in {manifest_path}): {exc}") from None
            if digest != entry.sha256:
                raise DataError(
                    f"image {image} ({name} in {manifest_path}) has changed since the split was made: the "
                    f"manifest is stale — restore the file or re-run scripts/make_split.py"
                )
    _warn_edited_captions(manifest, manifest_path, splits)


def _warn_edited_captions(manifest: SplitManifest, manifest_path: str | Path, splits: Sequence[str]) -> None:
    """The manifest's captions are what runs train on; say so when the caption files say otherwise now (the usual
    kohya loop edits captions and retrains, and would train on the old ones in silence)."""
    if manifest.caption_source is None:
        return
    entries = [e for name, entries in manifest.splits().items() if name in splits for e in entries]
    now = current_captions(manifest.dataset_root, manifest.caption_source, [e.path for e in entries])
    edited = [e for e in entries if now.get(e.path) != e.caption]
    if edited:
        first = edited[0]
        current = now.get(first.path)  # None: the caption file (or metadata line) is gone or unreadable
        missing = "no metadata line" if "metadata_file" in manifest.caption_source else "no readable caption file"
        shown = missing if current is None else repr(current)
        warn(f"{len(edited)} caption(s) differ from {manifest_path}'s (first: {first.path}: {first.caption!r} in the "
             f"manifest, {shown} now): runs use the manifest's captions; to train on the new ones, "
             "re-run scripts/make_split.py with --overwrite (same --seed and sizes: the same images in each set)")


def manifest_sha256(path: str | Path) -> str:
    """sha256 of the manifest file's bytes (the report's record of the file; LoRA files before 2026-12-05 were tied
    to their split by it)."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise DataError(f"cannot read split manifest {path}: {exc}") from None


def split_sha256(manifest: SplitManifest) -> str:
    """sha256 of what the manifest says, not where the dataset lies: every split's entries (relative path, caption,
    image sha256, repeats). A LoRA records it, so moving the dataset and writing its manifest again (same split,
    another ``dataset_root``) keeps the LoRA and its training state valid."""
    doc = {name: [[e.path, e.caption, e.sha256, e.repeats] for e in entries]
           for name, entries in manifest.splits().items()}
    text = json.dumps({"format_version": manifest.format_version, "splits": doc}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pretrain_records(manifest_path: str | os.PathLike | None = None,
                     dataset_dir: str | os.PathLike | None = None) -> list[ImageCaption]:
    """The images to pre-train a base model (or a feature net) on: a manifest's ``pretrain`` list, or a
    whole dataset folder. The manifest's list is disjoint from every membership split by construction."""
    if (manifest_path is None) == (dataset_dir is None):
        raise ConfigError("give exactly one of a split manifest or a dataset folder to pre-train on")
    if dataset_dir is not None:
        return scan_dataset(dataset_dir)
    manifest = read_manifest(manifest_path, verify_splits=("pretrain",))
    if not manifest.pretrain:
        raise DataError(
            f"split manifest {manifest_path} has no 'pretrain' images: re-create it with "
            "scripts/make_split.py --pretrain rest (or pass --dataset_dir)"
        )
    return [ImageCaption(manifest.abs_path(e), e.caption, e.repeats) for e in manifest.pretrain]
