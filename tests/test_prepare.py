"""Paper dataset preparation on small synthetic stand-ins laid out like the real downloads.

CelebA (img_align_celeba/, identity_CelebA.txt, list_attr_celeba.txt + a captions CSV), a Pokemon folder
(kohya, metadata.jsonl, parquet via a stand-in pyarrow), AFHQ train/{cat,dog,wild} and a COCO annotation
JSON. The CelebA subsets are checked at their Table 4 sizes; the others with --sizes.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.cli import run_cli
from library.data.manifest import CORE_SPLITS, read_manifest
from library.data.prepare import afhq, celeba, coco, pokemon
from library.data.prepare.common import (
    CaptionTable,
    parse_sizes,
    read_captions,
    sample_sorted,
    split_total,
)
from library.errors import ConfigError, DataError

RES = 16  # output side: tiny, so hundreds of images are written in well under a second


def _noise_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode)


# ---------------------------------------------------------------------------------------------------------
# Fake CelebA: 110 identities x 9 images (enough for small, large, gender and varying), 18 x 22 JPEGs
# ---------------------------------------------------------------------------------------------------------

N_IDS, PER_ID = 110, 9


def _is_male(identity: int) -> bool:
    return identity % 3 == 0  # 36 male identities, 74 female


@pytest.fixture(scope="module")
def fake_celeba(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("celeba")
    images = root / "img_align_celeba"
    images.mkdir()
    rng = np.random.default_rng(0)
    id_lines, attr_rows, caption_rows = [], [], ["image_id,caption"]
    n = 0
    for identity in range(1, N_IDS + 1):
        for _ in range(PER_ID):
            n += 1
            name = f"{n:06d}.jpg"
            _noise_image(rng, 18, 22).save(images / name, quality=90)
            id_lines.append(f"{name} {identity + 1000}")
            male = _is_male(identity)
            # One image per identity disagrees, as CelebA's per-image labels sometimes do: the vote still wins.
            if n % PER_ID == 0:
                male = not male
            attr_rows.append(f"{name}  -1 {' 1' if male else '-1'}  1")  # Smiling Male Young
            caption_rows.append(f'{name},"a person, photo number {n}"')
    (root / "identity_CelebA.txt").write_text("\n".join(id_lines) + "\n")
    attr = [str(n), "Smiling Male Young"] + attr_rows
    (root / "list_attr_celeba.txt").write_text("\n".join(attr) + "\n")
    captions = root / "captions.csv"
    captions.write_text("\n".join(caption_rows) + "\n")
    return root, captions


def _identity_of(caption: str) -> int:
    token = caption.split(",", 1)[0]
    assert token.startswith("cele")
    return int(token[len("cele"):])


def _check_manifest(manifest_path: Path, expected: int) -> dict:
    m = read_manifest(manifest_path)  # verifies every sha256
    assert {m.sizes()[s] for s in CORE_SPLITS} == {expected}
    paths = [e.path for s in CORE_SPLITS for e in getattr(m, s)]
    assert len(paths) == len(set(paths)) == 4 * expected  # disjoint
    return {s: getattr(m, s) for s in CORE_SPLITS}


def test_celeba_small_table4(fake_celeba, tmp_path):
    root, captions = fake_celeba
    out, manifest = tmp_path / "celeba_small" / "images", tmp_path / "celeba_small" / "split.json"
    result = celeba.main(["--celeba_dir", str(root), "--captions", str(captions), "--subset", "small",
                          "--output_dir", str(out), "--manifest", str(manifest), "--resolution", str(RES)])
    assert result.num_images == 200
    sets = _check_manifest(manifest, 50)
    per_identity = Counter(_identity_of(e.caption) for entries in sets.values() for e in entries)
    assert len(per_identity) == 25 and set(per_identity.values()) == {8}
    # Image-level membership: identities are spread over member and non-member sets, as upstream.
    spread = Counter(len({s for s, entries in sets.items() for e in entries if _identity_of(e.caption) == i})
                     for i in per_identity)
    assert max(spread) > 1
    png = sorted(out.glob("*.png"))
    assert len(png) == 200 and len(list(out.glob("*.txt"))) == 200
    with Image.open(png[0]) as img:
        assert img.size == (RES, RES) and img.mode == "RGB"
    text = png[0].with_suffix(".txt").read_text()
    assert text.startswith("cele") and ", a person, photo number" in text
    for path in png:  # each file has its own image's caption and identity (fixture: 9 images per identity)
        n = int(path.stem)
        assert path.with_suffix(".txt").read_text() == f"cele{1000 + (n - 1) // PER_ID + 1}, a person, photo number {n}\n"


def test_celeba_gender_ratio_and_flag(fake_celeba, tmp_path):
    root, captions = fake_celeba
    genders = {}
    for ratio, females in (("7:3", 14), ("3:7", 6)):
        out = tmp_path / ratio.replace(":", "_")
        celeba.main(["--celeba_dir", str(root), "--captions", str(captions), "--subset", "gender",
                     "--gender_ratio", ratio, "--output_dir", str(out / "images"), "--resolution", str(RES)])
        sets = _check_manifest(out / "split.json", 40)
        per_identity = Counter(_identity_of(e.caption) for entries in sets.values() for e in entries)
        assert len(per_identity) == 20 and set(per_identity.values()) == {8}
        genders[ratio] = Counter(_is_male(i - 1000) for i in per_identity)
        assert genders[ratio][False] == females and genders[ratio][True] == 20 - females


def test_celeba_varying_252(fake_celeba, tmp_path):
    root, captions = fake_celeba
    out = tmp_path / "varying" / "images"
    code = run_cli(celeba.main, ["--celeba_dir", str(root), "--captions", str(captions), "--subset", "varying",
                                 "--output_dir", str(out), "--resolution", str(RES)])
    assert code == 0
    sets = _check_manifest(out.parent / "split.json", 63)
    per_identity = Counter(_identity_of(e.caption) for entries in sets.values() for e in entries)
    assert len(per_identity) == 100 and sum(per_identity.values()) == 252
    assert set(per_identity.values()) <= {1, 2, 3, 4} and len(set(per_identity.values())) == 4


def test_celeba_selection_large_and_5x_and_determinism():
    # Selection is pure (no image is read): check the big presets on a fake identity table.
    identities = {f"{i:06d}.jpg": 5000 + i // 10 for i in range(6000)}  # 600 identities x 10 images
    for subset, ids, total in (("large", 100, 800), ("large_5x", 500, 4000), ("small", 25, 200)):
        picks = celeba.select_celeba(identities, subset, seed=1337)
        assert len(picks) == total == split_total(f"celeba_{subset}", None)
        assert len({p.identity for p in picks}) == ids
        assert set(Counter(p.identity for p in picks).values()) == {8}
        assert len({p.image for p in picks}) == total
    a = celeba.select_celeba(identities, "large", seed=1)
    assert a == celeba.select_celeba(identities, "large", seed=1)
    assert a != celeba.select_celeba(identities, "large", seed=2)
    with pytest.raises(DataError, match="identities with >= 8 images.*which --sizes does not shrink"):
        celeba.select_celeba(dict(list(identities.items())[:300]), "large", seed=0)  # no "ask for fewer"


@pytest.mark.parametrize("seed", range(5))
def test_varying_counts_condition_on_total(seed):
    counts = celeba.varying_counts(100, 252, seed)
    assert len(counts) == 100 and sum(counts) == 252 and min(counts) >= 1 and max(counts) <= 4
    assert counts == celeba.varying_counts(100, 252, seed)


def test_celeba_errors_name_the_file(fake_celeba, tmp_path, capsys):
    root, captions = fake_celeba
    empty = tmp_path / "empty"
    (empty / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match="identity_CelebA.txt"):
        celeba.main(["--celeba_dir", str(empty), "--captions", str(captions), "--subset", "small",
                     "--output_dir", str(tmp_path / "o")])
    with pytest.raises(DataError, match="img_align_celeba"):
        celeba.main(["--celeba_dir", str(tmp_path), "--captions", str(captions), "--subset", "small",
                     "--output_dir", str(tmp_path / "o")])
    partial = tmp_path / "partial.csv"
    partial.write_text("image_id,caption\n000001.jpg,a face\n")
    code = run_cli(celeba.main, ["--celeba_dir", str(root), "--captions", str(partial), "--subset", "small",
                                 "--output_dir", str(tmp_path / "o2"), "--resolution", str(RES)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: captions file") and "partial.csv" in err
    with pytest.raises(ConfigError, match="gender_ratio"):
        celeba.parse_ratio("7-3")


# ---------------------------------------------------------------------------------------------------------
# Pokemon
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_pokemon(tmp_path_factory) -> Path:
    """833 small images in the authors' kohya layout (1_pokemon/), some RGBA like the real PNGs."""
    root = tmp_path_factory.mktemp("pokemon_src")
    folder = root / "1_pokemon"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(833):
        mode = "RGBA" if i % 5 == 0 else "RGB"
        _noise_image(rng, 12, 12, mode).save(folder / f"pokemon_{i}-0000.png")
        prefix = "pokemon, " if i % 2 else ""
        (folder / f"pokemon_{i}-0000.txt").write_text(f"{prefix}a drawing of pokemon number {i}\n")
    return root


