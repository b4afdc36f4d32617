"""Helpers shared by the paper-dataset preparation scripts (Pokemon, CelebA, AFHQ, MS-COCO).

Every preparation does the same three things:

1. pick the images (dataset-specific: identities for CelebA, a seeded sample for AFHQ / COCO, all 833 for
   Pokemon) and find each one's caption;
2. write them as a flat kohya-layout folder, ``<stem>.png`` + ``<stem>.txt``, each image centre-cropped to a
   ``resolution`` x ``resolution`` square (the paper trains at 512 x 512, and a non-square image would give a
   latent of another shape than the proxy attacker's input);
3. split the folder by file with a Table 4 preset (:mod:`library.data.splits`) and save the manifest.

Nothing here downloads anything: the user points the scripts at local copies, and a missing file is a
:class:`DataError` that names the file and what it should contain.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from library.cli import ArgumentParser
from library.data.dataset import (
    caption_source,
    jsonl_rows,
    mark_complete,
    mark_incomplete,
    scan_dataset,
)
from library.data.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    open_rgb,
    resize_center_crop,
    to_rgb,
)
from library.data.manifest import (
    CORE_SPLITS,
    SplitManifest,
    manifest_sha256,
    write_manifest,
)
from library.data.splits import make_split, resolve_sizes
from library.errors import ConfigError, DataError
from library.fileio import atomic_write_path, atomic_write_text
from library.outputs import check_output_dir

DEFAULT_RESOLUTION = 512
DEFAULT_SEED = 1337  # upstream's set_seed(1337)
# Column names accepted in caption files, in order of preference.
KEY_COLUMNS: tuple[str, ...] = ("image_id", "file_name", "image", "path", "filename", "id")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "text", "blip_caption", "prompt")


@dataclass(frozen=True)
class PreparedDataset:
    """What a preparation wrote: the image folder, the manifest and its sha256."""

    image_dir: Path
    manifest_path: Path
    manifest: SplitManifest
    manifest_sha256: str
    num_images: int

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {n}" for name, n in self.manifest.sizes().items() if n)
        return (f"wrote {self.num_images} images + captions to {self.image_dir}\n"
                f"split (seed {self.manifest.seed}, preset {self.manifest.preset}): {sizes}\n"
                f"wrote {self.manifest_path} (sha256 {self.manifest_sha256[:16]}...)")


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def require_path(path: Path, what: str, *, folder: bool = False) -> Path:
    """Return ``path`` if it exists (as a folder when ``folder``); else one DataError saying what it must be."""
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        found = "not found" if not path.exists() else f"is a {'file' if folder else 'folder'}, not a {kind}"
        raise DataError(f"{kind} {path} {found}: expected {what}")
    return path


def caption_keys(name: str) -> list[str]:
    """Keys under which an image's caption may be filed: the relative path, its file name and its stem."""
    posix = Path(name).as_posix()
    base = Path(posix).name
    keys = [posix, base, Path(base).stem]
    return list(dict.fromkeys(keys))


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    for name in wanted:
        if name in lowered:
            return lowered[name]
    return None


def _read_caption_csv(path: Path, text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"captions file {path} is empty: it needs one 'image_id,caption' row per image")
    header = [c.strip().lower() for c in rows[0]]
    key_col = _pick(header, KEY_COLUMNS)
    cap_col = _pick(header, CAPTION_COLUMNS)
    if key_col is not None and cap_col is not None:
        key_i, cap_i, body, first_line = header.index(key_col), header.index(cap_col), rows[1:], 2
    elif key_col is None and cap_col is None and len(rows[0]) >= 2:
        key_i, cap_i, body, first_line = 0, 1, rows, 1  # headerless "name,caption" rows
    else:
        raise DataError(
            f"captions file {path}: header {rows[0]} needs an image column ({', '.join(KEY_COLUMNS)}) and a "
            f"caption column ({', '.join(CAPTION_COLUMNS)}), e.g. 'image_id,caption'"
        )
    captions: dict[str, str] = {}
    for lineno, row in enumerate(body, start=first_line):
        if len(row) <= max(key_i, cap_i):
            raise DataError(f"captions file {path} row {lineno} has too few columns: expected 'image_id,caption' "
                            f"(quote captions that contain commas)")
        _add_caption(captions, row[key_i], row[cap_i], f"{path} row {lineno}")
    return captions


