"""Issue 14, evaluation side: every bad input to ``evaluate_mia.py`` is one ``error:`` line before any long work,
nothing is lost or overwritten, and the evaluation encodes captions the way the LoRAs were trained.

Cases: corrupt / pickle LoRA files, unusable or busy output folders, the training conditioning read from the LoRA
metadata (ss_clip_skip / ss_max_token_length), a single-file base model without a tokenizer, pickle base weights
(refused unless --allow_pickle), file permissions of everything written, and seeds beyond 64 bits.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate_mia
from library.errors import ConfigError, ModelError
from library.eval.conditioning import resolve_conditioning
from library.eval.config import EvalConfig
from library.eval.features import FeatureSettings
from library.eval.records import ModelSpec
from library.outputs import OutputLock
from library.sd import single_file
from library.sd.loading import load_sd_model
from library.train.cli import train_entry
from networks.lora import (
    create_network,
    load_lora_state_dict,
    lora_file_sha256,
    read_lora_metadata,
)

UMASK = 0o027  # not the usual 022, so a file that ignores the umask shows


def eval_args(model, manifest, out: Path, *extra: str) -> list[str]:
    """The fastest evaluation of the tiny stack: one timestep, one noise draw, the loss attack only."""
    return ["--pretrained_model_name_or_path", str(model), "--split_manifest", str(manifest),
            "--output_dir", str(out), "--resolution", "32", "--timesteps", "5", "--num_noise_draws", "1",
            "--attacks", "loss", "--n_bootstrap", "0", "--no-plots", "--no-progress_bar", *extra]


def run_cli(capfd, argv) -> tuple[int, list[str]]:
    rc = evaluate_mia.main(argv)
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return rc, captured.err.strip().splitlines()


def one_error(capfd, argv) -> str:
    """Run a refused evaluation: exit 2, exactly one ``error:`` line, nothing else but ``warning:`` lines."""
    rc, lines = run_cli(capfd, argv)
    errors = [line for line in lines if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, lines
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), lines
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def lora_file(tiny_model_dir, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A rank-2 UNet LoRA of the tiny model (zero up-weights: the base model's features) with ``metadata``."""
    torch.manual_seed(0)
    network = create_network(1.0, 2, 2.0, None, None, load_sd_model(tiny_model_dir).unet)
    network.save_weights(path, metadata=metadata)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, manifest_path):
    """An SMP-LoRA run trained with clip_skip 2 under umask 027: the LoRA, its attacker file and the folder."""
    out = tmp_path_factory.mktemp("trained")
    args = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--split_manifest", str(manifest_path),
            "--resolution", "32", "--network_dim", "4", "--network_alpha", "4", "--train_batch_size", "4",
            "--max_train_steps", "2", "--learning_rate", "1e-3", "--save_precision", "float", "--output_dir", str(out),
            "--no-progress_bar", "--attacker_batch_size", "2", "--k_steps", "2", "--clip_skip", "2"]
    old = os.umask(UMASK)
    try:
        assert train_entry("smp_lora", "train", args) == 0
    finally:
        os.umask(old)
    return out


# ----------------------------------------------------------------------------------------- 1. LoRA files


BAD_LORAS = {
    "huge_header.safetensors": (2**63 + 12345).to_bytes(8, "little") + os.urandom(200),
    "random.safetensors": os.urandom(64),
    "short.safetensors": b"\x01\x02",
    "not_json.safetensors": (16).to_bytes(8, "little") + b"\xff" * 16 + b"data",
    "a_list.safetensors": (8).to_bytes(8, "little") + b"[1,2,3] " + b"data",
    "lora.ckpt": b"\x80\x04\x95pickle",
    "lora.pt": b"PK\x03\x04zip-pickle",
}


@pytest.mark.parametrize("name", sorted(BAD_LORAS))
def test_bad_lora_file_is_one_line_before_any_model_loads(name, tiny_model_dir, manifest_path, tmp_path, capfd,
                                                          monkeypatch):
    bad = tmp_path / name
    bad.write_bytes(BAD_LORAS[name])
    monkeypatch.setattr("library.eval.run.load_bundle", lambda *a: pytest.fail("the base model was loaded"))
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", "--network_weights", str(bad)))
    assert str(bad) in err
    if bad.suffix == ".safetensors":
        assert "not a valid .safetensors file" in err
    else:
        assert "only safetensors LoRA files are read" in err and "save_file" in err
    assert bad.read_bytes() == BAD_LORAS[name]
    for reader in (lora_file_sha256, read_lora_metadata, load_lora_state_dict):  # every reader checks first
        with pytest.raises(ModelError, match=name.replace(".", r"\.")):
            reader(bad)