@pytest.mark.parametrize("table4, sizes", [(False, (200, 233, 200, 200)), (True, (200, 200, 200, 233))])
def test_pokemon_presets(fake_pokemon, tmp_path, table4, sizes):
    out = tmp_path / "pokemon" / "images"
    args = ["--source", str(fake_pokemon), "--output_dir", str(out), "--resolution", "8"]
    result = pokemon.main(args + (["--table4"] if table4 else []))
    m = read_manifest(result.manifest_path)
    assert tuple(m.sizes()[s] for s in CORE_SPLITS) == sizes
    assert len(m.members()) == sizes[0] + sizes[1] and result.num_images == 833
    assert m.preset == ("pokemon_table4" if table4 else "pokemon")
    captions = [e.caption for e in m.members() + m.nonmembers()]
    assert all(c.startswith("pokemon, a drawing") for c in captions)  # prefix added once, never twice
    assert not any(c.startswith("pokemon, pokemon,") for c in captions)


def _imagefolder_source(src: Path, n: int, seed: int, suffix: str = ".jpg", caption: str = "a cute monster") -> Path:
    """An imagefolder (metadata.jsonl) of ``n`` noise images captioned '<caption> <i>'."""
    src.mkdir()
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        _noise_image(rng, 10, 14).save(src / f"{i}{suffix}")
        lines.append(json.dumps({"file_name": f"{i}{suffix}", "text": f"{caption} {i}"}))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return src


