"""Issue 19: every image mode loads as 8-bit RGB with its full range kept (library.data.images).

One picture (an sklearn digit upscaled 4x, plus ramps holding every grey level 0..255) is written in many
modes and formats; each must load to exactly the tensor of the 8-bit RGB PNG. The issue allows a quantisation
error of 1/255 per channel for the lossless ones; the conversion is exact, so the tests ask for equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.cli import run_cli
from library.data import latents
from library.data.images import IMAGE_CONVERSION, load_image, open_rgb, to_rgb
from library.data.latents import LatentCache
from library.data.prepare.common import write_pair
from library.errors import DataError

SIZE = 48
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    """48x48 uint8: a digit upscaled to 32x32 at the top left, every level 0..255 (several times) elsewhere."""
    from sklearn.datasets import load_digits

    digit = load_digits().images[0]  # 8x8, values 0..16
    image = np.zeros((SIZE, SIZE), dtype=np.int64)
    image[:32, :32] = np.rint(np.kron(digit, np.ones((4, 4))) * 255 / 16)
    image[:32, 32:] = np.arange(32 * 16).reshape(32, 16) % 256
    image[32:, :] = np.arange(16 * SIZE).reshape(16, SIZE) % 256
    return image.astype(np.uint8)


def _white_transparent(grey: np.ndarray) -> np.ndarray:
    """Alpha that hides every white pixel (their colour underneath is set to black)."""
    return np.where(grey == 255, 0, 255).astype(np.uint8)


def _grey_palette(grey: np.ndarray, transparent_white: bool) -> Image.Image:
    pal = Image.new("P", (grey.shape[1], grey.shape[0]))
    pal.putdata(list(grey.reshape(-1)))
    palette = [v for i in range(256) for v in (i, i, i)]
    if transparent_white:
        palette[-3:] = [0, 0, 0]  # index 255 is black but fully transparent: must come out white
    pal.putpalette(palette)
    if transparent_white:
        pal.info["transparency"] = 255
    return pal


def _write_variants(grey: np.ndarray, folder: Path) -> dict[str, Path]:
    """The same picture in every lossless mode a dataset may hold; name -> file."""
    g16 = grey.astype(np.uint16) * 257
    files: dict[str, Image.Image] = {
        "rgb8.png": Image.fromarray(np.stack([grey] * 3, axis=-1)),
        "l8.png": Image.fromarray(grey),
        "i16.png": Image.fromarray(g16),  # reopens as I;16
        "rgba.png": Image.fromarray(np.dstack([np.where(grey == 255, 0, grey)] * 3 + [_white_transparent(grey)])),
        "la.png": Image.merge("LA", [Image.fromarray(np.where(grey == 255, 0, grey).astype(np.uint8)),
                                     Image.fromarray(_white_transparent(grey))]),
        "palette.png": _grey_palette(grey, transparent_white=False),
        "palette_trns.png": _grey_palette(grey, transparent_white=True),
        "i32_16bit.tiff": Image.fromarray(grey.astype(np.int32) * 257),
        "i32_full.tiff": Image.fromarray(np.rint(grey.astype(np.float64) * INT32_MAX / 255).astype(np.int32)),
        "f_unit.tiff": Image.fromarray(grey.astype(np.float32) / 255),
        "f_255.tiff": Image.fromarray(grey.astype(np.float32)),
        "cmyk.tiff": Image.fromarray(np.stack([grey] * 3, axis=-1)).convert("CMYK"),
    }
    paths = {}
    for name, img in files.items():
        path = folder / name
        extra = {"transparency": img.info["transparency"]} if "transparency" in img.info else {}
        img.save(path, **extra)
        paths[name] = path
    return paths


def test_every_lossless_mode_loads_to_the_same_tensor(grey: np.ndarray, tmp_path: Path) -> None:
    paths = _write_variants(grey, tmp_path)
    expected_modes = {"rgb8.png": "RGB", "l8.png": "L", "i16.png": "I;16", "rgba.png": "RGBA", "la.png": "LA",
                      "palette.png": "P", "palette_trns.png": "P", "i32_16bit.tiff": "I", "i32_full.tiff": "I",
                      "f_unit.tiff": "F", "f_255.tiff": "F", "cmyk.tiff": "CMYK"}
    for name, mode in expected_modes.items():
        with Image.open(paths[name]) as img:
            assert img.mode == mode, name
    reference = load_image(paths["rgb8.png"], SIZE)
    assert np.array_equal(np.asarray(open_rgb(paths["rgb8.png"])), np.stack([grey] * 3, axis=-1))
    for name, path in paths.items():
        loaded = load_image(path, SIZE)
        assert torch.equal(loaded, reference), f"{name}: max diff {(loaded - reference).abs().max() * 127.5} levels"


def test_in_memory_16bit_byte_orders(grey: np.ndarray) -> None:
    g16 = grey.astype(np.uint16) * 257
    reference = np.stack([grey] * 3, axis=-1)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")):
        img = Image.frombytes(mode, (SIZE, SIZE), g16.astype(dtype).tobytes())
        assert np.array_equal(np.asarray(to_rgb(img, mode)), reference), mode


def test_mid_grey_16bit_is_mid_grey_not_white(tmp_path: Path) -> None:
    """The issue's example: 32768 of 65535 used to load as 255 (Pillow's convert clips)."""
    path = tmp_path / "mid.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert np.unique(np.asarray(open_rgb(path))).tolist() == [128]


def test_cmyk_jpeg_within_jpeg_error(grey: np.ndarray, tmp_path: Path) -> None:
    """JPEG is lossy: a CMYK JPEG matches the picture within 8 levels at worst and 1 level on average (quality 95)."""
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.stack([grey] * 3, axis=-1)).convert("CMYK").save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    reference = torch.from_numpy(np.stack([grey] * 3).astype(np.float32)).div_(127.5).sub_(1.0)
    diff = (load_image(path, SIZE) - reference).abs() * 127.5
    assert diff.max() <= 8 and diff.mean() <= 1


@pytest.mark.parametrize(
    ("name", "make", "needle"),
    [
        ("lab.tiff", lambda: Image.new("LAB", (8, 8), (50, 0, 0)), "has mode LAB"),
        ("negative.tiff", lambda: Image.fromarray(np.full((8, 8), -5, dtype=np.int32)), "mode I with negative"),
        ("hot.tiff", lambda: Image.fromarray(np.full((8, 8), 300.0, dtype=np.float32)), "mode F with values"),
        ("nan.tiff", lambda: Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), "mode F with NaN"),
    ],
)
def test_unmappable_mode_is_one_clear_error(tmp_path: Path, capsys, name, make, needle) -> None:
    path = tmp_path / name
    make().save(path)
    with pytest.raises(DataError, match=needle) as info:
        load_image(path, 8)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert run_cli(lambda argv: load_image(path, 8), []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image ") and needle in err and err.count("\n") == 1


def test_preparation_reports_the_mode_not_corruption(tmp_path: Path) -> None:
    """Encoded bytes (parquet / zip inputs) that decode fine but cannot be mapped name the mode."""
    import io

    buffer = io.BytesIO()
    Image.new("LAB", (8, 8), (50, 0, 0)).save(buffer, format="TIFF")
    with pytest.raises(DataError, match=r"image pika_001 has mode LAB"):
        write_pair(tmp_path, "pika_001", buffer.getvalue(), "a pokemon", 8)
    with pytest.raises(DataError, match=r"image pika_002 cannot be decoded: the input data is corrupt"):
        write_pair(tmp_path, "pika_002", b"not an image", "a pokemon", 8)


def test_latent_cache_key_includes_the_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    cache = LatentCache(None, "fp", 8)
    key = cache.key(path, 1)
    monkeypatch.setattr(latents, "IMAGE_CONVERSION", IMAGE_CONVERSION + "-next")
    assert cache.key(path, 1) != key


def test_image_tensor_is_levels_over_127_5_minus_one() -> None:
    # Guards the [-1, 1] normalisation the VAE expects: level 0 -> -1, 255 -> 1, and v -> v / 127.5 - 1 exactly.
    from library.data.images import image_tensor

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([levels, 255 - levels, np.full_like(levels, 128)], axis=-1))
    x = image_tensor(img, 16)  # at its own size: no resize, no crop
    expected = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(x, expected)
    assert x[0, 0, 0] == -1.0 and x[0, -1, -1] == 1.0 and x[1, 0, 0] == 1.0


@pytest.mark.parametrize(("size", "resized", "box"), [((34, 20), (14, 8), (3, 0, 11, 8)),
                                                      ((20, 34), (8, 14), (0, 3, 8, 11)),
                                                      ((38, 20), (15, 8), (3, 0, 11, 8))])
def test_resize_center_crop_is_lanczos_round_then_centre(size, resized, box) -> None:
    # Guards the documented resize: the short side to the resolution with Lanczos, the long side rounded to the
    # nearest pixel (34 * 8 / 20 = 13.6 -> 14, not 13), then the centred square, for wide and tall images alike.
    from library.data.images import resize_center_crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = img.resize(resized, resample=Image.Resampling.LANCZOS).crop(box)
    got = resize_center_crop(img, 8)
    assert got.size == (8, 8) and np.array_equal(np.asarray(got), np.asarray(expected))


def test_float_images_round_to_the_nearest_level() -> None:
    # Mode F rounds to the nearest 8-bit level in both of its ranges (100.6 -> 101, not truncated to 100).
    unit = np.array([[100.6 / 255, 0.2 / 255], [1.0, 0.0]], dtype=np.float32)  # values in [0, 1]: scaled by 255
    levels = np.array([[100.6, 3.4], [255.0, 0.0]], dtype=np.float32)  # values in [0, 255]: levels already
    for values, expected in ((unit, [[101, 0], [255, 0]]), (levels, [[101, 3], [255, 0]])):
        assert np.asarray(to_rgb(Image.fromarray(values), "f.tiff"))[..., 0].tolist() == expected


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    # Phone photos are stored sideways with an EXIF orientation: the image is loaded the way it is displayed.
    array = np.zeros((8, 16, 3), dtype=np.uint8)
    array[:, :8, 0] = 255  # left half red, right half blue
    array[:, 8:, 2] = 255
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.png"
    img.save(path, exif=exif)
    loaded = np.asarray(open_rgb(path))
    assert loaded.shape == (16, 8, 3)
    assert (loaded[:8, :, 0] == 255).all() and (loaded[8:, :, 2] == 255).all()  # red on top after the rotation


def test_a_decompression_bomb_is_a_data_error_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """Pillow's bomb guard raises its own exception type: it must still reach the user as one clear DataError."""
    path = tmp_path / "bomb.png"
    Image.new("RGB", (16, 16)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8)  # 256 pixels > 2 * 8: Pillow refuses to open it
    with pytest.raises(DataError, match=r"cannot read image .*bomb\.png"):
        load_image(path, 8)


def test_image_tensor_refuses_a_resolution_of_zero() -> None:
    """A zero resolution would give an empty tensor (or a Pillow error) instead of naming the setting."""
    from library.data.images import image_tensor

    with pytest.raises(ValueError, match="resolution must be positive, got 0"):
        image_tensor(Image.new("RGB", (8, 8)), 0)


def test_a_palette_image_with_alpha_is_composited_on_white() -> None:
    """Mode PA has an alpha band like LA: a transparent pixel comes out white, not refused or its hidden colour."""
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 0, 0] * 256)
    pa.putpixel((0, 0), (0, 0))  # black, fully transparent
    pa.putpixel((1, 0), (0, 255))  # black, opaque
    assert np.asarray(to_rgb(pa, "pa.png")).tolist() == [[[255, 255, 255], [0, 0, 0]]]