def test_a_refused_evaluation_leaves_no_output_folder(tiny_model_dir, manifest_path, tmp_path, capfd):
    """--output_dir and --cache_dir were created before the manifest and the LoRA files were read."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(BAD_LORAS["random.safetensors"])
    out, cache = tmp_path / "out" / "eval", tmp_path / "cache"
    for manifest, extra in ((tmp_path / "missing.json", ()), (manifest_path, ("--network_weights", str(bad)))):
        err = one_error(capfd, eval_args(tiny_model_dir, manifest, out, "--cache_dir", str(cache), *extra))
        assert ("missing.json" in err or "bad.safetensors" in err) and not out.parent.exists() and not cache.exists()


def test_the_proxy_attacker_file_is_named_as_such(trained, tiny_model_dir, manifest_path, tmp_path, capfd,
                                                 monkeypatch):
    """``--network_weights run/*.safetensors`` picks up the run's attacker file too: the error says what it is (its
    metadata alone would read as a LoRA trained without a split manifest), to evaluate_mia and to training."""
    monkeypatch.setattr("library.eval.run.load_bundle", lambda *a: pytest.fail("the base model was loaded"))
    attacker = trained / "smp_lora-attacker.safetensors"
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", "--network_weights",
                                     str(trained / "smp_lora.safetensors"), str(attacker)))
    assert f"LoRA file {attacker} holds no LoRA tensors" in err and "proxy attacker" in err
    assert "whole folder" not in err
    with pytest.raises(ModelError, match="proxy attacker"):
        create_network(1.0, 2, 2.0, None, None, load_sd_model(tiny_model_dir).unet).load_weights(attacker)


def test_a_safetensors_file_that_is_no_lora_is_refused_by_the_dry_run(tiny_model_dir, manifest_path, tmp_path, capfd,
                                                                       monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr("library.eval.run.load_bundle", lambda *a: pytest.fail("the base model was loaded"))
    other = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(other))
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", "--network_weights", str(other),
                                     "--dry_run"))
    assert f"LoRA file {other}: unexpected key 'a' is not a kohya LoRA tensor" in err


def test_a_lora_with_nan_weights_is_one_line_naming_the_file(trained, tiny_model_dir, manifest_path, tmp_path, capfd):
    """A diverged run's LoRA: named at load, not as NaN noise predictions of a model (with advice that does not fit)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(trained / "smp_lora.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    diverged = tmp_path / "diverged.safetensors"
    save_file(tensors, str(diverged), metadata=read_lora_metadata(trained / "smp_lora.safetensors"))
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", "--network_weights",
                                     str(diverged)))
    assert f"LoRA file {diverged} holds NaN/inf values (first in '{key}')" in err and "earlier checkpoint" in err


# ----------------------------------------------------------------------------------------- 2. output folder


def test_output_dir_that_is_a_file_or_under_one_is_refused_first(tiny_model_dir, manifest_path, tmp_path, capfd,
                                                                  monkeypatch):
    monkeypatch.setattr("library.eval.run.load_samples", lambda *a: pytest.fail("the manifest was read"))
    taken = tmp_path / "report.txt"
    taken.write_text("keep me")
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, taken))
    assert "--output_dir" in err and "is a file" in err
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, taken / "sub"))
    assert "--output_dir" in err and "lies under the file" in err
    assert taken.read_text() == "keep me"


def test_unwritable_output_dir_is_refused(tiny_model_dir, manifest_path, read_only_folder, capfd):
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, read_only_folder / "out"))
    assert "--output_dir" in err and "permission denied" in err and not (read_only_folder / "out").exists()


def test_busy_output_dir_is_refused_and_left_alone(tiny_model_dir, manifest_path, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{\"from\": \"the other run\"}")
    with OutputLock(out):  # another evaluation writing into the same folder
        before = snapshot(out)
        err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out))
    assert "in use by another run" in err
    assert snapshot(out) == before


def test_finished_evaluation_is_kept_unless_overwrite(tiny_model_dir, manifest_path, tmp_path, capfd):
    """A second evaluation into a finished one's folder is refused and changes nothing; --overwrite replaces the
    report; an interrupted evaluation's folder (files, no report.json) needs no flag."""
    out = tmp_path / "out"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out)) == 0
    first = json.loads((out / "report.json").read_text())
    before = snapshot(out)
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--timesteps", "7"))
    assert f"--output_dir {out} already holds a finished evaluation (report.json)" in err
    assert "--overwrite" in err and f"--cache_dir {out / 'cache'}" in err
    assert snapshot(out) == before
    (out / "samples_gone.png").write_bytes(b"a grid of the replaced run's --quality")
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--timesteps", "7", "--overwrite")) == 0
    assert not (out / "samples_gone.png").exists()  # this report has no samples: none may sit beside it
    second = json.loads((out / "report.json").read_text())
    assert first["config"]["timesteps"] == [5] and second["config"]["timesteps"] == [7]
    (out / "report.json").unlink()  # as a run killed before its report
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out)) == 0
    assert json.loads((out / "report.json").read_text())["config"]["timesteps"] == [5]


def test_dry_run_checks_everything_but_loads_no_weights_and_writes_nothing(trained, tiny_model_dir, manifest_path,
                                                                            digits_dir, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("library.eval.run.load_bundle", lambda *a: pytest.fail("the base model was loaded"))
    out = tmp_path / "new" / "out"
    lora = trained / "smp_lora.safetensors"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora),
                                       "--dry_run")) == 0
    printed = capfd.readouterr().out
    assert "dry run: 2 model(s) (base, smp_lora), attacks loss, fitted on" in printed and "nothing computed" in printed
    assert not (tmp_path / "new").exists()
    # What a real run would refuse, the dry run refuses: a LoRA of another split, a finished report.
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--network_weights",
                                     str(trained / "smp_lora-attacker.safetensors"), "--dry_run"))
    assert "proxy attacker" in err
    from library.eval.small_cnn import SmallCNN, save_small_cnn

    digits = tmp_path / "digits.safetensors"
    save_small_cnn(SmallCNN(), digits)
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora), "--quality",
                                     "--digit_feature_weights", str(digits), "--utility_reference", "smp-lora",
                                     "--dry_run"))  # a real run failed only at the end
    assert "'utility_reference' 'smp-lora' is not an evaluated model" in err
    # U needs a classifier: without one an explicit reference was ignored in silence
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora), "--quality",
                                     "--utility_reference", "smp_lora", "--dry_run"))
    assert "needs a classifier among the quality features: give --digit_feature_weights (digits)" in err
    # What an attack needs of its own: checked by the dry run (the real run refused it after every feature)
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--attacks", "loss", "blackbox",
                                     "--digit_feature_weights", str(tmp_path / "missing.safetensors"), "--dry_run"))
    assert "missing.safetensors" in err and "does not exist" in err
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--clip_skip", "3", "--dry_run"))
    assert "clip_skip must be between 1 and 2 for this text encoder, got 3" in err  # the tiny CLIP: 2 layers
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--attacks", "reconstruction",
                                     "--reconstruction_strength", "0.0005", "--dry_run"))
    assert ("leaves no step of the 20-step DDIM schedule (img2img runs int(steps x strength) of them); use a "
            "strength of at least 0.05") in err
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split

    small = tmp_path / "one_aux_member.json"
    sizes = {"member_aux": 1, "member_test": 4, "nonmember_aux": 1, "nonmember_test": 4}
    write_manifest(make_split(scan_dataset(digits_dir), sizes=sizes, seed=0, dataset_root=digits_dir), small)
    err = one_error(capfd, eval_args(tiny_model_dir, small, out, "--attacks", "loss", "paper", "--dry_run"))
    assert "holdout_fraction 0.2: D_aux has only 1 members, too few to hold any out" in err
    out.mkdir(parents=True)
    (out / "report.json").write_text("{}")
    assert "already holds a finished evaluation" in one_error(capfd, eval_args(tiny_model_dir, manifest_path, out,
                                                                                "--dry_run"))
    assert os.listdir(out) == ["report.json"]


def test_dry_run_counts_d_aux_and_d_te_by_split_not_by_label(tiny_model_dir, digits_dir, tmp_path, capfd):
    """The plan line's D_aux / D_te counts are what attacks fit on and are scored on (members are not D_te)."""
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split

    manifest = tmp_path / "unbalanced.json"
    sizes = {"member_aux": 2, "member_test": 4, "nonmember_aux": 2, "nonmember_test": 3}
    write_manifest(make_split(scan_dataset(digits_dir), sizes=sizes, seed=0, dataset_root=digits_dir), manifest)
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest, tmp_path / "out", "--dry_run")) == 0
    assert "fitted on 4 D_aux and scored on 7 D_te images at 32 px" in capfd.readouterr().out


def test_a_finished_evaluation_is_refused_with_a_cache_hint_only_where_its_cache_is(tmp_path):
    """The refusal suggests --cache_dir <out>/cache only where that cache exists (not --no_cache, not --cache_dir);
    --overwrite lets the run replace the report."""
    from library.eval.run import check_earlier_report

    (tmp_path / "report.json").write_text("{}")
    base = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s.json", output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="pass --overwrite") as refused:
        check_earlier_report(base, tmp_path)
    assert f"with --cache_dir {tmp_path / 'cache'} to reuse its features" in str(refused.value)
    for elsewhere in ({"no_cache": True}, {"cache_dir": str(tmp_path / "shared")}):
        with pytest.raises(ConfigError) as refused:
            check_earlier_report(replace(base, **elsewhere), tmp_path)
        assert "--cache_dir" not in str(refused.value), elsewhere
    check_earlier_report(replace(base, overwrite=True), tmp_path)  # no refusal


def test_no_cache_writes_no_cache_and_the_default_cache_lies_in_the_output_folder(tiny_model_dir, manifest_path,
                                                                                  tmp_path):
    """--no_cache leaves no feature or latent files anywhere (not even a --cache_dir given with it); without it the
    cache is <output_dir>/cache, the folder the finished-report refusal tells the user to reuse."""
    cache = tmp_path / "cache"
    out = tmp_path / "uncached"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--no_cache", "--cache_dir", str(cache))) == 0
    assert not cache.exists() and not (out / "cache").exists()
    assert not any(entry["hit"] for entry in json.loads((out / "report.json").read_text())["features"]["cache"].values())
    out = tmp_path / "cached"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out)) == 0
    assert (out / "cache" / "features").is_dir() and any((out / "cache" / "latents").iterdir())


def test_overwrite_keeps_the_old_report_when_the_new_run_fails(tiny_model_dir, manifest_path, tmp_path, capfd):
    out = tmp_path / "out"
    (out / "cache").mkdir(parents=True)
    (out / "report.json").write_text("{\"from\": \"the earlier run\"}")
    missing = tmp_path / "missing.safetensors"
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, out, "--overwrite",
                                     "--network_weights", str(missing)))
    assert str(missing) in err
    assert (out / "report.json").read_text() == "{\"from\": \"the earlier run\"}"


def test_each_sample_is_read_with_its_own_split_label_path_and_caption(digits_dir, tmp_path):
    """load_samples keeps each manifest entry's split, member label, relative path (subfolder included: scores.csv's
    file column) and caption together (a caption or label taken from elsewhere would be evaluated without error)."""
    from library.data.dataset import scan_dataset
    from library.data.manifest import read_manifest, write_manifest
    from library.data.splits import make_split
    from library.eval.inputs import load_samples

    shutil.copytree(digits_dir, tmp_path / "data" / "1_digits")  # a kohya folder: paths carry the subfolder
    sizes = {"member_aux": 12, "member_test": 12, "nonmember_aux": 12, "nonmember_test": 12}
    manifest_path = tmp_path / "split.json"
    write_manifest(make_split(scan_dataset(tmp_path / "data"), sizes=sizes, seed=0, dataset_root=tmp_path / "data"),
                   manifest_path)
    manifest, samples, _ = load_samples(EvalConfig(split_manifest=str(manifest_path)))
    entries = [(name, entry) for name in ("member_aux", "nonmember_aux", "member_test", "nonmember_test")
               for entry in getattr(read_manifest(manifest_path), name)]
    assert samples.splits == [name for name, _ in entries]
    assert samples.labels.tolist() == [int(name.startswith("member_")) for name, _ in entries]
    assert samples.rel_paths == [entry.path for _, entry in entries] and "/" in samples.rel_paths[0]
    assert [s.caption for s in samples.samples] == [entry.caption for _, entry in entries]
    assert len({entry.caption for _, entry in entries}) > 1 and len(samples.aux_index) == 24


def test_the_split_identity_holds_the_manifest_bytes_hash_then_the_splits_hash(manifest_path):
    """Each LoRA's recorded hashes are compared field by field with this identity: swapped, every LoRA is refused."""
    from library.data.manifest import manifest_sha256, split_sha256
    from library.eval.inputs import load_samples

    manifest, _, identity = load_samples(EvalConfig(split_manifest=str(manifest_path)))
    assert identity.manifest_sha256 == manifest_sha256(manifest_path) != identity.split_sha256
    assert identity.split_sha256 == split_sha256(manifest)


def test_a_pickle_unet_is_refused_unless_the_evaluation_allows_pickle(tmp_path):
    """Unpickling runs the file's code: only --allow_pickle may let a .ckpt UNet be read."""
    from library.eval.inputs import SplitIdentity, model_specs

    ckpt = tmp_path / "ft.ckpt"
    ckpt.write_bytes(b"pickle")
    split = SplitIdentity("m" * 64, "s" * 64)
    with pytest.raises(ModelError, match="--allow_pickle"):
        model_specs(EvalConfig(unet_weights=[str(ckpt)], allow_manifest_mismatch=True), split)
    config = EvalConfig(unet_weights=[str(ckpt)], allow_manifest_mismatch=True, allow_pickle=True)
    assert [spec.name for spec in model_specs(config, split)] == ["base", "ft"]


def test_report_names_keep_dashes_and_number_every_repeat():
    """Each model's report row, scores.csv column and cache files go by its name: two models must never share one,
    and a file's own name (``lora-step00002``) should stay recognisable."""
    from library.eval.inputs import _unique_name

    used = {"base"}
    names = [_unique_name(stem, used) for stem in ("lora-step00002", "run", "run", "run", "base", "my lora!")]
    assert names == ["lora-step00002", "run", "run-2", "run-3", "base-2", "my_lora_"]
    assert used == {"base", *names}


def test_diffusers_loras_with_one_header_and_other_tensors_are_other_models(tmp_path):
    """The header's alphas are mixed into a diffusers LoRA's identity, its tensors must stay in it: two fine-tunes
    exported with the same lora_alpha would otherwise share one feature cache entry (and one set of numbers)."""
    from library.eval.inputs import SplitIdentity, model_specs

    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 2})}
    files = []
    for value in (1.0, 2.0):
        path = tmp_path / f"v{value:g}" / "pytorch_lora_weights.safetensors"
        path.parent.mkdir()
        save_file({"unet.conv_in.lora_A.weight": torch.full((2, 4), value),
                   "unet.conv_in.lora_B.weight": torch.full((4, 2), value)}, str(path), metadata=meta)
        files.append(str(path))
    config = EvalConfig(network_weights=files, allow_manifest_mismatch=True)
    first, second = model_specs(config, SplitIdentity("m" * 64, "s" * 64))[1:]
    assert first.sha256 != second.sha256
    assert first.sha256 != lora_file_sha256(files[0])  # the header's alphas count too


def test_a_lora_is_matched_to_the_split_by_its_splits_content_before_its_manifest_bytes():
    """A moved dataset's manifest is re-written (other bytes, same splits): its LoRAs must still be accepted, and a
    LoRA of other splits refused even when the manifest bytes it recorded happen to match."""
    from library.errors import DataError
    from library.eval.inputs import SplitIdentity, _recorded

    config, split = EvalConfig(split_manifest="split.json"), SplitIdentity("m" * 64, "s" * 64)
    moved = {"smp_lora.method": "lora", "smp_lora.split_sha256": "s" * 64, "smp_lora.manifest_sha256": "o" * 64}
    assert _recorded(config, split, "LoRA moved", moved)["smp_lora.split_sha256"] == "s" * 64
    other = {**moved, "smp_lora.split_sha256": "x" * 64, "smp_lora.manifest_sha256": "m" * 64}
    with pytest.raises(DataError, match=r"LoRA other was trained with another split manifest \(split_sha256 xxxx"):
        _recorded(config, split, "LoRA other", other)
    older = {"smp_lora.method": "lora", "smp_lora.manifest_sha256": "m" * 64}  # before split_sha256 was recorded
    assert _recorded(config, split, "LoRA older", older) == older


def test_only_training_metadata_and_conditioning_reach_the_report():
    """The report and conditioning read what training recorded; a single file's embedded configs and tokenizer
    (large, not training settings) and unrelated keys stay out."""
    from library.eval.inputs import SplitIdentity, _recorded

    kept = {"smp_lora.method": "lora", "smp_lora.split_sha256": "s" * 64, "ss_network_dim": "4",
            "ss_base_model_version": "sd_v1", "ss_clip_skip": "2", "ss_max_token_length": "225",
            "ss_resolution": "(32, 32)"}
    dropped = {"smp_lora.sd_configs": "{}", "smp_lora.tokenizer": "{}", "smp_lora.format": "single",
               "ss_output_name": "x", "format": "pt"}
    config = EvalConfig(split_manifest="split.json")
    assert _recorded(config, SplitIdentity("m" * 64, "s" * 64), "LoRA x", {**kept, **dropped}) == kept


# ----------------------------------------------------------------------------------------- 3. conditioning


def _spec(name: str, **meta: str) -> ModelSpec:
    return ModelSpec(name, Path(f"{name}.safetensors"), "0" * 64, dict(meta))


def test_default_conditioning_is_todays(capsys):
    """The base alone, and a LoRA trained with the defaults (the demo's), are evaluated exactly as before:
    FeatureSettings' defaults, so the same features, cache keys and numbers."""
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s")
    demo = _spec("demo", ss_clip_skip="1", ss_max_token_length="None",  # what a default training run records
                 ss_resolution="(512, 512)")
    for specs in ([ModelSpec("base")], [ModelSpec("base"), demo]):
        got = resolve_conditioning(config, specs)
        assert (got.clip_skip, got.max_token_length, got.resolution) == (
            FeatureSettings.clip_skip, FeatureSettings.max_token_length, FeatureSettings.resolution)
    assert capsys.readouterr().err == ""


def test_the_base_alone_is_evaluated_at_its_own_image_size(tiny_model_dir, manifest_path, tmp_path, capfd):
    """Nothing records a resolution: the base model's configs say it (sample_size x the VAE's downscale: 32 px for
    the tiny stack, 512 for SD v1.5), in either saved form, instead of 512 px for every model."""
    from library.sd.loading import load_sd_model, native_resolution
    from library.sd.single_file import save_single_file

    single = tmp_path / "tiny.safetensors"
    save_single_file(load_sd_model(tiny_model_dir), single)
    assert native_resolution(tiny_model_dir) == native_resolution(single) == 32
    assert native_resolution(tmp_path / "missing") is None
    for model in (tiny_model_dir, single):
        argv = eval_args(model, manifest_path, tmp_path / "out", "--dry_run")
        del argv[argv.index("--resolution"):argv.index("--resolution") + 2]
        assert evaluate_mia.main(argv) == 0
        assert "at 32 px" in capfd.readouterr().out
    got = resolve_conditioning(EvalConfig(), [ModelSpec("base"), _spec("a", ss_resolution="(64, 64)")], 32)
    assert (got.resolution, got.source["resolution"]) == (64, "LoRA metadata")  # a LoRA's record still wins


def test_conditioning_rules(capsys):
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s")
    paper = _spec("paper", ss_clip_skip="2", ss_max_token_length="225", ss_resolution="(512, 512)")
    got = resolve_conditioning(config, [ModelSpec("base"), paper])
    assert (got.clip_skip, got.max_token_length) == (2, 225)
    assert got.as_dict() == {"clip_skip": 2, "max_token_length": 225, "resolution": 512,
                             "source": {"clip_skip": "LoRA metadata", "max_token_length": "LoRA metadata",
                                        "resolution": "LoRA metadata"}}
    # kohya's "None" and an explicit 75 are the same window: no contradiction
    kohya_default = _spec("a", ss_clip_skip="1", ss_max_token_length="None", ss_resolution="(512, 512)")
    same = resolve_conditioning(EvalConfig(max_token_length=75), [kohya_default])
    assert same.max_token_length == 75
    # a contradicting flag is refused, unless forced
    with pytest.raises(ConfigError, match=r"--clip_skip 1 contradicts LoRA 'paper'.*allow_conditioning_mismatch"):
        resolve_conditioning(EvalConfig(clip_skip=1), [paper])
    forced = resolve_conditioning(EvalConfig(clip_skip=1, allow_conditioning_mismatch=True), [paper])
    assert (forced.clip_skip, forced.max_token_length) == (1, 225)
    # LoRAs trained differently are never mixed silently
    with pytest.raises(ConfigError, match="evaluate them separately"):
        resolve_conditioning(config, [paper, _spec("plain", ss_clip_skip="1", ss_max_token_length="225",
                                                   ss_resolution="(512, 512)")])
    with pytest.raises(ModelError, match=r"lora file odd.safetensors: metadata ss_clip_skip='two'"):
        resolve_conditioning(config, [_spec("odd", ss_clip_skip="two")])
    from library.eval.unet_weights import UNetWeights

    # A fine-tuned UNet is named as such, not "LoRA file None".
    unet = ModelSpec("ft", metadata={"ss_clip_skip": "two"}, unet=UNetWeights(Path("ft.safetensors"), "single_file",
                                                                              (Path("ft.safetensors"),), "0" * 64))
    with pytest.raises(ModelError, match=r"unet file ft.safetensors: metadata ss_clip_skip='two'"):
        resolve_conditioning(config, [unet])
    assert capsys.readouterr().err == ""
    # a file without the keys: the defaults, with one warning line
    old = resolve_conditioning(config, [_spec("old")])
    assert (old.clip_skip, old.max_token_length, old.resolution) == (1, None, 512)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "old.safetensors" in warning[0]


def test_kohyas_default_window_is_reported_as_75_tokens():
    """A LoRA recording kohya's "None" window is evaluated with it, and report.json says 75 tokens (never null)."""
    demo = _spec("demo", ss_clip_skip="1", ss_max_token_length="None", ss_resolution="(512, 512)")
    got = resolve_conditioning(EvalConfig(pretrained_model_name_or_path="m", split_manifest="s"), [demo])
    assert got.max_token_length is None
    assert got.as_dict()["max_token_length"] == 75


def test_the_evaluation_sees_images_at_the_size_the_lora_learnt_them(capsys):
    """A LoRA trained at 768 px is evaluated at 768 px without a flag (not at SD's 512); a contradicting flag is
    refused unless forced; a non-square training size counts as unrecorded (the evaluation crops squares)."""
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s")
    big = _spec("big", ss_clip_skip="1", ss_max_token_length="None", ss_resolution="(768, 768)")
    got = resolve_conditioning(config, [ModelSpec("base"), big])
    assert got.resolution == 768 and got.source["resolution"] == "LoRA metadata"
    with pytest.raises(ConfigError, match=r"--resolution 512 contradicts LoRA 'big', trained with 768 px images"):
        resolve_conditioning(EvalConfig(resolution=512), [big])
    assert resolve_conditioning(EvalConfig(resolution=512, allow_conditioning_mismatch=True), [big]).resolution == 512
    with pytest.raises(ConfigError, match="evaluate them separately"):
        resolve_conditioning(config, [big, _spec("small", ss_clip_skip="1", ss_max_token_length="None",
                                                 ss_resolution="(512, 512)")])
    assert capsys.readouterr().err == ""
    wide = _spec("wide", ss_clip_skip="1", ss_max_token_length="None", ss_resolution="(768, 512)")
    assert resolve_conditioning(config, [wide]).resolution == 512
    assert "record no ss_resolution" in capsys.readouterr().err
    assert resolve_conditioning(EvalConfig(resolution=640), [wide]).resolution == 640
    for raw, side in (("(512.0, 512.0)", 512), ("768", 768), ("(0, 0)", None), ("(500, 500)", None)):
        got = resolve_conditioning(config, [_spec("x", ss_clip_skip="1", ss_max_token_length="None", ss_resolution=raw)])
        assert got.resolution == (side or 512) and (got.source["resolution"] == "LoRA metadata") == bool(side), raw
    capsys.readouterr()


def _trained_as(name: str, **meta: str) -> ModelSpec:
    """A LoRA file recording a default training's conditioning, ``meta`` overriding some of it."""
    return _spec(name, **{"ss_clip_skip": "1", "ss_max_token_length": "None", "ss_resolution": "(512, 512)", **meta})


def test_a_lora_trained_at_any_multiple_of_8_is_evaluated_at_its_size():
    """520 px (65 latents) is a size the evaluation crops: a LoRA recording it is evaluated at 520, not at 512."""
    got = resolve_conditioning(EvalConfig(), [_trained_as("odd", ss_resolution="(520, 520)")])
    assert (got.resolution, got.source["resolution"]) == (520, "LoRA metadata")


def test_a_recorded_clip_skip_of_zero_is_refused():
    """clip_skip 0 names no CLIP layer: the file's metadata is broken, one ModelError naming the key."""
    with pytest.raises(ModelError, match=r"metadata ss_clip_skip='0' is neither a positive integer"):
        resolve_conditioning(EvalConfig(), [_trained_as("zero", ss_clip_skip="0")])


def test_kohyas_none_clip_skip_is_the_last_layer():
    """ss_clip_skip "None" is kohya's default, the last layer: clip_skip 1, never None."""
    got = resolve_conditioning(EvalConfig(), [_trained_as("kohya", ss_clip_skip="None")])
    assert got.clip_skip == 1 and got.as_dict()["clip_skip"] == 1


def test_a_contradicting_flag_names_the_first_lora_and_its_recorded_clip_skip():
    """The refusal says which LoRA (the first that clashes) and how it was trained, in the setting's own words."""
    with pytest.raises(ConfigError, match=r"contradicts LoRA 'a', trained with clip_skip 2 \(its ss_clip_skip\)"):
        resolve_conditioning(EvalConfig(clip_skip=1), [_trained_as("a", ss_clip_skip="2"),
                                                       _trained_as("b", ss_clip_skip="2")])


def test_kohyas_none_window_and_an_explicit_75_are_one_conditioning():
    """LoRAs recording "None" and "75" used the same caption window: they are evaluated together, not refused."""
    got = resolve_conditioning(EvalConfig(), [_trained_as("a"), _trained_as("b", ss_max_token_length="75")])
    assert got.as_dict()["max_token_length"] == 75 and got.source["max_token_length"] == "LoRA metadata"


def test_a_foreign_unet_that_records_nothing_gets_no_warning(capsys):
    """A fine-tuned UNet from elsewhere records no training: the defaults, without a warning about its metadata."""
    from library.eval.unet_weights import UNetWeights

    unet = ModelSpec("ft", unet=UNetWeights(Path("ft"), "diffusers", (Path("ft"),), "0" * 64))
    got = resolve_conditioning(EvalConfig(), [ModelSpec("base"), unet])
    assert (got.clip_skip, got.max_token_length, got.resolution) == (1, None, 512)
    assert capsys.readouterr().err == ""


def test_flags_for_what_a_file_does_not_record_are_used_without_a_warning(capsys):
    """--clip_skip / --max_token_length / --resolution say how an old file was trained: used, sourced "flag", silent."""
    got = resolve_conditioning(EvalConfig(clip_skip=2, max_token_length=225, resolution=256), [_spec("old")])
    assert (got.clip_skip, got.max_token_length, got.resolution) == (2, 225, 256)
    assert got.source == {"clip_skip": "flag", "max_token_length": "flag", "resolution": "flag"}
    assert capsys.readouterr().err == ""


def test_a_file_missing_only_its_clip_skip_is_warned_about_that_key_alone(capsys):
    """The warning names the unrecorded key, the value assumed and its flag, and no non-square ss_resolution."""
    resolve_conditioning(EvalConfig(), [_spec("partial", ss_max_token_length="None", ss_resolution="(512, 512)")])
    err = capsys.readouterr().err
    assert "record no ss_clip_skip (older or foreign files); evaluating with clip_skip 1 — pass --clip_skip if" in err


def test_evaluation_conditions_as_trained(trained, tiny_model_dir, manifest_path, tmp_path, capfd):
    """A LoRA trained with --clip_skip 2 is evaluated with clip_skip 2 without any flag, and the report says so."""
    lora = trained / "smp_lora.safetensors"
    assert read_lora_metadata(lora)["ss_clip_skip"] == "2"
    out = tmp_path / "eval"
    args = eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora))
    args.remove("--resolution"), args.remove("32")  # the LoRA's 32 px comes from its metadata
    rc, lines = run_cli(capfd, args)
    assert rc == 0, lines
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["clip_skip"] == 2 and report["features"]["settings"]["clip_skip"] == 2
    assert report["config"]["resolution"] == 32 and report["conditioning"]["source"]["resolution"] == "LoRA metadata"
    assert report["conditioning"]["clip_skip"] == 2
    assert report["conditioning"]["source"]["clip_skip"] == "LoRA metadata"
    assert "clip_skip 2" in (out / "report.md").read_text()
    # the training helper adds ss_max_token_length; until a file has it, the default comes with a warning
    has_tokens = "ss_max_token_length" in read_lora_metadata(lora)
    assert any(line.startswith("warning: ") for line in lines) != has_tokens, lines


def test_a_loras_max_token_length_is_what_its_features_are_computed_with(tiny_model_dir, manifest_path, tmp_path):
    """A LoRA trained on 225-token captions is evaluated on 225-token captions, not the flag's default of 75."""
    lora = lora_file(tiny_model_dir, tmp_path / "long.safetensors", {"ss_clip_skip": "1", "ss_max_token_length": "225"})
    out = tmp_path / "eval"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora))) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["max_token_length"] == 225 and report["features"]["settings"]["max_token_length"] == 225
    assert report["conditioning"]["source"]["max_token_length"] == "LoRA metadata"


def test_the_report_lists_the_sizes_of_the_evaluated_splits_only(tiny_model_dir, manifest_path, tmp_path):
    """The manifest's other lists (not attacked, not scored) would read as part of the evaluation."""
    out = tmp_path / "eval"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out)) == 0
    sizes = json.loads((out / "report.json").read_text())["manifest"]["sizes"]
    assert sizes == {"member_aux": 12, "nonmember_aux": 12, "member_test": 12, "nonmember_test": 12}


def test_network_multiplier_scales_the_loras_features_and_leaves_the_bases_alone(tiny_model_dir, manifest_path,
                                                                                  tmp_path):
    """--network_multiplier changes the LoRA's features (their cache key) but not the base's, which stay cached."""
    lora = lora_file(tiny_model_dir, tmp_path / "lora.safetensors", {"ss_clip_skip": "1", "ss_max_token_length": "None"})
    reports = {}
    for multiplier in ("1", "0.5"):
        out = tmp_path / multiplier
        assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(lora),
                                           "--network_multiplier", multiplier)) == 0
        reports[multiplier] = json.loads((out / "report.json").read_text())["features"]
    assert reports["0.5"]["settings"]["multiplier"] == 0.5
    keys = {m: {name: entry["key"] for name, entry in r["cache"].items()} for m, r in reports.items()}
    assert keys["0.5"]["base"] == keys["1"]["base"] and keys["0.5"]["lora"] != keys["1"]["lora"]


def test_no_paper_queries_are_made_without_the_paper_attack(tiny_model_dir, manifest_path, tmp_path):
    """The paper's h' features are extra model queries per sample: an evaluation without its attack pays none."""
    out = tmp_path / "eval"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out)) == 0  # --attacks loss
    assert json.loads((out / "report.json").read_text())["features"]["settings"]["paper_features"] is None


def test_the_privacy_audit_runs_at_the_alpha_and_delta_asked_for(tiny_model_dir, manifest_path, tmp_path):
    """--audit_alpha is the set audit's significance and --epsilon_delta the epsilon bounds' delta, never swapped."""
    out = tmp_path / "eval"
    assert evaluate_mia.main(eval_args(tiny_model_dir, manifest_path, out, "--audit_alpha", "0.2",
                                       "--epsilon_delta", "0.001")) == 0
    audit = json.loads((out / "report.json").read_text())["privacy_audit"]["base"]
    assert audit["set_audit"]["alpha"] == 0.2 and audit["epsilon_lb"]["delta"] == 0.001


def test_contradicting_flag_and_mixed_loras_are_one_line(tiny_model_dir, manifest_path, tmp_path, capfd):
    paper = lora_file(tiny_model_dir, tmp_path / "paper.safetensors",
                      {"ss_clip_skip": "2", "ss_max_token_length": "225"})
    plain = lora_file(tiny_model_dir, tmp_path / "plain.safetensors",
                      {"ss_clip_skip": "1", "ss_max_token_length": "None"})
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "a", "--network_weights", str(paper),
                                     "--clip_skip", "1"))
    assert "--clip_skip 1 contradicts LoRA 'paper'" in err
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "b", "--network_weights", str(paper),
                                     str(plain)))
    assert "'paper'" in err and "'plain'" in err and "evaluate them separately" in err


# ----------------------------------------------------------------------------------------- 4. single file, no tokenizer


def test_single_file_without_tokenizer_fails_before_reading_tensors(tiny_model_dir, manifest_path, tmp_path, capfd,
                                                                     monkeypatch):
    bundle = load_sd_model(tiny_model_dir)
    full = single_file.save_single_file(bundle, tmp_path / "full.safetensors")
    bare = tmp_path / "bare.safetensors"
    with safe_open(str(full), framework="pt") as handle:
        meta = {k: v for k, v in handle.metadata().items() if k != single_file.META_TOKENIZER}
        save_file({k: handle.get_tensor(k) for k in handle.keys()}, str(bare), metadata=meta)
    monkeypatch.setattr(single_file.importlib.util, "find_spec", lambda name, *a: None)  # no open_clip either
    monkeypatch.setattr(single_file, "_networks", lambda *a: pytest.fail("tensors were loaded"))
    monkeypatch.setattr("library.eval.run.load_samples", lambda *a: pytest.fail("the manifest was read first"))
    err = one_error(capfd, eval_args(bare, manifest_path, tmp_path / "out"))
    assert "bare.safetensors carries no tokenizer" in err and "--tokenizer_path" in err
    with pytest.raises(ModelError, match="carries no tokenizer"):
        load_sd_model(bare)


# ----------------------------------------------------------------------------------------- 5. pickle base weights


def test_folder_with_only_pickle_weights_needs_allow_pickle(tiny_model_dir, manifest_path, tmp_path, capfd):
    folder = tmp_path / "bin_model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    err = one_error(capfd, eval_args(folder, manifest_path, tmp_path / "out"))
    assert "bin_model/unet holds only pickle weights" in err and "--allow_pickle" in err
    with pytest.raises(ModelError, match="only pickle weights"):
        load_sd_model(folder)
    loaded = load_sd_model(folder, allow_pickle=True)  # diffusers falls back to the .bin file
    reference = load_sd_model(tiny_model_dir)
    assert loaded.fingerprint() == reference.fingerprint()


def test_safetensors_win_over_pickle_files_beside_them(tiny_model_dir, tmp_path):
    """use_safetensors=True: a stray (here: zeroed) .bin beside the safetensors is never read."""
    folder = tmp_path / "both"
    shutil.copytree(tiny_model_dir, folder)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    zeros = {k: torch.zeros_like(v) for k, v in unet.items()}
    torch.save(zeros, folder / "unet" / "diffusion_pytorch_model.bin")
    for allow in (False, True):
        assert load_sd_model(folder, allow_pickle=allow).fingerprint() == load_sd_model(tiny_model_dir).fingerprint()


def test_ckpt_needs_allow_pickle(tiny_model_dir, manifest_path, tmp_path, capfd):
    bundle = load_sd_model(tiny_model_dir)
    full = single_file.save_single_file(bundle, tmp_path / "full.safetensors")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(full), "global_step": 3}, ckpt)
    err = one_error(capfd, eval_args(ckpt, manifest_path, tmp_path / "out"))
    assert "model.ckpt is a pickle-based checkpoint" in err and "--allow_pickle" in err
    # allowed, it is read (a .ckpt has no smp-lora metadata: SD v1.5's shapes, which the tiny weights do not fit)
    with pytest.raises(ModelError, match=r"model\.ckpt does not look like an SD v1\.x checkpoint .*expects shape"):
        load_sd_model(ckpt, allow_pickle=True, tokenizer_path=tiny_model_dir / "tokenizer")


# ----------------------------------------------------------------------------------------- 6. permissions


def test_written_files_follow_the_umask(trained, tiny_model_dir, manifest_path, tmp_path, capfd):
    expected = 0o666 & ~UMASK
    old = os.umask(UMASK)
    try:
        saved = lora_file(tiny_model_dir, tmp_path / "saved.safetensors")
        out = tmp_path / "eval"
        rc, lines = run_cli(capfd, eval_args(tiny_model_dir, manifest_path, out, "--network_weights", str(saved),
                                             "--plots"))
    finally:
        os.umask(old)
    assert rc == 0, lines
    files = [saved, trained / "smp_lora.safetensors", trained / "smp_lora-attacker.safetensors",
             trained / "smp_lora.json"]
    files += [out / name
              for name in ("report.json", "report.md", "scores.csv", "roc.png", "roc_loglog.png", "hist.png")]
    modes = {str(f): oct(f.stat().st_mode & 0o777) for f in files}
    assert modes == {str(f): oct(expected) for f in files}


# ----------------------------------------------------------------------------------------- 7. seeds


@pytest.mark.parametrize("flag, value", [("--seed", str(2**63)), ("--seed", "-1"), ("--quality_seed", str(2**63 - 1))])
def test_seed_beyond_64_bits_is_one_line(flag, value, tiny_model_dir, manifest_path, tmp_path, capfd):
    err = one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", flag, value))
    assert f"'{flag.lstrip('-')}' must be an integer in [0, 2**63" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--device", "mps"], "use --device cpu or cuda"),  # crashed deep in torch ("not linked with mps")
    (["--device", "meta"], "use --device cpu or cuda"),
    (["--network_multiplier", "nan"], "'network_multiplier' must be a finite number"),  # failed after the base
    (["--n_bootstrap", "1"], "'n_bootstrap' must be 0 (no CIs) or at least 10 resamples, got 1"),  # was a "CI"
    (["--network_weights", "x.safetensors", "./x.safetensors"], "'network_weights' lists a file twice: x.safetensors"),
    (["--gsa_timesteps", "1001"], "'gsa_timesteps' must be at most 1000"),  # t = -1 read abar_999
    (["--blackbox_steps", "2000"], "'blackbox_steps' must be at most 1000"),  # 2000 copies of t = 1
])
def test_bad_evaluation_flags_are_one_line(flags, expected, tiny_model_dir, manifest_path, tmp_path, capfd,
                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert expected in one_error(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "out", *flags))


def test_largest_seeds_are_valid():
    EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", seed=2**63 - 1,
               quality_seed=2**63 - 64).validate()  # 64 images: seeds up to 2**63 - 1


def test_a_lora_trained_on_another_base_is_refused(trained, tiny_model_dir, manifest_path, tmp_path, capfd):
    """Same architecture, other weights: shapes fit, so only the recorded base fingerprint can tell."""
    from library.demo.tiny import save_tiny_model

    lora = trained / "smp_lora.safetensors"
    assert read_lora_metadata(lora)["smp_lora.base_fingerprint"]
    other = tmp_path / "other-base"
    save_tiny_model(other, seed=1)
    for precision in ("no", "bf16"):  # the base's fp32 weights are compared, whatever precision the run computes in
        rc, lines = run_cli(capfd, eval_args(other, manifest_path, tmp_path / "eval", "--network_weights", str(lora),
                                             "--mixed_precision", precision))
        assert rc == 2 and len(lines) == 1, precision
        assert "was trained on another base model" in lines[0] and "--allow_base_mismatch" in lines[0]
    rc, lines = run_cli(capfd, eval_args(other, manifest_path, tmp_path / "forced", "--network_weights", str(lora),
                                         "--allow_base_mismatch"))
    assert rc == 0, lines
    rc, lines = run_cli(capfd, eval_args(tiny_model_dir, manifest_path, tmp_path / "same", "--network_weights",
                                         str(lora)))
    assert rc == 0, lines  # its own base, as a folder here: the check passes


@pytest.mark.parametrize("bad, message", [
    ({"batch_size": 0}, "'batch_size' must be > 0, got 0"),  # a forward pass of no queries: an endless loop
    ({"resolution": 0}, "'resolution' must be > 0, got 0"),
    ({"clip_skip": 0}, "'clip_skip' must be > 0, got 0"),  # the 0-th last CLIP layer does not exist
])
def test_a_count_of_zero_is_refused(bad, message):
    """Counts and sizes of the evaluation start at 1: 0 is one ConfigError naming the flag, before any work."""
    with pytest.raises(ConfigError, match=message):
        EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", **bad).validate()


def test_a_resolution_is_any_multiple_of_8():
    """The VAE halves an image three times: 520 pixels is a valid size (65 latents), 516 is one ConfigError."""
    EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", resolution=520).validate()
    with pytest.raises(ConfigError, match="'resolution' must be a multiple of 8, got 516"):
        EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", resolution=516).validate()


@pytest.mark.parametrize("bad, message", [
    ({"timesteps": [1000]}, "'timesteps' must be a non-empty list of integers in \\[0, 1000\\)"),  # no t = 1000
    ({"num_noise_draws": 0}, "'num_noise_draws' must be > 0, got 0"),  # a loss feature of no draws
    ({"threads": 0}, "'threads' must be > 0, got 0"),
    ({"paper_min_timestep": 500, "paper_max_timestep": 500}, "need 0 <= paper_min_timestep < paper_max_timestep"),
    ({"paper_min_timestep": -1}, "need 0 <= paper_min_timestep"),  # no timestep -1 to draw
    ({"attacks": []}, "'attacks' must name at least one of"),  # an evaluation that attacks nothing
    ({"unet_weights": ["u", "./u"]}, "'unet_weights' lists a file twice: u"),  # one UNet, two report rows
    ({"utility_reference": "lora"}, "'utility_reference' is only used with --quality"),  # else silently unused
    ({"timesteps": [50, 50]}, "'timesteps' lists a timestep twice"),
    ({"attacks": ["loss", "loss"]}, "'attacks' lists an attack twice"),
    ({"paper_lr": 0.0}, "'paper_lr' must be > 0"),  # h' would never move
    ({"paper_dropout": 1.0}, "'paper_dropout' must be in \\[0, 1\\)"),  # drops every unit
    ({"n_bootstrap": -1}, "'n_bootstrap' must be 0 \\(no CIs\\) or at least 10"),
    ({"pia_timesteps": [20, 20]}, "'pia_timesteps' must be a non-empty list of distinct"),
    ({"secmi_timestep": 100, "secmi_step": 30}, "secmi_timestep a multiple of secmi_step"),
    ({"clid_mask_fractions": [0.0]}, "'clid_mask_fractions' must lie in \\(0, 1\\)"),  # masks no word
    ({"blackbox_guidance_scale": 0.5}, "'blackbox_guidance_scale' must be >= 1"),
    ({"audit_alpha": 1.0}, "'audit_alpha' must be in \\(0, 1\\)"),  # every set would pass the audit
    ({"quality": True, "utility_reference": "lora"}, "'utility_reference' is the unit of U.*digit_feature_weights"),
    ({"quality": True, "quality_num_images": 1, "digit_feature_weights": "d"}, "'quality_num_images' must be >= 2"),
    ({"attacks": ["loss"], "digit_feature_weights": "d"}, "only used with --quality or the image-space attacks"),
])
def test_evaluation_settings_out_of_range_are_refused(bad, message):
    """Each range and combination check of the evaluation: one ConfigError naming the flag, before any work."""
    with pytest.raises(ConfigError, match=message):
        EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", **bad).validate()


@pytest.mark.parametrize("edge", [
    {"paper_max_timestep": 1000}, {"holdout_fraction": 0.0}, {"paper_weight_decay": 0.0}, {"n_bootstrap": 10},
    {"secmi_timestep": 100, "secmi_step": 100}, {"gsa_timesteps": 1000}, {"pfami_crop_range": [1.0, 0.7]},
    {"reconstruction_strength": 1.0}, {"epsilon_delta": 0.0},
    {"digit_feature_weights": "d"},  # the default attacks include the image-space ones, which read it
    {"quality": True, "digit_feature_weights": "d", "quality_features": []},  # default: every one with weights
])
def test_evaluation_settings_at_their_edges_are_valid(edge):
    """The bounds are inclusive where the docs say so: a value on the edge is a valid evaluation."""
    EvalConfig(pretrained_model_name_or_path="m", split_manifest="s", **edge).validate()


@pytest.mark.parametrize("given, missing", [({"pretrained_model_name_or_path": "m"}, "split_manifest"),
                                            ({"pretrained_model_name_or_path": "m", "split_manifest": ""},
                                             "split_manifest"),
                                            ({"split_manifest": "s"}, "pretrained_model_name_or_path")])
def test_an_evaluation_without_its_base_model_or_split_manifest_is_refused(given, missing):
    """The manifest gives the membership labels and the base model the LoRAs' reference: neither has a default."""
    with pytest.raises(ConfigError, match=f"'{missing}' is required"):
        EvalConfig(**given).validate()


# ------------------------------------------------------------------------------------- base model (eval.models)


def test_device_auto_takes_cuda_only_when_a_gpu_is_there_and_cuda_needs_one(monkeypatch):
    """--device auto must not pick CUDA on a CPU box, nor refuse an explicit cuda on a GPU one."""
    from library.eval.models import resolve_device

    for available, auto in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert resolve_device("auto") == torch.device(auto)
    assert resolve_device("cuda:0") == torch.device("cuda:0")  # a GPU is there (still patched)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no GPU is available"):
        resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def _fake_loader(monkeypatch) -> list[torch.dtype]:
    """library.sd.loading.load_sd_model replaced by the tiny stack in the dtype asked for; returns the dtypes asked."""
    from library.demo.tiny import build_tiny_stack
    from library.sd.bundle import cast_weights

    asked: list[torch.dtype] = []

    def load(path, *, tokenizer_path=None, dtype=torch.float32, allow_pickle=False):
        asked.append(dtype)
        bundle = build_tiny_stack(seed=0)
        for module in (bundle.unet, bundle.text_encoder, bundle.vae):
            cast_weights(module, dtype)
        return bundle

    monkeypatch.setattr("library.sd.loading.load_sd_model", load)
    return asked


def test_load_bundle_fingerprints_the_fp32_weights_then_casts_every_network(monkeypatch):
    """A LoRA records its base's fp32 fingerprint: an fp16 evaluation must check that one, then run all in fp16."""
    from types import SimpleNamespace

    from library.demo.tiny import build_tiny_stack
    from library.eval.models import load_bundle

    asked = _fake_loader(monkeypatch)
    config = SimpleNamespace(pretrained_model_name_or_path="base", tokenizer_path=None, mixed_precision="fp16",
                             allow_pickle=False)
    bundle = load_bundle(config, torch.device("meta"), fingerprint=True)
    assert asked == [torch.float32]
    assert bundle.loaded_fingerprint == build_tiny_stack(seed=0).fingerprint()
    for module in (bundle.unet, bundle.text_encoder, bundle.vae):
        assert {(p.dtype, p.device.type) for p in module.parameters()} == {(torch.float16, "meta")}
    assert load_bundle(config, torch.device("cpu")).loaded_fingerprint is None and asked[-1] == torch.float16


def test_a_worker_reloads_the_base_model_only_when_its_settings_change(monkeypatch):
    """Jobs of one worker share one base model; one of another precision must not get the cached one."""
    from types import SimpleNamespace

    from library.eval import models

    loads: list[str] = []
    monkeypatch.setattr(models, "load_bundle", lambda config, device: loads.append(config.mixed_precision) or
                        object())
    monkeypatch.setattr(models, "_PROCESS_BUNDLE", {})
    fp16 = SimpleNamespace(pretrained_model_name_or_path="base", tokenizer_path=None, mixed_precision="fp16",
                           allow_pickle=False)
    fp32 = SimpleNamespace(**{**vars(fp16), "mixed_precision": "no"})
    cpu = torch.device("cpu")
    first = models.process_bundle(fp16, cpu)
    assert models.process_bundle(fp16, cpu) is first and loads == ["fp16"]
    assert models.process_bundle(fp32, cpu) is not first and loads == ["fp16", "no"]
    assert len(models._PROCESS_BUNDLE) == 1  # one base model per worker, not one per setting ever seen
