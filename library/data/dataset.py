"""Image + caption datasets: scanning a folder, reading captions, and the latent + caption training dataset.

Two on-disk layouts are understood, both common in the LoRA world:

* **kohya layout** — every image ``x.png`` sits next to a caption file ``x.txt``, either directly in the
  dataset root (repeats 1) or in ``<repeats>_<name>`` subfolders (``10_pokemon/`` = every image seen 10 times
  per epoch).
* **Hugging Face imagefolder** — a ``metadata.jsonl`` in the root whose lines name a ``file_name`` (relative to
  the root) and hold the caption in a text column (``text`` by default).

Records are always sorted by their path relative to the root, so every scan of the same folder yields the
same order on every machine; membership splits (:mod:`library.data.splits`) are chosen by file, never by index.

Opening images lives in :mod:`library.data.images`, the VAE latent cache in :mod:`library.data.latents`.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from library.data.images import IMAGE_EXTENSIONS
from library.errors import ConfigError, DataError, warn
from library.fileio import atomic_write_text

METADATA_FILE = "metadata.jsonl"
# Present while a preparation script writes a folder: a run killed half-way leaves it, and no split is drawn
# from the images it did write.
INCOMPLETE_MARKER = ".incomplete"
REPEATS_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya's <repeats>_<name> folders
CAPTION_EXTENSIONS = (".txt", ".caption")  # ours and sd-scripts' defaults (its BLIP/GIT captioners write .caption)
# Image formats a kohya folder may hold that sd-scripts does not read either: skipped, with a warning.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".tif", ".tiff", ".avif", ".jxl", ".heic", ".heif")


@dataclass(frozen=True)
class ImageCaption:
    """One training image and its caption; ``repeats`` comes from a kohya ``<repeats>_<name>`` folder."""

    path: Path
    caption: str
    repeats: int = 1


# ---------------------------------------------------------------------------------------------------------
# Scanning
# ---------------------------------------------------------------------------------------------------------


def is_image(path: Path) -> bool:
    # Hidden files are no images of the dataset (macOS' "._x.png" resource forks; kohya skips them too).
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_caption_file(path: Path) -> str:
    """Return the first non-blank line of a caption file, stripped.

    Only the first line is used (as kohya does) so that a trailing newline or notes below never leak into
    the prompt. An empty / whitespace-only file is an error rather than an empty prompt: training on "" would
    silently turn a captioned LoRA into an unconditional one.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows Notepad) is not part of the caption
    except FileNotFoundError:
        raise DataError(f"caption file {path} is missing: write the image's caption into it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read caption file {path}: {exc} (save it as UTF-8 text)") from None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    raise DataError(f"caption file {path} is empty: write the image's caption into it or remove the image")


def _missing_caption(image: Path, caption_path: Path) -> DataError:
    """The error for an image without its caption file; one under another common extension names the flag."""
    for other in CAPTION_EXTENSIONS:
        if other != caption_path.suffix and image.with_suffix(other).is_file():
            return DataError(f"image {image} has no caption file {caption_path.name}, but {image.with_suffix(other).name} "
                             f"is there: pass --caption_extension {other} if the captions are {other} files")
    return DataError(f"image {image} has no caption file {caption_path.name}: write one next to it "
                     f"or remove the image from the dataset")


def _scan_folder(folder: Path, caption_extension: str, repeats: int, unread: list[Path]) -> list[ImageCaption]:
    records = []
    for image in _images_in(folder, unread):
        caption_path = image.with_suffix(caption_extension)
        if not caption_path.is_file():
            raise _missing_caption(image, caption_path)
        records.append(ImageCaption(image, read_caption_file(caption_path), repeats))
    return records