def _read_caption_jsonl(path: Path, text: str) -> dict[str, str]:
    captions: dict[str, str] = {}
    for where, row in jsonl_rows(text.splitlines(), path):
        if not isinstance(row, dict):
            raise DataError(f"{where} must be a JSON object like {{\"image_id\": ..., \"caption\": ...}}")
        key_col, cap_col = _pick(list(row), KEY_COLUMNS), _pick(list(row), CAPTION_COLUMNS)
        if key_col is None or cap_col is None:
            raise DataError(f"{where} needs an image key ({', '.join(KEY_COLUMNS)}) and a caption key "
                            f"({', '.join(CAPTION_COLUMNS)}); it has {sorted(row)}")
        _add_caption(captions, row[key_col], row[cap_col], where)
    return captions


def _add_caption(captions: dict[str, str], key: object, caption: object, where: str) -> None:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: the caption is empty or not text; write one or remove the row")
    name = str(key).strip()
    if not name:
        raise DataError(f"{where}: the image name is empty")
    if name in captions:
        raise DataError(f"{where}: image {name} has a second caption; keep one row per image")
    captions[name] = " ".join(caption.split())  # one line: a caption file's first line is all kohya reads


def read_captions(path: str | Path) -> dict[str, str]:
    """Read a captions file: CSV (``image_id,caption``), JSONL (one object per line) or a JSON object
    ``{"<image>": "<caption>"}``. Keys are image names as written (path, file name or stem)."""
    path = Path(path)
    require_path(path, "a captions file: CSV with columns image_id,caption, or JSONL lines "
                       "{\"image_id\": ..., \"caption\": ...} (BLIP captions are not part of the image data set)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read captions file {path}: {exc} (save it as UTF-8 text)") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"captions file {path} is not valid JSON ({exc.msg})") from None
        captions: dict[str, str] = {}
        for key, caption in doc.items():
            _add_caption(captions, key, caption, f"{path} key {key!r}")
        return captions
    if path.suffix.lower() in (".jsonl", ".json") or stripped.startswith("{"):
        return _read_caption_jsonl(path, text)
    return _read_caption_csv(path, text)


