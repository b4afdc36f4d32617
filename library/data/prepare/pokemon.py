"""The Pokemon BLIP captions data set (833 images) from a local copy, split as in the paper.

Accepted input (``--source``; nothing is downloaded):

* an image folder with captions, either kohya layout (``x.png`` + ``x.txt``, optionally inside
  ``<repeats>_<name>/`` subfolders, as the authors' ``dataset/Pokemon/1_pokemon/``) or a Hugging Face
  imagefolder (``metadata.jsonl`` with ``file_name`` and ``text``);
* the data set's parquet file(s) (``data/train-*.parquet`` of the ``lambdalabs/pokemon-blip-captions`` copy:
  columns ``image`` = {bytes, path} and ``text``), or a folder holding them. Reading parquet needs
  ``pyarrow`` (``pip install pyarrow``), which smp-lora does not install.

Split presets (the paper's table and the authors' code disagree, see ``library.data.splits``):

* ``pokemon`` (default) — the code: member_aux 200, member_test 233, nonmember_aux 200, nonmember_test 200,
  so D_tr = 433 images, matching the paper's "433 training iterations per epoch";
* ``pokemon_table4`` (``--table4``) — Table 4 as printed: 200 / 200 / 200 / 233 (D_tr = 400).

Images are written as ``pokemon_<index>.png`` in the source's order (sorted paths, or parquet row order).
Captions get the prefix ``pokemon, `` as in the authors' caption files (``--caption_prefix ''`` to omit it);
a caption that already starts with the prefix is left alone.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from library.data.dataset import METADATA_FILE, scan_dataset
from library.data.images import IMAGE_EXTENSIONS
from library.data.prepare.common import (
    PreparedDataset,
    add_output_arguments,
    check_enough,
    common_options,
    output_paths,
    preparation_parser,
    prepare_output_dir,
    report,
    split_and_save,
    write_pair,
)
from library.errors import DataError

EXPECTED_IMAGES = 833
DEFAULT_PREFIX = "pokemon, "
_SOURCE_HELP = (
    "a folder of images with captions (x.png + x.txt, or metadata.jsonl with file_name,text), or the "
    "lambdalabs/pokemon-blip-captions parquet file(s) (columns image, text) or a folder holding them"
)


def _parquet_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source] if source.suffix.lower() == ".parquet" else []
    return sorted(source.rglob("*.parquet"))


def _has_images(folder: Path) -> bool:
    if (folder / METADATA_FILE).is_file():
        return True
    for path in folder.rglob("*"):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            return True
    return False


def iter_parquet(files: Sequence[Path]) -> Iterator[tuple[str, bytes, str]]:
    """Yield ``(where, encoded image bytes, caption)`` rows of the parquet files, in file then row order."""
    try:
        parquet = importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise DataError(
            f"reading {files[0]} needs pyarrow, which is not installed: run `pip install pyarrow`, or pass "
            f"--source an image folder with captions (x.png + x.txt, or metadata.jsonl)"
        ) from None
    for path in files:
        try:
            table = parquet.read_table(str(path), columns=["image", "text"])
        except Exception as exc:  # pyarrow's errors (missing column, corrupt file) share no useful base
            raise DataError(f"cannot read {path} as the Pokemon parquet (columns image, text): {exc}") from None
        images = table.column("image").to_pylist()
        texts = table.column("text").to_pylist()
        for row, (image, text) in enumerate(zip(images, texts)):
            where = f"{path} row {row}"
            data = image.get("bytes") if isinstance(image, Mapping) else image
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise DataError(f"{where}: column 'image' holds no image bytes (is this the BLIP captions parquet?)")
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: column 'text' is empty")
            yield where, bytes(data), text


def with_prefix(caption: str, prefix: str) -> str:
    """``prefix + caption`` unless the caption already starts with the prefix (case-insensitive)."""
    caption = " ".join(caption.split())
    if prefix and not caption.lower().startswith(prefix.strip().lower()):
        return prefix + caption
    return caption


def prepare_pokemon(
    source: Path,
    output_dir: Path,
    manifest_path: Path,
    *,
    table4: bool = False,
    resolution: int = 512,
    seed: int = 1337,
    caption_prefix: str = DEFAULT_PREFIX,
    sizes: Mapping[str, int] | None = None,
    overwrite: bool = False,
    warn=print,
) -> PreparedDataset:
    """Write the Pokemon images (square crops) + captions to ``output_dir`` and split them."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"Pokemon source {source} not found: expected {_SOURCE_HELP}")
    parquet_files = _parquet_files(source)
    if source.is_dir() and _has_images(source):
        items: list[tuple[str, Path | bytes, str]] = [
            (str(r.path), r.path, r.caption) for r in scan_dataset(source)
        ]
    elif parquet_files:
        items = list(iter_parquet(parquet_files))
    else:
        raise DataError(f"Pokemon source {source} holds no images or parquet files: expected {_SOURCE_HELP}")
    if len(items) != EXPECTED_IMAGES:
        warn(f"warning: {source} holds {len(items)} images; the paper's Pokemon BLIP captions set has "
             f"{EXPECTED_IMAGES} (splits need the Table 4 total, the rest is left unused)")

    preset = "pokemon_table4" if table4 else "pokemon"
    check_enough(len(items), preset, sizes, f"--source {source}")
    out = prepare_output_dir(output_dir, overwrite, [source])
    width = max(4, len(str(len(items) - 1)))
    for index, (_where, image, caption) in enumerate(items):
        write_pair(out, f"pokemon_{index:0{width}d}", image, with_prefix(caption, caption_prefix), resolution)
    return split_and_save(out, manifest_path, preset=preset, seed=seed, sizes=sizes,
                          created_by="scripts/prepare_pokemon.py" + (" --table4" if table4 else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = preparation_parser("the Pokemon BLIP captions set", __doc__)
    parser.add_argument("--source", type=Path, required=True, help=_SOURCE_HELP)
    parser.add_argument("--table4", action="store_true",
                        help="use the paper table's sizes 200/200/200/233 instead of the code's 200/233/200/200")
    parser.add_argument("--caption_prefix", default=DEFAULT_PREFIX,
                        help="text put before every caption (default 'pokemon, ', as the authors' files)")
    add_output_arguments(parser, "pokemon")
    return parser


def main(argv: Sequence[str] | None = None) -> PreparedDataset:
    args = build_parser().parse_args(argv)
    image_dir, manifest = output_paths(args, "pokemon")
    return report(prepare_pokemon(args.source, image_dir, manifest, table4=args.table4,
                                  caption_prefix=args.caption_prefix, **common_options(args)))
