"""Split by file: presets, determinism, disjointness, manifest round trip and staleness checks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from library.data.dataset import ImageCaption, scan_dataset
from library.data.manifest import (
    CORE_SPLITS,
    SplitEntry,
    SplitManifest,
    _stored_root,
    manifest_sha256,
    pretrain_records,
    read_manifest,
    split_sha256,
    write_manifest,
)
from library.data.splits import PRESETS, make_split, resolve_sizes
from library.errors import ConfigError, DataError, UserError

REPO = Path(__file__).resolve().parents[1]


def _dataset(root: Path, n: int, decodable: bool = False) -> list[ImageCaption]:
    """n tiny distinct 'images' with captions (bytes need not decode: make_split only hashes them; the script
    decodes what it draws, so ``decodable`` writes real 1-pixel PNGs)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if decodable:
            Image.new("RGB", (1, 1), (i % 256, i // 256, 0)).save(root / f"{i:04d}.png")
        else:
            (root / f"{i:04d}.png").write_bytes(f"image-{i}".encode())
        (root / f"{i:04d}.txt").write_text(f"caption {i}\n")
    return scan_dataset(root)


def _paths(entries: list[SplitEntry]) -> list[str]:
    return [e.path for e in entries]


def test_presets_match_table4():
    assert PRESETS["pokemon"].as_dict() == dict(member_aux=200, member_test=233, nonmember_aux=200, nonmember_test=200)
    assert PRESETS["pokemon"].total == 833 and PRESETS["pokemon_table4"].total == 833
    assert PRESETS["pokemon_table4"].as_dict()["nonmember_test"] == 233
    expected = {"celeba_small": 50, "celeba_large": 200, "celeba_gender": 40, "celeba_varying": 63,
                "celeba_large_5x": 1000, "afhq_large_5x": 750, "coco_large_5x": 1000, "digits_demo": 100}
    for name, size in expected.items():
        assert set(PRESETS[name].as_dict().values()) == {size}, name


def test_split_sizes_from_preset_and_disjoint(tmp_path):
    records = _dataset(tmp_path / "d", 900)
    m = make_split(records, preset="pokemon", seed=1337)
    assert m.preset == "pokemon"  # the manifest names the experiment whose sizes it drew
    assert m.sizes() == dict(member_aux=200, member_test=233, nonmember_aux=200, nonmember_test=200, pretrain=0,
                             unused=67)
    all_paths = [p for entries in m.splits().values() for p in _paths(entries)]
    assert len(all_paths) == len(set(all_paths)) == 900  # disjoint and complete
    assert len(m.members()) == 433 and set(_paths(m.members())).isdisjoint(_paths(m.nonmembers()))
    assert _paths(m.nonmembers()) == _paths(m.nonmember_aux) + _paths(m.nonmember_test)  # both non-member sets
    assert _paths(m.aux()) == _paths(m.member_aux) + _paths(m.nonmember_aux)
    assert _paths(m.test()) == _paths(m.member_test) + _paths(m.nonmember_test)
    first = m.member_test[0]
    assert m.split_of(first.path) == "member_test" and m.is_member(first.path)
    assert m.split_of(m.nonmember_aux[0].path) == "nonmember_aux" and not m.is_member(m.nonmember_aux[0].path)
    assert m.split_of("nope.png") is None
    assert first.caption == f"caption {int(first.path[:4])}"
    assert m.abs_path(first) == (tmp_path / "d" / first.path).resolve()


def test_split_deterministic_and_seed_dependent(tmp_path):
    records = _dataset(tmp_path / "d", 60)
    sizes = dict(member_aux=10, member_test=10, nonmember_aux=10, nonmember_test=10)
    state = random.getstate(), np.random.get_state()
    a = make_split(records, sizes=sizes, seed=0)
    random.seed(123)
    np.random.seed(123)
    b = make_split(list(reversed(records)), sizes=sizes, seed=0)  # input order and global RNG do not matter
    c = make_split(records, sizes=sizes, seed=1)
    random.setstate(state[0])
    np.random.set_state(state[1])
    assert a.splits() == b.splits()
    assert _paths(a.members()) != _paths(c.members())


def test_pretrain_portion(tmp_path):
    records = _dataset(tmp_path / "d", 50)
    sizes = dict(member_aux=5, member_test=5, nonmember_aux=5, nonmember_test=5)
    rest = make_split(records, sizes=sizes, seed=0, pretrain="rest")
    assert len(rest.pretrain) == 30 and rest.unused == []
    some = make_split(records, sizes=sizes, seed=0, pretrain=7)
    assert len(some.pretrain) == 7 and len(some.unused) == 23
    core = {p for name in CORE_SPLITS for p in _paths(getattr(some, name))}
    assert core.isdisjoint(_paths(some.pretrain))
    # Reserving pretrain images never changes which images are members for the same seed.
    assert some.splits()["member_aux"] == rest.splits()["member_aux"]


def test_new_concept_split_keeps_the_base_domain_out_of_every_membership_set(tmp_path):
    records = _dataset(tmp_path / "d", 50)
    in_base = {r.path for r in records if int(r.caption.split()[1]) % 2 == 0}  # "caption 4": even = base domain
    sizes = dict(member_aux=4, member_test=4, nonmember_aux=4, nonmember_test=4)
    split = make_split(records, sizes=sizes, seed=0, base_domain=lambda r: r.path in in_base)
    assert {tmp_path / "d" / e.path for e in split.pretrain} == in_base  # the whole base domain, nothing else
    drawn = [tmp_path / "d" / p for name in CORE_SPLITS for p in _paths(getattr(split, name))]
    assert len(drawn) == 16 and in_base.isdisjoint(drawn)
    assert len(split.unused) == 25 - 16 and in_base.isdisjoint(tmp_path / "d" / e.path for e in split.unused)
    with pytest.raises(ConfigError, match="either pretrain= or base_domain="):
        make_split(records, sizes=sizes, seed=0, pretrain="rest", base_domain=lambda r: True)
    with pytest.raises(DataError, match=r"needs 28 images .* has 25 usable ones outside the base domain \(25 images"):
        make_split(records, sizes=dict(sizes, member_test=10, nonmember_test=10), seed=0,
                   base_domain=lambda r: r.path in in_base)


def test_exclude_and_too_small(tmp_path):
    records = _dataset(tmp_path / "d", 20)
    sizes = dict(member_aux=5, member_test=5, nonmember_aux=5, nonmember_test=5)
    small = dict(member_aux=4, member_test=4, nonmember_aux=4, nonmember_test=4)
    m = make_split(records, sizes=small, seed=0, exclude={"0000.png", "0001.png"})
    listed = {p for entries in m.splits().values() for p in _paths(entries)}
    assert "0000.png" not in listed and len(listed) == 18
    by_hash = make_split(records, sizes=small, seed=0, exclude={m.member_aux[0].sha256})
    assert m.member_aux[0].path not in {p for e in by_hash.splits().values() for p in _paths(e)}
    with pytest.raises(DataError, match=r"needs 20 images.*has 18 usable ones \(2 excluded\)"):
        make_split(records, sizes=sizes, seed=0, exclude={"0000.png", "0001.png"}, pretrain=0)
    with pytest.raises(DataError, match=r"needs 400 images .* has 20"):
        make_split(records, preset="digits_demo", seed=0)
    with pytest.raises(DataError, match=r"needs 21 images"):
        make_split(records, sizes=sizes, seed=0, pretrain=1)


def test_bad_sizes_and_balance(tmp_path):
    records = _dataset(tmp_path / "d", 20)
    with pytest.raises(ConfigError, match="non-negative"):
        make_split(records, sizes=dict(member_aux=-1, member_test=1, nonmember_aux=1, nonmember_test=1), seed=0)
    with pytest.raises(ConfigError, match="non-negative"):
        resolve_sizes(dict(member_aux=1.5, member_test=1, nonmember_aux=1, nonmember_test=1))
    with pytest.raises(ConfigError, match="unknown split size"):
        resolve_sizes(dict(members=3), preset="celeba_small")
    with pytest.raises(ConfigError, match="unknown split preset"):
        resolve_sizes(preset="celeba_huge")
    with pytest.raises(ConfigError, match="missing"):
        resolve_sizes(dict(member_aux=1))
    assert resolve_sizes(dict(member_test=7), preset="celeba_small").member_test == 7
    unbalanced = dict(member_aux=3, member_test=1, nonmember_aux=2, nonmember_test=1)
    with pytest.raises(ConfigError, match="balanced"):
        make_split(records, sizes=unbalanced, seed=0)
    assert len(make_split(records, sizes=unbalanced, seed=0, allow_unbalanced_aux=True).member_aux) == 3


def test_empty_image_files_are_named_as_empty_not_as_copies(tmp_path):
    records = _dataset(tmp_path, 12)
    for name in ("0003.png", "0007.png"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"0003\.png is an empty file \(0 bytes\)"):
        make_split(records, sizes={"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2},
                   seed=0, allow_duplicates=True)


def test_duplicate_images_refused(tmp_path):
    records = _dataset(tmp_path / "d", 10)
    (tmp_path / "d" / "0009.png").write_bytes((tmp_path / "d" / "0003.png").read_bytes())
    sizes = dict(member_aux=1, member_test=1, nonmember_aux=1, nonmember_test=1)
    with pytest.raises(DataError, match=r"0003\.png and 0009\.png .*identical"):
        make_split(records, sizes=sizes, seed=0)
    make_split(records, sizes=sizes, seed=0, allow_duplicates=True)


def test_manifest_rejects_overlap(tmp_path):
    e = SplitEntry("a.png", "a", "0" * 64)
    with pytest.raises(DataError, match="a.png twice"):
        SplitManifest(dataset_root=tmp_path, seed=0, member_aux=[e], nonmember_test=[e])


def test_manifest_round_trip(tmp_path):
    records = _dataset(tmp_path / "data" / "d", 30)
    m = make_split(records, preset=None, sizes=dict(member_aux=4, member_test=5, nonmember_aux=4, nonmember_test=6),
                   seed=3, pretrain=2, dataset_root=tmp_path / "data" / "d")
    path = tmp_path / "runs" / "split.json"
    write_manifest(m, path)
    doc = json.loads(path.read_text())
    assert doc["dataset_root"] == "../data/d" and doc["format_version"] == 1 and doc["seed"] == 3
    back = read_manifest(path)
    assert back.splits() == m.splits() and back.seed == 3 and back.dataset_root == m.dataset_root
    assert back.created_by.startswith("smp-lora")
    digest = manifest_sha256(path)
    write_manifest(back, path)
    assert manifest_sha256(path) == digest  # byte-stable


def test_stored_root_absolute_without_common_parent():
    assert _stored_root(Path("/srv/data/celeba"), Path("/home/me/runs")) == "/srv/data/celeba"
    assert _stored_root(Path("/home/me/data/celeba"), Path("/home/me/runs")) == "../data/celeba"


def test_manifest_moved_dataset(tmp_path):
    records = _dataset(tmp_path / "d", 8)
    m = make_split(records, sizes=dict(member_aux=2, member_test=2, nonmember_aux=2, nonmember_test=2), seed=0)
    path = tmp_path / "m.json"
    write_manifest(m, path)
    assert json.loads(path.read_text())["dataset_root"] == "d"
    moved = tmp_path / "elsewhere"
    (tmp_path / "d").rename(moved)
    with pytest.raises(DataError, match="missing"):
        read_manifest(path)
    assert read_manifest(path, dataset_root=moved).dataset_root == moved.resolve()


def test_stale_manifest_names_image(tmp_path):
    records = _dataset(tmp_path / "d", 12)
    m = make_split(records, sizes=dict(member_aux=3, member_test=3, nonmember_aux=3, nonmember_test=3), seed=0)
    path = tmp_path / "split.json"
    write_manifest(m, path)
    victim = m.abs_path(m.member_test[1])
    victim.write_bytes(b"edited")
    with pytest.raises(DataError, match=rf"{victim.name}.*member_test.*stale"):
        read_manifest(path)
    assert read_manifest(path, verify=False).member_test[1].path == victim.name
    victim.unlink()
    with pytest.raises(DataError, match=rf"{victim.name}.*missing.*stale"):
        read_manifest(path)


def test_corrupt_or_wrong_version_manifest(tmp_path):
    path = tmp_path / "split.json"
    path.write_text("{ not json")
    with pytest.raises(DataError, match="not readable JSON"):
        read_manifest(path)
    path.write_text(json.dumps({"format": "smp-lora-split", "format_version": 99, "splits": {}}))
    with pytest.raises(DataError, match="format_version 99"):
        read_manifest(path)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(DataError, match="not an smp-lora split manifest"):
        read_manifest(path)
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "none.json")


def test_make_split_script(tmp_path, capsys):
    _dataset(tmp_path / "d", 20, decodable=True)
    spec = importlib.util.spec_from_file_location("make_split", REPO / "scripts" / "make_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "split.json"
    args = ["--dataset_dir", str(tmp_path / "d"), "--output", str(out), "--seed", "5", "--pretrain", "rest"]
    sizes = ["--member_aux", "3", "--member_test", "4", "--nonmember_aux", "3", "--nonmember_test", "4"]
    assert module.main(args + sizes) == 0
    text = capsys.readouterr().out
    assert "member_test     4" in text and "pretrain        6" in text
    m = read_manifest(out)
    assert len(m.members()) == 7 and m.created_by.endswith("make_split.py")
    written = out.read_bytes()
    assert module.main(args + ["--preset", "celeba_small"]) == 2  # an existing manifest needs --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert module.main(args + ["--preset", "celeba_small", "--overwrite"]) == 2
    assert "needs 200 images" in capsys.readouterr().err
    assert out.read_bytes() == written  # a failed split replaces nothing

    # A new-concept split: captions "caption 1x" (10-19) are the base domain, the sets come from 0-9.
    small = ["--member_aux", "2", "--member_test", "3", "--nonmember_aux", "2", "--nonmember_test", "3"]
    concept = ["--dataset_dir", str(tmp_path / "d"), "--seed", "5", "--base_domain_caption_regex", r"^caption 1\d$",
               *small]
    assert module.main(concept + ["--output", str(tmp_path / "concept.json")]) == 0
    m = read_manifest(tmp_path / "concept.json")
    assert sorted(e.caption for e in m.pretrain) == [f"caption {i}" for i in range(10, 20)]
    assert all(int(e.caption.split()[1]) < 10 for e in m.members() + m.nonmembers())
    capsys.readouterr()
    assert module.main(concept[:5] + ["(", *small, "--output", str(tmp_path / "bad.json")]) == 2
    assert "is not a regular expression" in capsys.readouterr().err


def _make_split_script():
    spec = importlib.util.spec_from_file_location("make_split", REPO / "scripts" / "make_split.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--member_aux", "2", "--member_test", "2", "--nonmember_aux", "2", "--nonmember_test", "2"]


def test_a_caption_edited_after_the_split_is_named(tmp_path, capsys):
    """The usual kohya loop edits captions and retrains: runs use the manifest's captions, and say so."""
    _dataset(tmp_path / "d", 10, decodable=True)
    out = tmp_path / "split.json"
    args = ["--dataset_dir", str(tmp_path / "d"), "--output", str(out), "--seed", "1", *SMALL]
    assert _make_split_script().main(args) == 0
    manifest = read_manifest(out)
    assert manifest.caption_source == {"caption_extension": ".txt"}
    capsys.readouterr()
    member = manifest.member_aux[0]
    (tmp_path / "d" / member.path).with_suffix(".txt").write_text("sks, a new trigger word\n")
    read_manifest(out)
    err = capsys.readouterr().err
    assert f"1 caption(s) differ from {out}'s (first: {member.path}: {member.caption!r} in the manifest, " \
           "'sks, a new trigger word' now)" in err and "re-run scripts/make_split.py with --overwrite" in err
    assert _make_split_script().main(args + ["--overwrite"]) == 0
    again = read_manifest(out)
    assert capsys.readouterr().err == ""
    assert _paths(again.member_aux) == _paths(manifest.member_aux)  # the same images, the new caption
    assert again.member_aux[0].caption == "sks, a new trigger word"
    (tmp_path / "d" / again.unused[0].path).with_suffix(".txt").write_text("edited\n")
    read_manifest(out)
    assert capsys.readouterr().err == ""  # a spare image's caption is not compared (no run reads it)


def test_a_caption_file_removed_after_the_split_is_named_as_missing(tmp_path, capsys):
    """A caption file deleted since the split reads 'no caption file now', not Python's ``None``."""
    _dataset(tmp_path / "d", 10, decodable=True)
    out = tmp_path / "split.json"
    assert _make_split_script().main(["--dataset_dir", str(tmp_path / "d"), "--output", str(out), "--seed", "1",
                                      *SMALL]) == 0
    capsys.readouterr()
    member = read_manifest(out).member_aux[0]
    (tmp_path / "d" / member.path).with_suffix(".txt").unlink()
    read_manifest(out)
    err = capsys.readouterr().err
    assert f"{member.caption!r} in the manifest, no readable caption file now)" in err and "None" not in err


def test_a_metadata_caption_edited_after_the_split_is_named(tmp_path, capsys):
    root = tmp_path / "hf"
    _dataset(root, 8, decodable=True)
    for caption in root.glob("*.txt"):
        caption.unlink()
    rows = [{"file_name": f"{i:04d}.png", "text": f"caption {i}"} for i in range(8)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "split.json"
    assert _make_split_script().main(["--dataset_dir", str(root), "--output", str(out), "--seed", "1", *SMALL]) == 0
    assert read_manifest(out).caption_source == {"metadata_file": "metadata.jsonl", "caption_column": "text"}
    capsys.readouterr()
    rows[0]["text"], rows[1]["text"] = "caption zero", "caption one"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read_manifest(out)
    assert "2 caption(s) differ from" in capsys.readouterr().err


def test_user_errors_are_user_errors():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)


def test_a_corrupt_image_fails_the_split_not_the_training(tmp_path):
    """make_split decodes what a run will read: a truncated PNG is one DataError naming it, before any manifest."""
    from PIL import Image

    from library.data.dataset import scan_dataset
    from library.data.splits import check_images_decode, make_split
    from library.errors import DataError

    for i in range(8):
        Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"image {i}")
    whole = (tmp_path / "img3.png").read_bytes()
    (tmp_path / "img3.png").write_bytes(whole[: len(whole) // 2])
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    manifest = make_split(scan_dataset(tmp_path), sizes=sizes, seed=0, dataset_root=tmp_path)  # bytes only here
    with pytest.raises(DataError, match=r"cannot read image .*img3\.png"):
        check_images_decode(manifest)
    assert "img3.png" in [e.path for e in manifest.members() + manifest.nonmembers()]  # 8 images, all drawn
    # an image that decodes but that training cannot turn into 8-bit RGB fails here too (float values to 4095,
    # a TIFF under a .png name: PIL reads by content)
    import numpy as np

    Image.fromarray(np.arange(256, dtype=np.float32).reshape(16, 16) * 16, mode="F").save(tmp_path / "img3.png",
                                                                                           format="TIFF")
    manifest = make_split(scan_dataset(tmp_path), sizes=sizes, seed=0, dataset_root=tmp_path)
    with pytest.raises(DataError, match=r"img3\.png"):
        check_images_decode(manifest)


def test_a_base_domain_rule_that_matches_nothing_is_refused(tmp_path):
    records = _dataset(tmp_path / "d", 20)
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    with pytest.raises(DataError, match="base-domain rule matches no caption of the 20 images"):
        make_split(records, sizes=sizes, seed=0, dataset_root=tmp_path / "d",
                   base_domain=lambda record: "zzz" in record.caption)


def test_a_missing_spare_image_does_not_make_the_manifest_stale(tmp_path):
    """Only the images a run reads are verified: a spare (``unused``) one may go, and the base's pre-training
    images (hashed at every training and evaluation start, though neither reads them) matter to a pre-training
    only; a member may not."""
    records = _dataset(tmp_path / "d", 20)
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    split = make_split(records, sizes=sizes, seed=0, dataset_root=tmp_path / "d", pretrain=6)
    write_manifest(split, tmp_path / "s.json")
    (tmp_path / "d" / split.unused[0].path).unlink()
    (tmp_path / "d" / split.pretrain[0].path).write_bytes(b"changed")
    read_manifest(tmp_path / "s.json", verify=True)
    (tmp_path / "d" / split.member_test[0].path).unlink()
    with pytest.raises(DataError, match="is missing: the manifest is stale"):
        read_manifest(tmp_path / "s.json", verify=True)


def test_the_split_is_the_documented_permutation_of_the_sorted_paths(tmp_path):
    """Brute force of make_split's contract: numpy.random.default_rng(seed).permutation over the paths in sorted
    order, cut in order into member_aux, member_test, nonmember_aux, nonmember_test, pretrain; the leftovers sorted
    by path. A user re-creating a split (moved dataset, another machine) relies on exactly this."""
    records = _dataset(tmp_path / "d", 40)
    sizes = dict(member_aux=4, member_test=6, nonmember_aux=4, nonmember_test=5)
    split = make_split(list(reversed(records)), sizes=sizes, seed=7, pretrain=3)
    canonical = sorted(f"{i:04d}.png" for i in range(40))
    shuffled = [canonical[i] for i in np.random.default_rng(7).permutation(40)]
    expected, start = {}, 0
    for name, count in [*sizes.items(), ("pretrain", 3)]:
        expected[name] = shuffled[start:start + count]
        start += count
    expected["unused"] = sorted(shuffled[start:])
    assert {name: _paths(entries) for name, entries in split.splits().items()} == expected


def test_a_changed_pretrain_image_makes_the_manifest_stale(tmp_path):
    """The pretrain list is read when a base model pre-trains on it: a changed image there is stale as a member is
    (trainings and evaluations, which do not read it, do not hash it)."""
    records = _dataset(tmp_path / "d", 20)
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    split = make_split(records, sizes=sizes, seed=0, pretrain=3, dataset_root=tmp_path / "d")
    write_manifest(split, tmp_path / "s.json")
    (tmp_path / "d" / split.pretrain[0].path).write_bytes(b"edited")
    with pytest.raises(DataError, match=r"pretrain in .*stale"):
        pretrain_records(tmp_path / "s.json")


def test_every_repeat_count_survives_the_manifest(tmp_path):
    """kohya repeats other than 1 are written and read back (2 as well as 3: an image's weight in D_tr)."""
    entries = [SplitEntry(f"{r}.png", f"c{r}", f"{r:064d}", repeats=r) for r in (1, 2, 3)]
    m = SplitManifest(dataset_root=tmp_path, seed=0, member_aux=entries)
    write_manifest(m, tmp_path / "s.json")
    back = read_manifest(tmp_path / "s.json", verify=False)
    assert [e.repeats for e in back.member_aux] == [1, 2, 3]


def _one_entry_manifest(manifest: Path, **entry) -> Path:
    row = {"path": "a.png", "caption": "a", "sha256": "ab" * 32, **entry}
    manifest.write_text(json.dumps({"format": "smp-lora-split", "format_version": 1, "dataset_root": ".", "seed": 0,
                                    "splits": {"member_aux": [row]}}))
    return manifest


def test_manifest_entries_are_checked_as_read(tmp_path):
    """A hand-edited manifest: a path leaving the dataset root, a repeat count below 1 or an unknown set name is
    refused; an upper-case sha256 (as some tools print it) still matches the image's."""
    for entry, message in [({"path": "../outside.png"}, "relative to the dataset root"),
                           ({"repeats": 0}, "wrong type")]:
        with pytest.raises(DataError, match=message):
            read_manifest(_one_entry_manifest(tmp_path / "m.json", **entry), verify=False)
    (tmp_path / "a.png").write_bytes(b"image")
    digest = hashlib.sha256(b"image").hexdigest()
    m = read_manifest(_one_entry_manifest(tmp_path / "m.json", sha256=digest.upper()))  # verifies the hash
    assert m.member_aux[0].sha256 == digest
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["splits"]["members"] = []  # a typo for member_aux: its images would silently belong to no set
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"unknown split\(s\) \['members'\]"):
        read_manifest(tmp_path / "m.json", verify=False)


def test_split_sha256_covers_captions_and_repeats_not_the_root(tmp_path):
    """A LoRA records split_sha256: a caption or repeat count changed since makes it another split; a moved
    dataset (another root, same entries) does not. manifest_sha256 is the plain sha256 of the file's bytes."""
    entry = SplitEntry("a.png", "a cat", "0" * 64)
    base = split_sha256(SplitManifest(dataset_root=tmp_path, seed=0, member_aux=[entry]))
    assert base == split_sha256(SplitManifest(dataset_root=tmp_path / "moved", seed=0, member_aux=[entry]))
    for changed in (SplitEntry("a.png", "a dog", "0" * 64), SplitEntry("a.png", "a cat", "0" * 64, repeats=2)):
        assert split_sha256(SplitManifest(dataset_root=tmp_path, seed=0, member_aux=[changed])) != base
    write_manifest(SplitManifest(dataset_root=tmp_path, seed=0, member_aux=[entry]), tmp_path / "s.json")
    assert manifest_sha256(tmp_path / "s.json") == hashlib.sha256((tmp_path / "s.json").read_bytes()).hexdigest()


def test_pretrain_records_keep_their_repeats(tmp_path):
    """The pretrain list's kohya repeats weigh its images in a base's pre-training as in the dataset folder."""
    (tmp_path / "p.png").write_bytes(b"pre")
    entry = SplitEntry("p.png", "pre", hashlib.sha256(b"pre").hexdigest(), repeats=3)
    write_manifest(SplitManifest(dataset_root=tmp_path, seed=0, pretrain=[entry]), tmp_path / "s.json")
    [record] = pretrain_records(tmp_path / "s.json")
    assert record.repeats == 3 and record.caption == "pre" and record.path == tmp_path / "p.png"


@pytest.mark.parametrize("change", [{"sizes": dict(member_aux=True, member_test=1, nonmember_aux=1, nonmember_test=1)},
                                    {"seed": True}, {"pretrain": True}])
def test_a_boolean_size_seed_or_pretrain_count_is_refused(tmp_path, change):
    """A TOML ``true`` is not the number 1: taken as one, it would silently draw a split nobody asked for."""
    kwargs = {"sizes": dict(member_aux=1, member_test=1, nonmember_aux=1, nonmember_test=1), "seed": 0, **change}
    with pytest.raises(ConfigError, match="integer"):
        make_split(_dataset(tmp_path / "d", 8), **kwargs)


def test_a_set_of_size_zero_is_drawn_empty(tmp_path):
    """Zero is a size (an evaluation-only split without non-member test images), not a refusal."""
    split = make_split(_dataset(tmp_path / "d", 8), seed=0,
                       sizes=dict(member_aux=2, member_test=2, nonmember_aux=2, nonmember_test=0))
    assert split.nonmember_test == [] and len(split.unused) == 2


def test_an_empty_dataset_is_named_as_empty():
    """No records: one line saying so, not a traceback from the dataset-root search."""
    with pytest.raises(DataError, match="the dataset is empty"):
        make_split([], preset="celeba_small", seed=0)


def test_an_excluded_path_is_matched_however_it_is_spelt(tmp_path):
    """``exclude`` paths are compared as the manifest stores them: './0000.png' is the image 0000.png."""
    split = make_split(_dataset(tmp_path / "d", 10), seed=0, exclude={"./0000.png"},
                       sizes=dict(member_aux=1, member_test=1, nonmember_aux=1, nonmember_test=1))
    assert "0000.png" not in {p for entries in split.splits().values() for p in _paths(entries)}


def test_a_symlinked_image_leaves_the_dataset_folder_the_root(tmp_path):
    """An image linked in from elsewhere is listed by its name in the folder; the root is not moved up to a folder
    holding both (the manifest would name the link's target and every path would change)."""
    _dataset(tmp_path / "d", 4)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "real.png").write_bytes(b"linked image")
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "elsewhere" / "real.png")
    (tmp_path / "d" / "link.txt").write_text("linked\n")
    split = make_split(scan_dataset(tmp_path / "d"), seed=0,
                       sizes=dict(member_aux=1, member_test=1, nonmember_aux=1, nonmember_test=1))
    assert split.dataset_root == (tmp_path / "d").resolve()
    assert "link.png" in {p for entries in split.splits().values() for p in _paths(entries)}


def test_a_dataset_reached_through_a_link_keeps_its_linked_repeat_folders(tmp_path):
    """A dataset on a linked path (a mount) whose kohya folder links elsewhere: images listed under the folder's
    name, not refused as outside the dataset."""
    _dataset(tmp_path / "store" / "digits", 4)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "2_digits").symlink_to(tmp_path / "store" / "digits", target_is_directory=True)
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    split = make_split(scan_dataset(tmp_path / "alias"), seed=0, dataset_root=tmp_path / "alias",
                       sizes=dict(member_aux=1, member_test=1, nonmember_aux=1, nonmember_test=1))
    assert sorted(p for entries in split.splits().values() for p in _paths(entries)) == \
        [f"2_digits/{i:04d}.png" for i in range(4)]


def test_kohya_repeats_go_with_every_drawn_and_base_domain_image(tmp_path):
    """An image's repeats are its weight in D_tr (and in a base's pre-training): the split keeps them on every list."""
    _dataset(tmp_path / "d" / "3_digits", 12)
    records = scan_dataset(tmp_path / "d")  # the kohya folder read from its parent: 3 repeats each
    assert {r.repeats for r in records} == {3}
    sizes = dict(member_aux=2, member_test=2, nonmember_aux=2, nonmember_test=2)
    split = make_split(records, sizes=sizes, seed=0, dataset_root=tmp_path / "d",
                       base_domain=lambda r: r.caption == "caption 0")
    assert {e.repeats for entries in split.splits().values() for e in entries} == {3}
    assert _paths(split.pretrain) == ["3_digits/0000.png"] and len(split.unused) == 3


def test_the_help_shows_its_example_commands_on_their_own_lines():
    """The docstring's shell continuations stay in ``--help``: a plain string would join the lines with spaces."""
    text = _make_split_script().build_parser().format_help()
    assert "--output data/digits_split.json \\\n        --preset digits_demo" in text