class CaptionTable:
    """Captions by image; looks an image up by relative path, file name or stem.

    A key the file holds wins over a file name or stem derived from another key, and a derived key that two
    different captions share (``cat/x.jpg`` and ``dog/x.jpg``) names neither: an image found only through it
    has no caption (one clear error) rather than another image's."""

    def __init__(self, captions: Mapping[str, str], source: Path | str):
        self.source = Path(source)
        self._by_key: dict[str, str] = {}
        derived: dict[str, dict[str, str]] = {}  # file name or stem -> {key of the file: its caption}
        for name, caption in captions.items():
            exact, *others = caption_keys(name)
            self._by_key[exact] = caption
            for key in others:
                derived.setdefault(key, {})[exact] = caption
        self._shared: dict[str, list[str]] = {}  # a derived key that names several captions: the keys behind it
        for key, owners in ((k, v) for k, v in derived.items() if k not in self._by_key):
            if len(set(owners.values())) == 1:
                self._by_key[key] = next(iter(owners.values()))
            else:
                self._shared[key] = sorted(owners)

    @classmethod
    def from_file(cls, path: str | Path) -> "CaptionTable":
        return cls(read_captions(path), path)

    def get(self, name: str) -> str | None:
        for key in caption_keys(name):
            if key in self._by_key:
                return self._by_key[key]
        return None

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def require(self, name: str) -> str:
        caption = self.get(name)
        if caption is None:
            if shared := next((self._shared[k] for k in caption_keys(name) if k in self._shared), None):
                raise DataError(f"captions file {self.source} has no caption for image {name}: its file name is "
                                f"shared by the rows of {', '.join(shared[:3])}{' ...' if len(shared) > 3 else ''}, "
                                f"with different captions; add a row keyed by its path "
                                f"('{Path(name).as_posix()},<caption>')")
            raise DataError(f"captions file {self.source} has no caption for image {name}: add a row for it "
                            f"(keyed by file name, e.g. '{Path(name).name},<caption>')")
        return caption


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def rng_for(seed: int, purpose: str) -> np.random.Generator:
    """A generator for one purpose (selection, gender, ...), independent of the split's own stream."""
    tag = int.from_bytes(purpose.encode("utf-8")[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([int(seed), tag])


def sample_sorted(items: Iterable[str], count: int, rng: np.random.Generator, what: str,
                  fewer: str = "or ask for fewer (--sizes)") -> list[str]:
    """``count`` distinct items drawn from the sorted ``items``; a DataError when there are too few (``fewer``:
    what else the user can do)."""
    pool = sorted(items)
    if count > len(pool):
        raise DataError(f"need {count} {what} but only {len(pool)} are available: check the input files "
                        f"(a partial download?) {fewer}")
    picked = rng.choice(len(pool), size=count, replace=False)
    return [pool[i] for i in sorted(picked)]


def parse_sizes(text: str) -> dict[str, int]:
    """``"50,50,50,50"`` -> sizes of member_aux, member_test, nonmember_aux, nonmember_test."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(CORE_SPLITS) or any(v < 0 for v in values):
        raise ConfigError(f"--sizes must be four non-negative integers ({','.join(CORE_SPLITS)}), got {text!r}")
    return dict(zip(CORE_SPLITS, values))


def split_total(preset: str, sizes: Mapping[str, int] | None) -> int:
    """How many images a preparation must select for ``preset`` (or the explicit ``sizes``), checked before any
    image is written: a split that cannot be made is refused while the output folder is still untouched."""
    wanted = resolve_sizes(dict(sizes) if sizes else None, None if sizes else preset)
    if wanted.member_aux != wanted.nonmember_aux:
        raise ConfigError(f"--sizes: member_aux ({wanted.member_aux}) and nonmember_aux ({wanted.nonmember_aux}) "
                          "differ; the paper's D_aux is balanced, make them equal (scripts/make_split.py "
                          "--allow_unbalanced_aux splits a prepared folder unbalanced)")
    return wanted.total


def check_enough(available: int, preset: str, sizes: Mapping[str, int] | None, where: str) -> None:
    """Refuse, before anything is written, a split that needs more images than the ``available`` ones."""
    total = split_total(preset, sizes)
    if available < total:
        asked = f"--sizes {','.join(str(v) for v in sizes.values())}" if sizes else f"the {preset} preset"
        raise DataError(f"{where} gives {available} images but {asked} needs {total}: pass smaller --sizes "
                        f"({','.join(CORE_SPLITS)}) or add images")


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def prepare_output_dir(out_dir: Path, overwrite: bool, inputs: Sequence[Path]) -> Path:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite`` (then delete its images and captions), and
    one that overlaps any of the ``inputs`` (the dataset's folders and files) whatever ``overwrite`` says: the
    preparation writes, and with ``--overwrite`` deletes, images and captions there."""
    out_dir = Path(out_dir)
    out = out_dir.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or source in out.parents or out in source.parents:
            relation = "is" if out == source else "lies inside" if source in out.parents else "holds"
            raise DataError(f"--output_dir {out_dir} {relation} the input {given}: the preparation writes (and with "
                            "--overwrite deletes) images and captions there; choose a folder outside the inputs")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder: choose another --output_dir")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out_dir} is not empty: pass --overwrite to replace its images and "
                            f"captions, or choose another --output_dir")
        # Only files a preparation writes: a stale image would otherwise end up in the new split.
        for path in out_dir.iterdir():
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS + (".txt",):
                path.unlink()
        leftover = [p for p in out_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS or p.is_dir()]
        if leftover:
            raise DataError(f"output folder {out_dir} still holds {leftover[0].name} after --overwrite: "
                            f"remove it by hand (preparations write a flat folder)")
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_incomplete(out_dir)  # until split_and_save: a killed preparation's folder is never split
    return out_dir


def check_output_file(path: Path, flag: str, overwrite: bool) -> Path:
    """``path`` as a new file to write (a manifest): not a folder, in a writable folder, absent unless ``overwrite``.

    Checked before any work, so a finished split or preparation is never lost at its last step and an existing
    file is never replaced silently. Nothing is created here.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the file to write (e.g. {path / 'split.json'})")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another file")
    check_output_dir(path.parent, flag, create=False)
    return path


def open_image(source: Path | bytes, name: str) -> Image.Image:
    """Decode an image file or encoded bytes to 8-bit RGB by :func:`library.data.images.to_rgb`'s rules."""
    if isinstance(source, (bytes, bytearray)):
        # Image.open takes a file object as well as a path, so the same decoding rules apply to bytes.
        try:
            img = decode_image(io.BytesIO(source), name)
        except DataError:
            raise DataError(f"image {name} cannot be decoded: the input data is corrupt (re-download it)") from None
        return to_rgb(img, name)
    return open_rgb(Path(source))


def write_pair(out_dir: Path, stem: str, image: Path | bytes, caption: str, resolution: int) -> Path:
    """Write ``<stem>.png`` (centre-cropped ``resolution`` square) and ``<stem>.txt``; return the image path."""
    if "/" in stem or "\\" in stem or stem.startswith("."):
        raise DataError(f"bad output name {stem!r}")
    caption = " ".join(caption.split())
    if not caption:
        raise DataError(f"image {stem} has an empty caption: fix the captions file")
    img = resize_center_crop(open_image(image, str(image) if isinstance(image, Path) else stem), resolution)
    target = out_dir / f"{stem}.png"
    with atomic_write_path(target) as tmp:
        img.save(tmp, format="PNG")
    atomic_write_text(out_dir / f"{stem}.txt", caption + "\n")
    return target


def split_and_save(
    image_dir: Path,
    manifest_path: Path,
    *,
    preset: str,
    seed: int,
    sizes: Mapping[str, int] | None = None,
    created_by: str = "",
) -> PreparedDataset:
    """Split the written folder by file (Table 4 ``preset`` unless explicit ``sizes``) and save the manifest."""
    mark_complete(image_dir)
    records = scan_dataset(image_dir)
    try:
        manifest = make_split(records, preset=None if sizes else preset, sizes=dict(sizes) if sizes else None,
                              seed=seed, dataset_root=image_dir)
    except (DataError, ConfigError) as exc:  # the images are written: say how to split them by hand
        raise type(exc)(f"{exc} — the {len(records)} images are in {image_dir}: split them with "
                        f"scripts/make_split.py --dataset_dir {image_dir} (its flags: --member_aux, --member_test, "
                        "--nonmember_aux, --nonmember_test or --preset, --allow_duplicates, ...)") from None
    if sizes:
        manifest.preset = f"{preset} (scaled: {','.join(str(v) for v in sizes.values())})"
    if created_by:
        manifest.created_by += f" {created_by}"
    manifest.caption_source = caption_source(image_dir)
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, manifest_path)
    return PreparedDataset(image_dir, manifest_path, manifest, manifest_sha256(manifest_path), len(records))


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def preparation_parser(what: str, module_doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help says it writes ``what`` and its manifest, with the module's usage text below."""
    return ArgumentParser(
        description=f"Write {what} (square crops + captions) and its split manifest.\n\n"
                    + (module_doc or "").split("\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter)


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """The options every preparation script shares."""
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"image folder to write (default data/<dataset>/images, e.g. data/{default_name}/images)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="split manifest to write (default: split.json next to the image folder)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                        help="side of the square centre crop in pixels (paper: 512)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="selection and split seed (default 1337)")
    parser.add_argument("--sizes", type=str, default=None,
                        help="override the Table 4 sizes: member_aux,member_test,nonmember_aux,nonmember_test "
                             "(for a quick smaller run; the preset is the paper's; a CelebA subset keeps its "
                             "identities and images, the rest become 'unused')")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the images and captions in --output_dir and the --manifest file")


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments every ``prepare_*`` function takes, from :func:`add_output_arguments`' options."""
    return {"resolution": args.resolution, "seed": args.seed, "overwrite": args.overwrite,
            "sizes": parse_sizes(args.sizes) if args.sizes else None}


def report(result: PreparedDataset) -> PreparedDataset:
    print(result.summary())
    return result


def output_paths(args: argparse.Namespace, name: str) -> tuple[Path, Path]:
    """(image folder, manifest path) from the parsed options, with the documented defaults."""
    if args.resolution < 8 or args.resolution % 8:
        raise ConfigError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    image_dir = args.output_dir if args.output_dir is not None else Path("data") / name / "images"
    manifest = args.manifest if args.manifest is not None else image_dir.parent / "split.json"
    return Path(image_dir), check_output_file(Path(manifest), "--manifest", args.overwrite)