def _warn_unread_images(root: Path, unread: list[Path]) -> None:
    """A kohya folder reads IMAGE_EXTENSIONS only (as sd-scripts); say so of the images in other formats that the
    scan found in ``root`` (``unread``, in any order: the first one named is the first by path)."""
    if unread:
        warn(f"{len(unread)} file(s) in {root} (first: {min(unread)}) are not read: a kohya folder's images are "
             f"{', '.join(IMAGE_EXTENSIONS)}; convert them (e.g. to PNG) to train on them")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, unread: list[Path] | None = None, *, deep: bool = False) -> list[Path]:
    """The images directly in ``folder`` (``deep``: anywhere below it), sorted; hidden files and folders (macOS'
    ``._x.png``, ``.ipynb_checkpoints``) skipped. The same walk adds the files in a format kohya does not read
    (UNREAD_IMAGE_EXTENSIONS) to ``unread``, so the warning about them costs no second walk of the dataset."""
    wanted = IMAGE_EXTENSIONS + (UNREAD_IMAGE_EXTENSIONS if unread is not None else ())
    files = [p for p in sorted(folder.rglob("*") if deep else folder.iterdir())
             if p.suffix.lower() in wanted and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if unread is not None:
        unread.extend(p for p in files if p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS)
    return [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]


def _image_below(folder: Path, unread: list[Path]) -> Path | None:
    """The first image anywhere below ``folder``, or None."""
    return next(iter(_images_in(folder, unread, deep=True)), None)


def _scan_kohya(root: Path, caption_extension: str) -> list[ImageCaption]:
    # kohya reads the images of the root and of its '<repeats>_<name>' folders, one level each; an image anywhere
    # else would be skipped silently, so it is refused instead of training on a subset. A folder without images
    # (say a latent cache) is harmless. The walks that list the images cover the whole (visible) tree once; they
    # also collect the images in formats kohya does not read, named once the scan is through.
    unread: list[Path] = []
    records = _scan_folder(root, caption_extension, 1, unread)
    for sub in _subfolders(root):
        match = REPEATS_DIR.match(sub.name)
        if match is None:
            if (sub / METADATA_FILE).is_file():  # a Hugging Face dataset's train/ split folder
                raise DataError(f"dataset subfolder {sub} is a Hugging Face imagefolder (it holds {METADATA_FILE}): "
                                f"give {sub} itself as the dataset folder")
            if (image := _image_below(sub, unread)) is not None:
                raise DataError(
                    f"dataset subfolder {sub} does not match '<repeats>_<name>' (e.g. '1_{sub.name}'), so its images "
                    f"({image}) would not be read: rename it, or move its images into {root}"
                )
            continue
        repeats = int(match.group(1))
        if repeats < 1:
            raise DataError(f"dataset subfolder {sub} has 0 repeats: rename it to '1_{match.group(2)}' or remove it")
        records.extend(_scan_folder(sub, caption_extension, repeats, unread))
        for nested in _subfolders(sub):
            if (image := _image_below(nested, unread)) is not None:
                raise DataError(
                    f"image {image} is in a folder inside {sub}, and only the images directly in a "
                    f"'<repeats>_<name>' folder are read: move it into {sub}, or into a '<repeats>_<name>' folder "
                    f"of its own in {root}"
                )
    _warn_unread_images(root, unread)
    return records


def jsonl_rows(lines: list[str], path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each non-blank line of the JSON-lines file ``path`` (``where``: "<path> line N", for the
    caller's messages); a line that is not JSON is a DataError naming it."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where} is not valid JSON ({exc.msg}): fix or remove that line") from None
        yield where, row


def _scan_imagefolder(root: Path, metadata: Path, caption_column: str) -> list[ImageCaption]:
    records: dict[str, ImageCaption] = {}
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {metadata}: {exc}") from None
    for where, row in jsonl_rows(lines, metadata):
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{where} has no 'file_name' key: every line needs file_name and {caption_column}")
        if caption_column not in row:
            raise DataError(
                f"{where} has no '{caption_column}' column (keys: {sorted(row)}): add it, or make a split "
                "manifest that reads another column (scripts/make_split.py --caption_column NAME) and train with it"
            )
        name, caption = row["file_name"], row[caption_column]
        if not isinstance(name, str) or not isinstance(caption, str):
            raise DataError(f"{where}: file_name and {caption_column} must be strings")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(f"{where}: file_name {name!r} must be a path inside {root}")
        image = root / name
        if not image.is_file():
            raise DataError(f"{where} names image {image}, which does not exist: restore it or remove the line")
        if not caption.strip():
            raise DataError(f"{where} has an empty caption for {name}: write one or remove the line")
        key = Path(name).as_posix()
        if key in records:
            raise DataError(f"{where} lists {name} a second time: keep one line per image")
        records[key] = ImageCaption(image, caption.strip(), 1)
    unlisted = [p for p in _images_in(root, deep=True) if p.relative_to(root).as_posix() not in records]
    if unlisted:
        warn(f"{metadata} lists {len(records)} images; {len(unlisted)} other image(s) in {root} (first: "
             f"{unlisted[0]}) have no line in it and are left out: add a line for each to use them")
    return [records[k] for k in sorted(records)]


def caption_suffix(caption_extension: str) -> str:
    """``--caption_extension`` as a file suffix: ``txt`` and ``.txt`` are both ``.txt`` (sd-scripts adds no dot,
    so its users write either); one that names no extension is a ConfigError."""
    if not caption_extension.strip("."):
        raise ConfigError(f"caption extension {caption_extension!r} names no extension: pass the captions' one, "
                          "e.g. --caption_extension .txt or .caption")
    return caption_extension if caption_extension.startswith(".") else "." + caption_extension


def caption_source(root: str | Path, caption_extension: str = ".txt", caption_column: str = "text") -> dict[str, str]:
    """Where :func:`scan_dataset` reads ``root``'s captions, as a split manifest records it."""
    if (Path(root) / METADATA_FILE).is_file():
        return {"metadata_file": METADATA_FILE, "caption_column": caption_column}
    return {"caption_extension": caption_suffix(caption_extension)}


def _metadata_captions(metadata: Path, column: str) -> dict[str, str]:
    captions = {}
    try:
        lines = metadata.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError):
        return captions
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get(column), str):
            captions[Path(row["file_name"]).as_posix()] = row[column].strip()
    return captions


def current_captions(root: Path, source: dict[str, str], paths: list[str]) -> dict[str, str | None]:
    """The captions the files of ``root`` hold now for ``paths`` (None: missing or unreadable), read as
    ``source`` (:func:`caption_source`) says; for comparing with a split manifest's."""
    if "metadata_file" in source:
        listed = _metadata_captions(root / source["metadata_file"], source.get("caption_column", "text"))
        return {path: listed.get(path) for path in paths}
    suffix = source.get("caption_extension", ".txt")
    captions: dict[str, str | None] = {}
    for path in paths:
        try:
            captions[path] = read_caption_file((root / path).with_suffix(suffix))
        except DataError:
            captions[path] = None
    return captions


def scan_dataset(
    root: str | Path, caption_extension: str = ".txt", *, caption_column: str = "text"
) -> list[ImageCaption]:
    """List every (image, caption) pair of a dataset folder, sorted by path relative to ``root``.

    If ``root/metadata.jsonl`` exists the folder is read as a Hugging Face imagefolder (captions from
    ``caption_column``); otherwise as a kohya folder (same-stem caption files, optional ``<repeats>_<name>``
    subfolders). Raises :class:`DataError` naming the offending file for a missing or empty caption, a
    metadata line naming a missing image, or a dataset with no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    if (root / INCOMPLETE_MARKER).exists():
        raise DataError(f"dataset folder {root} was left half-written by an interrupted preparation (it holds "
                        f"{INCOMPLETE_MARKER}): rerun the script that wrote it with --overwrite")
    caption_extension = caption_suffix(caption_extension)
    metadata = root / METADATA_FILE
    if metadata.is_file():
        records = _scan_imagefolder(root, metadata, caption_column)
    else:
        try:
            records = _scan_kohya(root, caption_extension)
        except DataError as exc:
            if (root / "metadata.csv").is_file():  # the other Hugging Face imagefolder format
                raise DataError(f"{exc} ({root / 'metadata.csv'} is not read: only {METADATA_FILE} is, one JSON "
                                "object per line with file_name and the caption column; convert it)") from None
            raise
    if not records:
        raise DataError(
            f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) with captions: "
            f"put images + {caption_extension} files in it, in '<repeats>_<name>' subfolders, "
            f"or add a {METADATA_FILE}"
        )
    records.sort(key=lambda r: r.path.relative_to(root).as_posix())
    return records


def mark_incomplete(folder: Path) -> None:
    """Mark ``folder`` as being written (:func:`scan_dataset` refuses it until :func:`mark_complete`)."""
    atomic_write_text(folder / INCOMPLETE_MARKER, "written by a preparation script that has not finished\n")


def mark_complete(folder: Path) -> None:
    """Every image and caption of ``folder`` is written."""
    (folder / INCOMPLETE_MARKER).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Captions and a training dataset
# ---------------------------------------------------------------------------------------------------------


def shuffle_caption(caption: str, keep_tokens: int, rng: random.Random, separator: str = ",") -> str:
    """Shuffle the comma-separated tags of ``caption``, keeping the first ``keep_tokens`` tags in place.

    This is kohya's ``--shuffle_caption --keep_tokens N``: the leading tags (an identity token such as
    "cele2811") stay first, the rest are permuted so the model does not learn their order. Empty tags are
    dropped; the result is joined with ``separator + " "``.
    """
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    tags = [t.strip() for t in caption.split(separator)]
    tags = [t for t in tags if t]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return f"{separator} ".join(head + tail)