def test_pokemon_imagefolder_and_sizes(tmp_path, capsys):
    src = _imagefolder_source(tmp_path / "src", 12, seed=2)
    result = pokemon.main(["--source", str(src), "--output_dir", str(tmp_path / "out"), "--resolution", "8",
                           "--sizes", "3,3,3,3", "--caption_prefix", ""])
    assert "holds 12 images" in capsys.readouterr().out  # warned: not the real 833
    m = read_manifest(result.manifest_path)
    assert m.sizes()["member_test"] == 3 and len(m.unused) == 0
    assert m.member_aux[0].caption.startswith("a cute monster")
    # A second run into the same folder needs --overwrite: for the manifest, and for the images.
    with pytest.raises(ConfigError, match="split.json already exists; pass --overwrite"):
        pokemon.main(["--source", str(src), "--output_dir", str(tmp_path / "out"), "--sizes", "3,3,3,3"])
    with pytest.raises(DataError, match="--overwrite"):
        pokemon.main(["--source", str(src), "--output_dir", str(tmp_path / "out"), "--sizes", "3,3,3,3",
                      "--manifest", str(tmp_path / "other.json")])


def test_a_killed_preparation_leaves_a_folder_no_split_is_drawn_from(tmp_path, monkeypatch):
    """A preparation killed half-way left some images that scripts/make_split.py split without a word."""
    from library.data.dataset import scan_dataset

    src = _imagefolder_source(tmp_path / "src", 12, seed=4)
    args = ["--source", str(src), "--output_dir", str(tmp_path / "out"), "--resolution", "8", "--sizes", "3,3,3,3"]
    written = []

    def killed_after_five(out, stem, *rest):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(stem)
        return real_write_pair(out, stem, *rest)

    real_write_pair = pokemon.write_pair
    monkeypatch.setattr(pokemon, "write_pair", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        pokemon.main(args)
    with pytest.raises(DataError, match="half-written by an interrupted preparation.*--overwrite"):
        scan_dataset(tmp_path / "out")
    monkeypatch.setattr(pokemon, "write_pair", real_write_pair)
    assert pokemon.main(args + ["--overwrite"]).num_images == 12 and len(scan_dataset(tmp_path / "out")) == 12


def test_pokemon_duplicate_images_say_how_to_split_the_written_folder(tmp_path):
    src = _imagefolder_source(tmp_path / "src", 8, seed=3, suffix=".png", caption="monster")
    (src / "7.png").write_bytes((src / "0.png").read_bytes())  # one picture twice, under two names
    out = tmp_path / "out"
    with pytest.raises(DataError, match="byte-identical") as failure:
        pokemon.main(["--source", str(src), "--output_dir", str(out), "--resolution", "8", "--sizes", "1,1,1,1",
                      "--caption_prefix", ""])
    assert f"scripts/make_split.py --dataset_dir {out}" in str(failure.value)  # a flag that exists, where it does
    assert "--allow_duplicates" in str(failure.value)


def _parquet_source(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 stand-in")
    return path


def test_pokemon_parquet_without_pyarrow(tmp_path, monkeypatch):
    _parquet_source(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import now fails even where pyarrow is installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        pokemon.main(["--source", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])


def test_pokemon_parquet_with_stand_in_pyarrow(tmp_path, monkeypatch):
    path = _parquet_source(tmp_path)
    rng = np.random.default_rng(3)
    blobs = []
    for _ in range(8):
        buffer = io.BytesIO()
        _noise_image(rng, 12, 12, "RGBA").save(buffer, format="PNG")
        blobs.append({"bytes": buffer.getvalue(), "path": None})
    texts = [f"a pokemon with {i} eyes" for i in range(8)]

    class Column(list):
        def to_pylist(self):
            return list(self)

    class Table:
        def column(self, name):
            return Column(blobs if name == "image" else texts)

    def read_table(source, columns):
        assert source == str(path) and columns == ["image", "text"]
        return Table()

    fake = types.ModuleType("pyarrow.parquet")
    fake.read_table = read_table
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake)
    result = pokemon.main(["--source", str(path), "--output_dir", str(tmp_path / "out"), "--resolution", "8",
                           "--sizes", "2,2,2,2"])
    assert result.num_images == 8
    assert (tmp_path / "out" / "pokemon_0003.txt").read_text() == "pokemon, a pokemon with 3 eyes\n"


def test_pokemon_missing_source(tmp_path):
    with pytest.raises(DataError, match="parquet"):
        pokemon.main(["--source", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images or parquet"):
        pokemon.main(["--source", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


# ---------------------------------------------------------------------------------------------------------
# AFHQ and COCO (Large 5X presets; scaled down with --sizes)
# ---------------------------------------------------------------------------------------------------------


def test_afhq(tmp_path):
    root = tmp_path / "afhq"
    rng = np.random.default_rng(4)
    rows = []
    for cls in afhq.CLASSES:
        (root / "train" / cls).mkdir(parents=True)
        for i in range(10):
            name = f"flickr_{cls}_{i:06d}.jpg"
            _noise_image(rng, 16, 16).save(root / "train" / cls / name)
            key = f"{cls}/{name}" if i % 2 else name  # both key styles are accepted
            rows.append(json.dumps({"image_id": key, "caption": f"a {cls} looking at the camera {i}"}))
    captions = tmp_path / "afhq_captions.jsonl"
    captions.write_text("\n".join(rows) + "\n")
    result = afhq.main(["--afhq_dir", str(root), "--captions", str(captions), "--output_dir",
                        str(tmp_path / "out" / "images"), "--resolution", "8", "--sizes", "5,5,5,5"])
    m = read_manifest(result.manifest_path)
    assert result.num_images == 20 and all(m.sizes()[s] == 5 for s in CORE_SPLITS)
    assert m.preset.startswith("afhq_large_5x")
    assert {e.path.split("_")[0] for e in m.members() + m.nonmembers()} <= set(afhq.CLASSES)
    assert split_total("afhq_large_5x", None) == 3000
    with pytest.raises(DataError, match="train/cat/"):
        afhq.main(["--afhq_dir", str(tmp_path), "--captions", str(captions), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(DataError, match="3000 captioned images are needed"):
        afhq.main(["--afhq_dir", str(root), "--captions", str(captions), "--output_dir", str(tmp_path / "x")])


def test_coco(tmp_path):
    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    rng = np.random.default_rng(5)
    images, annotations = [], []
    for i in range(24):
        name = f"{i + 1:012d}.jpg"
        _noise_image(rng, 20, 12).save(images_dir / name)  # landscape: must be centre-cropped
        images.append({"id": i + 1, "file_name": name, "height": 12, "width": 20})
        annotations.append({"id": 100 + i, "image_id": i + 1, "caption": f"first caption {i}"})
    annotations += [{"id": 500 + i, "image_id": i + 1, "caption": f"second caption {i}"} for i in range(24)]
    images.append({"id": 999, "file_name": "not_on_disk.jpg"})
    annotations.append({"id": 999, "image_id": 999, "caption": "missing image"})
    ann = tmp_path / "captions_train2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    result = coco.main(["--images_dir", str(images_dir), "--annotations", str(ann), "--output_dir",
                        str(tmp_path / "coco" / "images"), "--resolution", "8", "--sizes", "4,4,4,4"])
    m = read_manifest(result.manifest_path)
    assert result.num_images == 16
    assert all(e.caption.startswith("first caption") for e in m.members() + m.nonmembers())
    with Image.open(next((tmp_path / "coco" / "images").glob("*.png"))) as img:
        assert img.size == (8, 8)
    assert split_total("coco_large_5x", None) == 4000
    bad = tmp_path / "instances_train2017.json"
    bad.write_text(json.dumps({"images": images, "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match="captions_"):
        coco.main(["--images_dir", str(images_dir), "--annotations", str(bad), "--output_dir", str(tmp_path / "x")])
    with pytest.raises(DataError, match="captions_train2017.json"):
        coco.main(["--images_dir", str(images_dir), "--annotations", str(tmp_path / "none.json"),
                   "--output_dir", str(tmp_path / "x")])
    with pytest.raises(DataError, match=f"file {images_dir} is a folder, not a file"):
        coco.main(["--images_dir", str(images_dir), "--annotations", str(images_dir), "--output_dir", str(tmp_path / "x")])


# ---------------------------------------------------------------------------------------------------------
# Inputs are never written to; a split that cannot be made is refused before any image is written
# ---------------------------------------------------------------------------------------------------------


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_an_output_folder_that_overlaps_the_inputs_is_refused_even_with_overwrite(fake_celeba, tmp_path):
    """--overwrite deletes a folder's images and captions: pointed at the dataset itself it would delete the
    source images (or CelebA's identity .txt), so an output that is, lies in or holds an input is refused."""
    root, captions = fake_celeba
    before = _files(root)
    for out, relation in [(root / "img_align_celeba", "is the input"), (root / "img_align_celeba" / "sub", "lies inside"),
                          (root, "holds the input")]:
        with pytest.raises(DataError, match=relation):
            celeba.main(["--celeba_dir", str(root), "--captions", str(captions), "--subset", "small",
                         "--output_dir", str(out), "--manifest", str(tmp_path / "m.json"), "--overwrite"])
    assert _files(root) == before
    src = _imagefolder_source(tmp_path / "src", 8, seed=6)
    kept = _files(src)
    for out in (src, src / "prepared"):  # the source is scanned recursively: a folder inside it is refused too
        with pytest.raises(DataError, match="choose a folder outside the inputs"):
            pokemon.main(["--source", str(src), "--output_dir", str(out), "--sizes", "2,2,2,2", "--overwrite",
                          "--manifest", str(tmp_path / "p.json")])
    assert _files(src) == kept and not (tmp_path / "p.json").exists()
    # A folder beside the inputs, even inside the dataset's root, is fine.
    result = celeba.main(["--celeba_dir", str(root), "--captions", str(captions), "--subset", "small",
                          "--output_dir", str(root / "prepared"), "--manifest", str(tmp_path / "m.json"),
                          "--resolution", str(RES)])
    assert result.num_images == 200
    shutil.rmtree(root / "prepared")


@pytest.mark.parametrize("sizes, message", [("5,3,5,3", "needs 16: pass smaller --sizes"),
                                            ("3,2,2,2", "member_aux (3) and nonmember_aux (2) differ")])
def test_a_split_that_cannot_be_made_is_refused_before_any_image_is_written(tmp_path, sizes, message):
    src = _imagefolder_source(tmp_path / "src", 12, seed=7)
    out = tmp_path / "out"
    with pytest.raises((DataError, ConfigError), match=message.replace("(", r"\(").replace(")", r"\)")):
        pokemon.main(["--source", str(src), "--output_dir", str(out), "--resolution", "8", "--sizes", sizes])
    assert not out.exists()  # the corrected rerun needs no --overwrite


# ---------------------------------------------------------------------------------------------------------
# Captions files and small helpers
# ---------------------------------------------------------------------------------------------------------


def test_caption_files(tmp_path):
    headerless = tmp_path / "a.csv"
    headerless.write_text('000001.jpg,"smiling, outdoors"\n000002.jpg,a man\n')
    assert read_captions(headerless) == {"000001.jpg": "smiling, outdoors", "000002.jpg": "a man"}
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"file_name": "cat/x.jpg", "text": "a cat"}\n\n')
    table = CaptionTable.from_file(jsonl)
    assert table.get("cat/x.jpg") == table.get("x.jpg") == table.get("x") == "a cat"
    jsonl.write_text('{"file_name": "cat/x.jpg", "text": "a cat"}\n\n{"file_name": "y.jpg", text}\n')
    with pytest.raises(DataError, match="b.jsonl line 3 is not valid JSON"):  # blank lines counted, not read
        read_captions(jsonl)
    # a key of the file wins over a name derived from another; a name two captions share names neither
    table = CaptionTable({"sub/a.jpg": "B", "a.jpg": "A", "cat/x.jpg": "a cat", "dog/x.jpg": "a dog"}, "t.csv")
    assert (table.get("a.jpg"), table.get("sub/a.jpg"), table.get("dog/x.jpg")) == ("A", "B", "a dog")
    assert table.get("bird/x.jpg") is None and table.get("x") is None
    with pytest.raises(DataError, match=r"no caption for image bird/x.jpg: its file name is shared by the rows of "
                                        r"cat/x.jpg, dog/x.jpg, .*keyed by its path \('bird/x.jpg,<caption>'\)"):
        table.require("bird/x.jpg")
    with pytest.raises(DataError, match=r"no caption for image y.jpg: add a row for it"):
        table.require("y.jpg")
    mapping = tmp_path / "c.json"
    mapping.write_text('{"y.png": "a dog"}')
    assert read_captions(mapping) == {"y.png": "a dog"}
    dup = tmp_path / "d.csv"
    dup.write_text("image_id,caption\nx.jpg,one\nx.jpg,two\n")
    with pytest.raises(DataError, match="second caption"):
        read_captions(dup)
    bad_header = tmp_path / "e.csv"
    bad_header.write_text("name,caption\nx.jpg,one\n")
    with pytest.raises(DataError, match="image_id"):
        read_captions(bad_header)
    assert parse_sizes("1,2,3,4") == dict(zip(CORE_SPLITS, (1, 2, 3, 4)))
    with pytest.raises(ConfigError, match="--sizes"):
        parse_sizes("1,2,3")


# ---------------------------------------------------------------------------------------------------------
# What decides membership: which images are selected, from which rows, with which seed (mutation pass)
# ---------------------------------------------------------------------------------------------------------


def test_celeba_selection_for_a_seed_is_pinned():
    """--seed fixes the selection (docs/reproducing.md): the same seed must pick the same identities, images and
    varying counts in every release, or a re-prepared dataset silently gets other members. The table is given in
    reverse order: the selection depends on the names, not on the file's order."""
    identities = {f"{i:06d}.jpg": 5000 + i // 8 for i in reversed(range(1200))}  # 150 identities x 8 images
    small = celeba.select_celeba(identities, "small", seed=1337)
    assert sorted({p.identity for p in small}) == [
        5010, 5013, 5015, 5021, 5025, 5029, 5048, 5052, 5054, 5058, 5062, 5066, 5069, 5071, 5076, 5084, 5093, 5099,
        5104, 5112, 5118, 5126, 5135, 5144, 5149]
    varying = celeba.select_celeba(identities, "varying", seed=1337)
    counts = Counter(p.identity for p in varying)
    assert [(i, counts[i]) for i in sorted(counts)][:8] == [
        (5000, 2), (5004, 2), (5005, 1), (5006, 4), (5008, 4), (5009, 2), (5010, 4), (5011, 1)]
    assert [p.image for p in varying][:6] == ["000000.jpg", "000002.jpg", "000032.jpg", "000039.jpg", "000047.jpg",
                                               "000049.jpg"]


def test_celeba_identities_with_exactly_the_needed_images_are_eligible():
    """An identity with exactly 8 images can give 8 (and exactly 4 can give varying's up to 4)."""
    eight = {f"{i:06d}.jpg": i // 8 for i in range(100 * 8)}
    assert len(celeba.select_celeba(eight, "large", seed=0)) == 800
    four = {f"{i:06d}.jpg": i // 4 for i in range(100 * 4)}
    assert len(celeba.select_celeba(four, "varying", seed=0)) == 252


def test_selection_helpers_edges(tmp_path):
    rng = np.random.default_rng(0)
    assert sample_sorted(["c", "a", "b"], 3, rng, "items") == ["a", "b", "c"]  # all of them, each once
    assert parse_sizes("0,2,0,2") == dict(zip(CORE_SPLITS, (0, 2, 0, 2)))  # "non-negative": 0 is a size
    assert celeba.parse_ratio("20:0") == (20, 0)
    # An identity's gender is the majority vote of its images; a tie leaves it out (not female by default).
    ids = {"1.jpg": 1, "2.jpg": 1, "3.jpg": 2, "4.jpg": 2, "5.jpg": 2}
    male = {"1.jpg": True, "2.jpg": False, "3.jpg": True, "4.jpg": True, "5.jpg": False}
    assert celeba.identity_genders(ids, male) == {2: True}
    # Kaggle's list_attr_celeba.csv: Male is 1 / -1 per image.
    csv_attr = tmp_path / "list_attr_celeba.csv"
    csv_attr.write_text("image_id,Smiling,Male\n000001.jpg,1,-1\n000002.jpg,-1,1\n")
    assert celeba.read_male_attribute(csv_attr) == {"000001.jpg": False, "000002.jpg": True}
    # A blank line inside identity_CelebA.txt does not end the list.
    id_file = tmp_path / "identity_CelebA.txt"
    id_file.write_text("000001.jpg 7\n\n000002.jpg 9\n")
    assert celeba.read_identities(id_file) == {"000001.jpg": 7, "000002.jpg": 9}
    assert pokemon.with_prefix("Pokemon,  a Pikachu", "pokemon, ") == "Pokemon, a Pikachu"  # case-insensitive


def test_captions_csv_prefers_the_documented_columns_and_skips_its_header(tmp_path):
    """A CSV with several candidate columns uses the first of KEY_COLUMNS / CAPTION_COLUMNS (image_id, caption);
    the header row itself is no image."""
    path = tmp_path / "c.csv"
    path.write_text("file_name,text,caption,image_id\nx.jpg,a tag list,the caption,y.jpg\n")
    assert read_captions(path) == {"y.jpg": "the caption"}


def test_celeba_from_anno_with_kaggle_csv_and_images_not_on_disk(fake_celeba, tmp_path):
    """The metadata may sit in Anno/ and the attributes be Kaggle's CSV (docs/reproducing.md); images listed in
    identity_CelebA.txt but not extracted are never selected."""
    root, captions = fake_celeba
    other = tmp_path / "celeba"
    (other / "Anno").mkdir(parents=True)
    (other / "img_align_celeba").symlink_to(root / "img_align_celeba", target_is_directory=True)
    shutil.copy(root / "identity_CelebA.txt", other / "Anno" / "identity_CelebA.txt")
    rows = [line.split() for line in (root / "list_attr_celeba.txt").read_text().splitlines()[2:]]
    (other / "Anno" / "list_attr_celeba.csv").write_text(
        "image_id,Smiling,Male,Young\n" + "".join(",".join(r) + "\n" for r in rows))
    celeba.main(["--celeba_dir", str(other), "--captions", str(captions), "--subset", "gender",
                 "--output_dir", str(tmp_path / "g" / "images"), "--resolution", "8"])
    sets = _check_manifest(tmp_path / "g" / "split.json", 40)
    per_identity = Counter(_identity_of(e.caption) for entries in sets.values() for e in entries)
    assert Counter(_is_male(i - 1000) for i in per_identity) == {False: 14, True: 6}
    ghosts = tmp_path / "identity_with_ghosts.txt"  # 300 identities listed whose images were never extracted
    ghosts.write_text((root / "identity_CelebA.txt").read_text()
                      + "".join(f"{900000 + i:06d}.jpg {3000 + i // 9}\n" for i in range(300 * 9)))
    result = celeba.prepare_celeba(root, captions, "small", tmp_path / "s" / "images", tmp_path / "s" / "split.json",
                                   resolution=8, identity_file=ghosts)
    assert result.num_images == 200


def test_prepare_records_the_seed_preset_and_caption_source(tmp_path):
    """The manifest records the --seed used (default 1337, upstream's), the scaled preset and where the captions
    were read (so an edited caption is noticed); another --seed draws other members. Images are numbered in
    sorted-path order, and --overwrite removes the old captions too."""
    src = _imagefolder_source(tmp_path / "src", 12, seed=8)
    out = tmp_path / "out"
    args = ["--source", str(src), "--output_dir", str(out), "--resolution", "8", "--sizes", "3,3,3,3",
            "--caption_prefix", ""]
    first = read_manifest(pokemon.main(args).manifest_path)
    assert first.seed == 1337 and first.preset == "pokemon (scaled: 3,3,3,3)" and first.caption_source
    assert (out / "pokemon_0002.txt").read_text() == "a cute monster 10\n"  # sorted paths: 0, 1, 10, 11, 2, ...
    (out / "stale.txt").write_text("a caption of an image no longer there\n")
    second = read_manifest(pokemon.main(args + ["--seed", "5", "--overwrite"]).manifest_path)
    assert second.seed == 5 and {e.path for e in second.members()} != {e.path for e in first.members()}
    assert not (out / "stale.txt").exists()


def test_pokemon_parquet_files_are_read_in_sorted_order(tmp_path, monkeypatch):
    """Images are numbered in the parquet files' sorted order, then row order (module docstring)."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("train-00001-of-00002.parquet", "train-00000-of-00002.parquet"):
        (folder / name).write_bytes(b"PAR1 stand-in")
    rng = np.random.default_rng(9)

    def read_table(source, columns):
        part = Path(source).name[10]  # the file's number
        blobs = []
        for _ in range(4):
            buffer = io.BytesIO()
            _noise_image(rng, 8, 8).save(buffer, format="PNG")
            blobs.append({"bytes": buffer.getvalue()})
        texts = [f"part {part} row {r}" for r in range(4)]
        return types.SimpleNamespace(column=lambda name: types.SimpleNamespace(
            to_pylist=lambda: blobs if name == "image" else texts))

    fake = types.ModuleType("pyarrow.parquet")
    fake.read_table = read_table
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake)
    out = tmp_path / "out"
    pokemon.main(["--source", str(folder), "--output_dir", str(out), "--resolution", "8", "--sizes", "1,1,1,1"])
    assert (out / "pokemon_0001.txt").read_text() == "pokemon, part 0 row 1\n"
    assert (out / "pokemon_0005.txt").read_text() == "pokemon, part 1 row 1\n"


def _coco_source(tmp_path: Path, n: int, first_caption=lambda i: f"first caption {i}") -> tuple[Path, Path]:
    images_dir = tmp_path / "train2017"
    images_dir.mkdir()
    rng = np.random.default_rng(10)
    images, annotations = [], []
    for i in range(1, n + 1):
        _noise_image(rng, 10, 8).save(images_dir / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg"})
        annotations += [{"image_id": i, "caption": first_caption(i)}, {"image_id": i, "caption": f"second {i}"}]
    ann = tmp_path / "captions_train2017.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return images_dir, ann


def test_coco_first_non_empty_caption_and_seeded_selection(tmp_path):
    """An empty caption is no caption: the first non-empty one wins. The seeded sample is pinned (--seed fixes the
    selection, docs/reproducing.md)."""
    images_dir, ann = _coco_source(tmp_path, 12, lambda i: "   " if i == 3 else f"first caption {i}")
    assert coco.first_captions(ann)["000000000003.jpg"] == "second 3"
    result = coco.main(["--images_dir", str(images_dir), "--annotations", str(ann), "--output_dir",
                        str(tmp_path / "out"), "--resolution", "8", "--sizes", "2,2,2,2"])
    m = read_manifest(result.manifest_path)
    assert sorted(int(e.path[:12]) for s in CORE_SPLITS for e in getattr(m, s)) == [1, 3, 4, 5, 6, 8, 10, 12]


def test_afhq_selects_captioned_images_only(tmp_path):
    """Images without a caption are not drawn (module docstring: 'among the images that have a caption'); --afhq_dir
    may be the train folder itself; the seeded sample is pinned."""
    train = tmp_path / "afhq" / "train"
    rng = np.random.default_rng(11)
    rows = []
    for cls in afhq.CLASSES:
        (train / cls).mkdir(parents=True)
        for i in range(6):
            _noise_image(rng, 8, 8).save(train / cls / f"flickr_{cls}_{i:06d}.jpg")
            if i % 3:  # two images in three have a caption
                rows.append(f"flickr_{cls}_{i:06d}.jpg,a {cls} {i}")
    captions = tmp_path / "captions.csv"
    captions.write_text("image_id,caption\n" + "\n".join(rows) + "\n")
    result = afhq.main(["--afhq_dir", str(train), "--captions", str(captions), "--output_dir", str(tmp_path / "out"),
                        "--resolution", "8", "--sizes", "2,2,2,2"])
    m = read_manifest(result.manifest_path)
    picked = sorted(e.path for s in CORE_SPLITS for e in getattr(m, s))
    assert all(int(path[-5]) % 3 for path in picked)  # captioned ones only
    assert picked == ["cat_flickr_cat_000002.png", "cat_flickr_cat_000004.png", "cat_flickr_cat_000005.png",
                      "dog_flickr_dog_000001.png", "dog_flickr_dog_000002.png", "dog_flickr_dog_000004.png",
                      "wild_flickr_wild_000002.png", "wild_flickr_wild_000004.png"]
