"""Opening images: every mode Pillow can decode becomes 8-bit RGB with its full range kept.

One conversion, :func:`to_rgb`, serves training, latent caching, evaluation and the dataset-preparation
scripts (they all open files through :func:`open_rgb` or :func:`load_image`). Pillow's own
``convert("RGB")`` is only right for 8-bit modes: it *clips* 16-bit values at 255 instead of rescaling them,
so a mid-grey 16-bit PNG (32768) would train as white. The rules, mode by mode:

* 8-bit modes ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: Pillow's ``convert("RGB")``.
* Alpha (``RGBA``, ``RGBa``, ``LA``, ``PA``, and ``P`` / ``L`` / ``RGB`` with a ``transparency`` entry):
  composited on opaque white (:data:`BACKGROUND`). Dropping alpha would expose whatever colour hides under
  transparent pixels (often black).
* 16-bit ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (Pillow 13 opens 16-bit grayscale PNGs as ``I;16``):
  ``round(v * 255 / 65535)``, so ``257 * k`` maps back to ``k`` exactly. A 16-bit ``transparency`` key is
  ignored.
* 32-bit signed ``I``: negative values are refused; if every value is at most 65535 the image is read as
  16-bit data (``round(v * 255 / 65535)``), since that is what ``I`` images usually hold (Pillow opens 16-bit
  PGM/PPM as ``I``, and older releases 16-bit grayscale PNGs); otherwise as full 31-bit data
  (``round(v * 255 / (2**31 - 1))``). The choice depends on the pixels because the mode alone does not say which.
* Float ``F``: values in [0, 1] are scaled by 255, otherwise values in [0, 255] are taken as 8-bit levels
  (``round(v)``); non-finite values or values outside [0, 255] are refused.
* Anything else (``LAB``, ``La``, ...): a :class:`~library.errors.DataError` naming the file and its mode.

Greyscale results are repeated on the three channels. 16-bit RGB(A) PNGs never reach these rules as 16-bit
data: Pillow's decoder keeps the high byte of each channel (mode ``RGB`` / ``RGBA``), which keeps the full range.

:data:`IMAGE_CONVERSION` names this conversion; caches of anything computed from pixels (the latent cache)
include it in their keys, so changing the rules invalidates them.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from library.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Bump when to_rgb's output changes for any input. v1 was Pillow's plain convert("RGB") (16-bit clipped).
IMAGE_CONVERSION = "smp-lora-rgb8-v2"
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_PILLOW_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_UINT16_MAX = 65535
_INT32_MAX = 2**31 - 1


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _grey_to_rgb(levels: np.ndarray) -> Image.Image:
    """Rounded 8-bit levels (any float or int array, already in 0..255) as an RGB image."""
    return Image.fromarray(np.ascontiguousarray(levels, dtype=np.uint8)).convert("RGB")  # 2-D uint8 -> "L"


def _rescaled(values: np.ndarray, full_scale: int) -> Image.Image:
    """``round(v * 255 / full_scale)``: float64 keeps it exact (``257 * k`` -> ``k`` for 16-bit data)."""
    return _grey_to_rgb(np.rint(values.astype(np.float64) * 255.0 / full_scale))


def _int32_to_rgb(img: Image.Image, name: str) -> Image.Image:
    values = np.asarray(img, dtype=np.int64)
    if values.size and values.min() < 0:
        raise DataError(
            f"image {name} has mode I with negative values (min {values.min()}), which have no 8-bit "
            f"meaning: export it as 8- or 16-bit PNG"
        )
    peak = int(values.max()) if values.size else 0
    return _rescaled(values, _UINT16_MAX if peak <= _UINT16_MAX else _INT32_MAX)


def _float_to_rgb(img: Image.Image, name: str) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise DataError(f"image {name} has mode F with NaN or infinite values: export it as 8- or 16-bit PNG")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return _grey_to_rgb(np.rint(values * 255.0))
    if low >= 0.0 and high <= 255.0:
        return _grey_to_rgb(np.rint(values))
    raise DataError(
        f"image {name} has mode F with values in [{low:g}, {high:g}], neither [0, 1] nor [0, 255]: "
        f"export it as 8- or 16-bit PNG"
    )


def to_rgb(img: Image.Image, name: str | Path) -> Image.Image:
    """``img`` as 8-bit RGB with its full range kept (rules in the module docstring); ``name`` is for errors."""
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in _PILLOW_RGB_MODES:
        return img.convert("RGB")
    if img.mode in _UINT16_MODES:
        return _rescaled(np.asarray(img), _UINT16_MAX)
    if img.mode == "I":
        return _int32_to_rgb(img, str(name))
    if img.mode == "F":
        return _float_to_rgb(img, str(name))
    raise DataError(
        f"image {name} has mode {img.mode}, which smp-lora cannot map to RGB: convert it to an 8- or 16-bit "
        f"RGB or grayscale PNG"
    )


def decode_image(source: str | Path | BinaryIO, name: str | Path | None = None) -> Image.Image:
    """Decode an image file (or file object) in its own mode, EXIF rotation applied; ``DataError`` if unreadable."""
    name = source if name is None else name
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a DataLoader worker
            return ImageOps.exif_transpose(img)  # phone photos are stored rotated, with an EXIF hint
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {name}: {exc} (re-export it or remove it from the dataset)") from None


def open_rgb(source: str | Path | BinaryIO, name: str | Path | None = None) -> Image.Image:
    """Decode an image file (or file object) as 8-bit RGB: :func:`decode_image`, then :func:`to_rgb`."""
    name = source if name is None else name
    return to_rgb(decode_image(source, name), name)


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Scale the short side to ``resolution`` (Lanczos, antialiased) and cut the centred square."""
    width, height = img.size
    scale = resolution / min(width, height)
    new_w = max(resolution, round(width * scale))
    new_h = max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    left = (new_w - resolution) // 2
    top = (new_h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def image_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """An RGB image (:func:`open_rgb`) as a float32 tensor of shape (3, resolution, resolution) in [-1, 1]."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    array = np.asarray(resize_center_crop(img, resolution), dtype=np.float32)  # (R, R, 3), 0..255
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Load an image as a float32 tensor of shape (3, resolution, resolution) with values in [-1, 1]."""
    return image_tensor(open_rgb(Path(path)), resolution)
