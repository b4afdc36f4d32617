"""Issue 14, training side: every bad input to train_<method>.py is one `error:` line (exit 2, no traceback,
nothing lost), and the documented warnings are one `warning:` line. Each case runs the real CLI entry."""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile

import pytest
import torch
from safetensors import safe_open

from library.config import parse_config
from library.errors import ConfigError
from library.outputs import OutputLock
from library.train.artifacts import conditioning_metadata
from library.train.cli import train_entry
from library.train.config import TrainConfig


def one_line(capsys, starts: str = "error:") -> str:
    """The single stderr line of the last call, which must start with ``starts``; never a traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith(starts), captured.err
    return lines[0]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to show nothing was lost or overwritten)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, manifest_path, tmp_path_factory):
    """A finished 2-step plain-LoRA run with --save_state: (its flags without --output_dir, its folder)."""
    base = [
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--split_manifest", str(manifest_path),
        "--resolution", "32", "--network_dim", "4", "--network_alpha", "4", "--train_batch_size", "4",
        "--learning_rate", "1e-3", "--save_precision", "float", "--no-progress_bar",
    ]
    out = tmp_path_factory.mktemp("finished") / "out"
    assert train_entry("lora", "", base + ["--max_train_steps", "2", "--save_state", "--output_dir", str(out)]) == 0
    return base, out


def copy_run(finished_run, tmp_path):
    base, out = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    return base, copy


# ---- 1, 2: rates and seeds -----------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--learning_rate", "-1e-4"), ("--learning_rate", "nan"),
                                        ("--unet_lr", "-1e-4"), ("--unet_lr", "inf"), ("--text_encoder_lr", "nan"),
                                        ("--text_encoder_lr", "-1"), ("--seed", str(2**64)), ("--seed", "-1"),
                                        ("--keep_tokens", "-1"),
                                        ("--g_member_weight", "-1"), ("--g_member_weight", "0")])  # failed at step 0
def test_bad_rate_or_seed_is_one_line(tiny_train_args, capsys, flag, value):
    method = "smp_lora" if flag == "--g_member_weight" else "lora"
    assert train_entry(method, "", tiny_train_args + [flag, value, "--dry_run"]) == 2
    assert flag.lstrip("-") in one_line(capsys)


def test_zero_part_rate_still_means_do_not_train_and_the_largest_seed_trains(tiny_train_args, tmp_path, capsys):
    assert train_entry("lora", "", tiny_train_args + ["--text_encoder_lr", "0", "--dry_run"]) == 0
    args = tiny_train_args + ["--seed", str(2**63 - 1), "--max_train_steps", "1"]
    assert train_entry("lora", "", args) == 0
    with safe_open(tmp_path / "out" / "lora.safetensors", "pt") as handle:
        assert handle.metadata()["ss_seed"] == str(2**63 - 1)


def test_a_dry_run_on_a_folder_decodes_its_images(tiny_train_args, digits_dir, tmp_path, capsys):
    """--train_data_dir has no make_split.py to decode its images first: --dry_run does, so "valid" means it."""
    folder = tmp_path / "folder"
    shutil.copytree(digits_dir, folder)
    broken = sorted(folder.rglob("*.png"))[0]
    broken.write_bytes(broken.read_bytes()[:60])  # truncated
    args = list(tiny_train_args)
    args[args.index("--split_manifest"):args.index("--split_manifest") + 2] = ["--train_data_dir", str(folder)]
    assert train_entry("lora", "", args + ["--dry_run"]) == 2
    line = one_line(capsys)
    assert str(broken) in line and "Traceback" not in line


def on_a_folder_of_four(args: list[str], digits_dir, folder) -> list[str]:
    """``args`` training on ``folder`` (``--train_data_dir``: four captioned digits copied there), not a manifest."""
    folder.mkdir()
    for image in sorted(digits_dir.glob("*.png"))[:4]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / f"{image.stem}.txt")
    args = list(args)
    args[args.index("--split_manifest"):args.index("--split_manifest") + 2] = ["--train_data_dir", str(folder)]
    return args


def test_a_folder_run_resumes_its_own_images_and_captions_only(tiny_train_args, digits_dir, tmp_path, capsys):
    """A --train_data_dir run has no manifest: its members (paths relative to the folder, and captions) are the
    state's only record of its data. A moved copy resumes; another caption is another training set."""
    folder = tmp_path / "folder"
    args = on_a_folder_of_four(tiny_train_args, digits_dir, folder)
    assert train_entry("lora", "", args + ["--max_train_steps", "1", "--save_state"]) == 0
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    resume = ["--max_train_steps", "2", "--resume", str(tmp_path / "out" / "lora-state"), "--dry_run",
              "--output_dir", str(tmp_path / "r")]
    args[args.index(str(folder))] = str(moved)
    assert train_entry("lora", "", args + resume) == 0, capsys.readouterr().err
    caption = sorted(moved.glob("*.txt"))[0]
    caption.write_text("a handwritten digit eight")
    assert train_entry("lora", "", args + resume) == 2
    assert "it was trained with members_sha256 = " in one_line(capsys)


def test_a_text_encoder_at_rate_0_through_learning_rate_gets_no_lora(tiny_train_args, tmp_path):
    """learning_rate 0 with only unet_lr set leaves the text encoder at rate 0: no text-encoder LoRA is made (it
    would be saved as zeros and stop the text embeddings from being cached), as with text_encoder_lr 0."""
    args = tiny_train_args + ["--learning_rate", "0", "--unet_lr", "1e-3", "--max_train_steps", "1"]
    assert train_entry("lora", "", args) == 0
    with safe_open(tmp_path / "out" / "lora.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("lora_unet_") for key in keys)


# ---- 3: output folders ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--output_dir", "--logging_dir", "--latent_cache_dir"])
@pytest.mark.parametrize("under", [False, True])
@pytest.mark.parametrize("dry_run", [False, True])
def test_output_folder_that_is_a_file_is_one_line(tiny_train_args, tmp_path, capsys, flag, under, dry_run):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    path = blocker / "sub" if under else blocker
    args = tiny_train_args + [flag, str(path)] + (["--cache_latents_to_disk"] if flag == "--latent_cache_dir" else [])
    assert train_entry("lora", "", args + (["--dry_run"] if dry_run else [])) == 2
    assert flag in one_line(capsys)
    assert blocker.read_text() == "keep me"


def test_unwritable_output_folder_is_refused_up_front(tiny_train_args, tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom chmod does not bite: deny access to this folder in-process instead.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).startswith(str(locked))
                        else real_access(p, mode, **kw))
    for extra in ([], ["--dry_run"]):
        assert train_entry("lora", "", tiny_train_args + ["--output_dir", str(locked / "out")] + extra) == 2
        assert "permission denied" in one_line(capsys)
    assert list(locked.iterdir()) == []


def test_a_run_refused_for_its_data_leaves_no_output_folder(tiny_train_args, tmp_path, capsys):
    """A missing manifest was refused only after --output_dir and its latent_cache had been created."""
    out = tmp_path / "never"
    args = tiny_train_args + ["--split_manifest", str(tmp_path / "missing.json"), "--cache_latents_to_disk",
                              "--output_dir", str(out)]
    assert train_entry("lora", "", args) == 2
    assert "missing.json" in one_line(capsys) and not out.exists()


def test_read_only_output_folder_is_refused_up_front(tiny_train_args, read_only_folder, capsys):
    assert train_entry("lora", "", tiny_train_args + ["--output_dir", str(read_only_folder / "out")]) == 2
    line = one_line(capsys)
    assert "--output_dir" in line and "permission denied" in line and not (read_only_folder / "out").exists()


# ---- 8, 9: overwriting, concurrent runs, names outside the folder -------------------------------------------
def test_finished_run_is_not_replaced_without_overwrite(finished_run, tmp_path, capsys):
    base, out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    for extra in ([], ["--dry_run"]):
        assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out)] + extra) == 2
        line = one_line(capsys)
        assert "--overwrite" in line and f"--resume {out / 'lora-state'}" in line, line
    assert snapshot(out) == before
    shutil.rmtree(out / "lora-state")  # a run saved without its state (or killed while saving it): no resume to offer
    assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out)]) == 2
    assert "--resume" not in one_line(capsys)
    assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out), "--overwrite"]) == 0
    assert snapshot(out)["lora.safetensors"] != before["lora.safetensors"]


def test_a_run_never_writes_over_another_runs_outputs_in_the_same_folder(finished_run, tmp_path, capsys):
    """A finished run named ``lora-000001`` (or ``lora-step00000002``, ``lora-attacker``) is not run ``lora``'s
    checkpoint (or proxy file): a run ``lora`` that would write that name is refused, --overwrite or not."""
    base, out = copy_run(finished_run, tmp_path)
    for other in ("lora-000001", "lora-attacker", "lora-step00000002"):
        for suffix in (".safetensors", ".json"):
            shutil.copy(out / f"lora{suffix}", out / f"{other}{suffix}")
        record = json.loads((out / f"{other}.json").read_text())
        record["config"]["output_name"] = other  # what that run's own record says
        (out / f"{other}.json").write_text(json.dumps(record))
    before = snapshot(out)
    smp = base + ["--output_dir", str(out), "--output_name", "lora", "--overwrite"]
    for extra, owner in ((["--max_train_steps", "12", "--save_every_n_epochs", "1"], "lora-000001"),  # 6 steps/epoch
                         (["--max_train_steps", "3", "--save_every_n_steps", "2"], "lora-step00000002"),
                         (["--max_train_steps", "1"], "lora-attacker")):
        for dry in (["--dry_run"], []):
            assert train_entry("smp_lora", "", smp + extra + dry) == 2
            line = one_line(capsys)
            assert f"holds the run '{owner}' ({owner}.json)" in line and "--output_name" in line, line
    assert snapshot(out) == before
    # nor does --overwrite make another run's checkpoint this run's final file (run 'lora-000001' over 'lora''s)
    record = json.loads((out / "lora.json").read_text())
    (out / "lora-000003.json").write_text(json.dumps(record))  # a checkpoint record of run 'lora'
    shutil.copy(out / "lora.safetensors", out / "lora-000003.safetensors")
    assert train_entry("lora", "", base + ["--output_dir", str(out), "--output_name", "lora-000003", "--overwrite",
                                           "--max_train_steps", "1"]) == 2
    assert "holds the run 'lora' (lora-000003.json)" in one_line(capsys)
    # the names a run does not write are no obstacle: plain LoRA writes no proxy, and epoch 1 is not saved here;
    # nor is a run's last epoch (its final file is): 'lora-000003' is run 'lora''s, not this 3-epoch run's
    plain = base + ["--output_dir", str(out), "--overwrite", "--save_every_n_epochs", "2", "--max_train_steps", "18"]
    assert train_entry("lora", "", plain) == 0
    assert (out / "lora-000003.json").read_text() == json.dumps(record)
    (out / "lora-000003.json").write_text(json.dumps({**record, "config": {**record["config"],
                                                                          "output_name": "lora-000003"}}))
    last_epoch = base + ["--output_dir", str(out), "--overwrite", "--save_every_n_epochs", "3", "--max_train_steps",
                         "18", "--dry_run"]  # 3 epochs: the third is the final file, never 'lora-000003'
    assert train_entry("lora", "", last_epoch) == 0
    assert (out / "lora-000002.safetensors").is_file() and snapshot(out)["lora-000001.safetensors"] == \
        before["lora-000001.safetensors"]


def test_only_another_runs_record_at_a_name_this_run_writes_refuses_the_run(finished_run, tmp_path, capsys):
    """A diverging run writes ``<name>-last-good``: another run of that name is refused; a JSON there that is no run
    record, or another run at a step checkpoint's name that falls on the final step (never written), is not."""
    base, out = copy_run(finished_run, tmp_path)
    record = json.loads((out / "lora.json").read_text())
    (out / "lora-last-good.json").write_text(json.dumps({**record, "config": {**record["config"],
                                                                             "output_name": "lora-last-good"}}))
    dry = base + ["--output_dir", str(out), "--overwrite", "--dry_run", "--max_train_steps", "2"]
    assert train_entry("lora", "", dry) == 2
    assert "holds the run 'lora-last-good' (lora-last-good.json)" in one_line(capsys)
    (out / "lora-last-good.json").write_text('{"notes": "another tool\'s file"}')
    assert train_entry("lora", "", dry) == 0
    (out / "lora-step00000002.json").write_text(json.dumps({**record, "config": {**record["config"],
                                                                                "output_name": "lora-step00000002"}}))
    assert train_entry("lora", "", dry + ["--save_every_n_steps", "2"]) == 0  # step 2 is the last: lora.safetensors


def test_epoch_checkpoint_names_count_the_accumulated_batches(finished_run, tmp_path, capsys):
    """3 steps of 4 accumulated batches are 2 epochs of 6 batches: epoch 1's checkpoint would write over run
    ``lora-000001``'s files, so the run is refused."""
    base, out = copy_run(finished_run, tmp_path)
    record = json.loads((out / "lora.json").read_text())
    (out / "lora-000001.json").write_text(json.dumps({**record, "config": {**record["config"],
                                                                          "output_name": "lora-000001"}}))
    assert train_entry("lora", "", base + ["--output_dir", str(out), "--overwrite", "--dry_run", "--max_train_steps",
                                           "3", "--gradient_accumulation_steps", "4", "--save_every_n_epochs",
                                           "1"]) == 2
    assert "holds the run 'lora-000001' (lora-000001.json)" in one_line(capsys)


def test_an_unfinished_runs_states_are_not_replaced_without_overwrite(finished_run, tmp_path, capsys):
    """A run killed after saving a state leaves no LoRA: a new run into its folder would write its states under the
    same names (the interrupted run's progress lost), so it is refused unless it resumes that run or passes
    --overwrite."""
    base, out = copy_run(finished_run, tmp_path)
    (out / "lora.safetensors").unlink()
    (out / "lora.json").unlink()
    before = snapshot(out)
    for extra in ([], ["--dry_run"]):
        assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out)] + extra) == 2
        line = one_line(capsys)
        assert "holds an unfinished run of lora (its newest state: lora-state)" in line and "--resume latest" in line
    # nor by a run resuming a state from another folder: its states (and their pruning) would take the same names
    elsewhere = shutil.copytree(out / "lora-state", tmp_path / "elsewhere" / "lora-state")
    assert train_entry("lora", "", base + ["--max_train_steps", "2", "--output_dir", str(out), "--resume",
                                           str(elsewhere)]) == 2
    line = one_line(capsys)
    assert f"that this run, resuming {elsewhere}, would write its states over; pass --resume {out / 'lora-state'}" \
        in line and "--overwrite" in line, line
    assert snapshot(out) == before
    assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out), "--output_name",
                                           "other"]) == 0  # another name's states are not this run's
    assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(out), "--overwrite"]) == 0


def test_an_overwrite_killed_before_its_record_leaves_no_mixed_run(finished_run, tmp_path, capsys, monkeypatch):
    """The old record goes before the new LoRA is written: a retrain killed between the new LoRA and its record
    leaves a LoRA without record (refused as unfinished), not the new LoRA beside the replaced run's record."""
    import library.train.artifacts as artifacts

    base, out = copy_run(finished_run, tmp_path)
    before = snapshot(out)

    def killed(path, text):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "atomic_write_text", killed)
    args = base + ["--max_train_steps", "1", "--output_dir", str(out)]
    assert train_entry("lora", "", args + ["--overwrite"]) == 130
    assert snapshot(out)["lora.safetensors"] != before["lora.safetensors"] and not (out / "lora.json").exists()
    capsys.readouterr()
    assert train_entry("lora", "", args) == 2
    assert "a run's LoRA without its run record" in one_line(capsys)


def test_an_overwrite_retrain_unmarks_the_replaced_run_when_it_starts(finished_run, tmp_path, capsys, monkeypatch):
    """--overwrite takes the replaced run's record away before training (not in a dry run): a retrain killed early
    leaves an unfinished run that a launcher continues, not the old run looking finished."""
    from library.train.trainer import Trainer

    base, out = copy_run(finished_run, tmp_path)
    args = base + ["--max_train_steps", "2", "--output_dir", str(out), "--overwrite"]
    assert train_entry("lora", "", args + ["--dry_run"]) == 0 and (out / "lora.json").is_file()

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "step", killed)
    assert train_entry("lora", "", args) == 130
    assert not (out / "lora.json").exists() and (out / "lora.safetensors").is_file()


def test_continuing_a_lora_records_its_splits_and_warns_when_they_differ(finished_run, digits_dir, tmp_path, capsys):
    """--network_weights: the new LoRA records the splits its parent's weights saw (library.data.lineage), and a
    parent of another split is a warning before training (evaluate_mia.py then refuses the new LoRA)."""
    from conftest import SPLIT_SIZES

    from library.data.dataset import scan_dataset
    from library.data.manifest import read_manifest, split_sha256, write_manifest
    from library.data.splits import make_split

    base, out = finished_run
    parent = out / "lora.safetensors"
    with safe_open(parent, "pt") as handle:
        parent_split = handle.metadata()["smp_lora.split_sha256"]
    other = tmp_path / "other.json"
    write_manifest(make_split(scan_dataset(digits_dir), sizes=SPLIT_SIZES, seed=1, dataset_root=digits_dir), other)
    for manifest, warned in ((None, False), (other, True)):
        args = base + ["--max_train_steps", "1", "--network_weights", str(parent), "--output_dir",
                       str(tmp_path / str(warned))] + (["--split_manifest", str(other)] if manifest else [])
        assert train_entry("lora", "", args) == 0
        err = capsys.readouterr().err
        assert ("was trained (or continues a LoRA trained) on another split" in err) == warned, err
        with safe_open(tmp_path / str(warned) / "lora.safetensors", "pt") as handle:
            meta = handle.metadata()
        assert meta["smp_lora.parent_split_sha256"] == parent_split
    assert meta["smp_lora.split_sha256"] == split_sha256(read_manifest(other)) != parent_split
    from safetensors.torch import load_file, save_file

    foreign = tmp_path / "foreign.safetensors"  # a LoRA from elsewhere: no record of what it saw
    save_file(load_file(str(parent)), str(foreign))
    args = base + ["--max_train_steps", "1", "--network_weights", str(foreign), "--output_dir", str(tmp_path / "f")]
    assert train_entry("lora", "", args) == 0
    assert "records no split" in capsys.readouterr().err
    with safe_open(tmp_path / "f" / "lora.safetensors", "pt") as handle:
        assert handle.metadata()["smp_lora.parent_split_sha256"] == "unrecorded"


def test_a_folder_run_continuing_a_lora_gets_no_split_warning(finished_run, digits_dir, tmp_path, capsys):
    """A --train_data_dir run has no split to audit against: a parent LoRA's split is no warning about a membership
    evaluation "against None" (evaluate_mia.py refuses such a run anyway: it records no split)."""
    base, out = finished_run
    args = on_a_folder_of_four(base, digits_dir, tmp_path / "folder")
    assert train_entry("lora", "", args + ["--network_weights", str(out / "lora.safetensors"), "--dry_run",
                                           "--output_dir", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "split" not in err, err


def test_a_resume_keeps_the_record_of_the_lora_the_run_started_from(finished_run, tmp_path, capsys):
    """The weights of a run that continued a LoRA come back from its state, and so does its record of the splits
    behind them: a resume without --network_weights keeps it, one with another LoRA's is refused (the state's
    weights would be saved under that LoRA's record)."""
    base, out = finished_run
    parent = out / "lora.safetensors"
    with safe_open(parent, "pt") as handle:
        lineage = handle.metadata()["smp_lora.split_sha256"]
    child = base + ["--save_state", "--save_every_n_steps", "1"]
    assert train_entry("lora", "", child + ["--max_train_steps", "1", "--network_weights", str(parent),
                                            "--output_dir", str(tmp_path / "child")]) == 0
    state = tmp_path / "child" / "lora-state"
    resumed = tmp_path / "resumed"
    assert train_entry("lora", "", child + ["--max_train_steps", "2", "--resume", str(state), "--output_dir",
                                            str(resumed)]) == 0
    with safe_open(resumed / "lora.safetensors", "pt") as handle:
        assert handle.metadata()["smp_lora.parent_split_sha256"] == lineage  # was: nothing recorded
    again = tmp_path / "again"  # and the resumed run's own state carries it on
    assert train_entry("lora", "", child + ["--max_train_steps", "3", "--resume", str(resumed / "lora-state"),
                                            "--output_dir", str(again)]) == 0
    with safe_open(again / "lora.safetensors", "pt") as handle:
        assert handle.metadata()["smp_lora.parent_split_sha256"] == lineage
    capsys.readouterr()
    # A state that started from scratch, resumed with a --network_weights: its weights are the state's, not that file's
    assert train_entry("lora", "", child + ["--max_train_steps", "2", "--resume", str(out / "lora-state"),
                                            "--network_weights", str(parent), "--output_dir", str(tmp_path / "x")]) == 2
    line = one_line(capsys)
    assert "cannot resume" in line and "parent_splits" in line and "--network_weights" in line, line


def test_a_resume_may_change_what_the_run_ignores(finished_run, tmp_path, capsys):
    """Settings the run says it ignores (another method's, DreamBooth's without prior preservation, the caption
    extension of a manifest run, keep_tokens without shuffling) do not block a resume; one it reads still does."""
    base, out = copy_run(finished_run, tmp_path)
    ignored = ["--caption_extension", ".cap", "--relaxloss_alpha", "0.5", "--class_prompt", "a dog", "--keep_tokens",
               "2", "--hessian_every_n_steps", "7"]
    resume = base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--output_dir", str(out)]
    assert train_entry("lora", "", resume + ["--shuffle_caption"]) == 2
    assert "shuffle_caption" in one_line(capsys)
    assert train_entry("lora", "", resume + ignored) == 0, capsys.readouterr().err


def test_second_run_into_a_locked_folder_is_one_line(tiny_train_args, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(out):
        assert train_entry("lora", "", tiny_train_args) == 2
        assert "in use" in one_line(capsys)
    assert not (out / "lora.safetensors").exists()


@pytest.mark.parametrize("name", ["../escape", "sub/x", ".hidden"])
def test_output_name_must_stay_inside_the_folder(tiny_train_args, tmp_path, capsys, name):
    assert train_entry("lora", "", tiny_train_args + ["--output_name", name]) == 2
    assert "--output_name" in one_line(capsys)
    assert not list(tmp_path.glob("*.safetensors"))


# ---- 4, 6, 7: resume of another run ---------------------------------------------------------------------
def test_resume_of_another_shape_method_split_or_budget_is_one_line(finished_run, tmp_path, capsys, digits_dir):
    base, out = finished_run
    state = out / "lora-state"
    before = snapshot(out)
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split

    sizes = {"member_aux": 12, "member_test": 12, "nonmember_aux": 12, "nonmember_test": 12}
    other = tmp_path / "other_split.json"
    write_manifest(make_split(scan_dataset(digits_dir), sizes=sizes, seed=1, dataset_root=digits_dir), other)
    resume = base + ["--resume", str(state), "--output_dir", str(tmp_path / "resumed")]
    cases = [("lora", ["--max_train_steps", "3", "--network_dim", "8"], "network_dim"),
             ("smp_lora", ["--max_train_steps", "3"], "method"),
             ("lora", ["--max_train_steps", "3", "--split_manifest", str(other)], "split_manifest"),
             ("lora", ["--max_train_steps", "3", "--seed", "7"], "seed"),
             ("lora", ["--max_train_steps", "1"], "at step 2"),
             # The state's optimizer would keep its own rates while the LoRA's metadata named these:
             ("lora", ["--max_train_steps", "3", "--unet_lr", "0.3"], "optimizer.unet_lr = 0.001, this run has 0.3"),
             ("lora", ["--max_train_steps", "3", "--weight_decay", "0.5"], "optimizer.weight_decay"),
             ("lora", ["--max_train_steps", "3", "--mixed_precision", "bf16"], "mixed_precision = 'no'"),
             # What conditions the UNet: the LoRA's metadata would name the new value, and the evaluation use it
             ("lora", ["--max_train_steps", "3", "--clip_skip", "2"], "clip_skip = 1, this run has 2 (set by --clip_skip)"),
             ("lora", ["--max_train_steps", "3", "--resolution", "64"], "resolution = 32, this run has 64"),
             ("lora", ["--max_train_steps", "3", "--min_timestep", "500"], "min_timestep = 0, this run has 500")]
    for method, extra, expected in cases:
        assert train_entry(method, "", resume + extra) == 2
        line = one_line(capsys)
        assert expected in line and str(state) in line, line
    assert snapshot(out) == before
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()


def test_a_unet_only_state_ignores_the_text_encoders_rate(tiny_train_args, tmp_path, capsys):
    """The text encoder's rate is no parameter group of a UNet-only state: changing it alone changes nothing the
    resume trains, and --learning_rate (both rates) is refused by the rate that matters."""
    common = tiny_train_args + ["--network_train_unet_only", "--max_train_steps", "1"]
    assert train_entry("lora", "", common + ["--save_state", "--output_dir", str(tmp_path / "a")]) == 0
    resume = common + ["--max_train_steps", "2", "--resume", str(tmp_path / "a" / "lora-state"), "--dry_run",
                       "--output_dir", str(tmp_path / "b")]
    assert train_entry("lora", "", resume + ["--learning_rate", "0.3"]) == 2
    assert "optimizer.unet_lr = 0.001, this run has 0.3" in one_line(capsys)
    assert train_entry("lora", "", resume + ["--text_encoder_lr", "0.3"]) == 0


def test_a_state_that_trains_the_text_encoder_keeps_its_rate(finished_run, tmp_path, capsys):
    """The text encoder's rate is a parameter group of a state that trains it: another --text_encoder_lr would
    go on at the state's rate while the LoRA's ss_text_encoder_lr named the new one."""
    base, out = finished_run
    resume = base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--output_dir",
                     str(tmp_path / "r"), "--dry_run"]
    assert train_entry("lora", "", resume + ["--text_encoder_lr", "0.3"]) == 2
    assert "optimizer.text_encoder_lr = 0.001, this run has 0.3" in one_line(capsys)


def test_a_resume_may_change_how_its_files_are_written_not_how_it_trains(finished_run, tmp_path, capsys):
    """--save_precision only changes the saved files' dtype: a resume may change it (and the name it saves under);
    --max_grad_norm changes every step after the resume while ss_max_grad_norm would name the new value."""
    base, out = finished_run
    resume = base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--output_dir",
                     str(tmp_path / "r"), "--dry_run"]
    assert train_entry("lora", "", resume + ["--save_precision", "fp16", "--output_name", "other"]) == 0
    capsys.readouterr()
    assert train_entry("lora", "", resume + ["--max_grad_norm", "0.5"]) == 2
    assert "max_grad_norm = 1.0, this run has 0.5 (set by --max_grad_norm)" in one_line(capsys)


def test_a_refusal_shows_where_two_long_values_differ():
    from library.train.resume import _show

    shown = _show("/tmp/" + "a" * 100 + "/class_images_copy")
    assert shown.endswith("/class_images_copy'") and "..." in shown and len(shown) < 120
    assert _show(0.001) == "0.001"


def test_resume_with_another_proxy_attacker_is_one_line_before_any_work(tiny_train_args, tmp_path, capsys):
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "1"]
    assert train_entry("smp_lora", "", common + ["--save_state", "--output_dir", str(tmp_path / "a")]) == 0
    state = tmp_path / "a" / "smp_lora-state"
    for extra, expected in ((["--attacker_features", "loss"], "attacker.features = 'error_map', this run has 'loss'"),
                            (["--attacker_lr", "0.1"], "attacker.lr")):
        args = common + ["--max_train_steps", "2", "--resume", str(state), "--output_dir", str(tmp_path / "b")]
        assert train_entry("smp_lora", "", args + extra) == 2
        line = one_line(capsys)
        assert expected in line and "--attacker_" in line, line
        assert not (tmp_path / "b" / "smp_lora.safetensors").exists()


def test_resume_with_another_objective_or_batch_is_one_line_and_save_settings_may_change(tiny_train_args, tmp_path,
                                                                                        capsys):
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "1"]
    assert train_entry("smp_lora", "", common + ["--save_state", "--output_dir", str(tmp_path / "a")]) == 0
    args = common + ["--max_train_steps", "2", "--resume", str(tmp_path / "a" / "smp_lora-state"), "--dry_run"]
    for extra, expected in ((["--privacy_lambda", "0.5"], "privacy_lambda = 0.05, this run has 0.5"),
                            (["--train_batch_size", "6"], "total_batch = 4, this run has 6"),
                            (["--attacker_noise", "fixed"], "attacker_noise = 'fresh', this run has 'fixed'"),
                            (["--latent_mode", "sample"], "latent_mode = 'mean', this run has 'sample'"),
                            (["--gradient_accumulation_steps", "2"], "gradient_accumulation_steps")):
        assert train_entry("smp_lora", "", args + extra) == 2
        assert expected in one_line(capsys)
    allowed = ["--save_every_n_steps", "1", "--log_every_n_steps", "1", "--attacker_eval_every_n_epochs", "3",
               "--cache_latents_to_disk", "--output_dir", str(tmp_path / "b")]
    assert train_entry("smp_lora", "", args + allowed) == 0


def test_resume_on_another_base_model_or_schedule_length_is_refused_and_equal_spellings_are_not(
        finished_run, tmp_path, capsys, tiny_model_dir):
    from library.demo.tiny import save_tiny_model

    base, out = finished_run
    resume = base + ["--resume", str(out / "lora-state"), "--output_dir", str(tmp_path / "r"), "--dry_run"]
    other_model = tmp_path / "other_model"
    save_tiny_model(other_model, seed=1)
    flags = [str(other_model) if arg == str(tiny_model_dir) else arg for arg in resume]
    assert train_entry("lora", "", flags + ["--max_train_steps", "3"]) == 2
    assert "base_fingerprint" in one_line(capsys)  # the LoRA's metadata would name a base it was not trained on
    # max_token_length 75 is the default None; the network_args LoCon keys in another order are the same network
    assert train_entry("lora", "", resume + ["--max_train_steps", "3", "--max_token_length", "75"]) == 0
    capsys.readouterr()
    cosine = base + ["--lr_scheduler", "cosine", "--save_state", "--network_args", "conv_dim=2", "conv_alpha=1"]
    assert train_entry("lora", "", cosine + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "c")]) == 0
    again = cosine[:-2] + ["conv_alpha=1", "conv_dim=2", "--resume", str(tmp_path / "c" / "lora-state"), "--dry_run",
                           "--output_dir", str(tmp_path / "c2")]
    assert train_entry("lora", "", again + ["--max_train_steps", "2"]) == 0
    capsys.readouterr()
    assert train_entry("lora", "", again + ["--max_train_steps", "4"]) == 2
    assert "lr_scheduler 'cosine' decays over 2 steps and this run asks for 4" in one_line(capsys)


def test_a_resume_takes_a_rewritten_manifest_of_the_same_splits(finished_run, tmp_path, capsys):
    """A manifest re-written (a moved dataset) with the same splits resumes: its bytes are compared only with a
    state too old to record its splits (split_sha256), which another manifest file must not resume in silence."""
    base, out = copy_run(finished_run, tmp_path)
    manifest = base[base.index("--split_manifest") + 1]
    from library.data.manifest import manifest_sha256, read_manifest, write_manifest

    rewritten = tmp_path / "elsewhere" / "rewritten.json"  # its dataset_root is stored relative to its folder
    rewritten.parent.mkdir()
    write_manifest(read_manifest(manifest), rewritten)
    assert manifest_sha256(rewritten) != manifest_sha256(manifest)
    flags = [str(rewritten) if arg == manifest else arg for arg in base]
    resume = ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--output_dir", str(tmp_path / "r"),
              "--dry_run"]
    assert train_entry("lora", "", flags + resume) == 0, capsys.readouterr().err
    summary_file = out / "lora-state" / "train_state.json"
    summary = json.loads(summary_file.read_text())
    del summary["identity"]["split_sha256"]  # as a state written before split_sha256 was recorded
    summary_file.write_text(json.dumps(summary))
    assert train_entry("lora", "", base + resume) == 0, capsys.readouterr().err  # its own manifest file
    assert train_entry("lora", "", flags + resume) == 2
    assert "it was trained with manifest_sha256 = " in one_line(capsys)


def test_a_bad_state_is_one_line_before_any_model_work(finished_run, tmp_path, capsys):
    """Checked by --dry_run, which stops before the latents are encoded: a real run finds it as early."""
    base, out = copy_run(finished_run, tmp_path)
    run = base + ["--max_train_steps", "3", "--output_dir", str(tmp_path / "r")]
    state = out / "lora-state"
    assert train_entry("lora", "", run + ["--dry_run", "--resume", str(out)]) == 2  # the run's folder, not its state
    assert "the states in that folder: lora-state" in one_line(capsys)
    good = (state / "state.pt").read_bytes()
    (state / "state.pt").write_bytes(os.urandom(64))
    assert train_entry("lora", "", run + ["--dry_run", "--resume", str(state)]) == 2
    line = one_line(capsys)
    assert "is corrupt or not a training state" in line and "weights_only" not in line
    for broken in (b"PK\x03\x04" + os.urandom(64), good[: len(good) // 2]):  # an archive's header, then junk; a cut copy
        (state / "state.pt").write_bytes(broken)
        assert train_entry("lora", "", run + ["--dry_run", "--resume", str(state)]) == 2
        assert "is corrupt or not a training state (truncated?" in one_line(capsys)
    with zipfile.ZipFile(state / "state.pt", "w") as archive:  # a zip file, not a torch archive
        archive.writestr("notes.txt", "hello")
    assert train_entry("lora", "", run + ["--dry_run", "--resume", str(state)]) == 2
    assert "(a zip file, not a torch one)" in one_line(capsys)

    class RunsCode:  # what a crafted state would hold: unpickling it in full would call print
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": RunsCode()}, state / "state.pt")
    assert train_entry("lora", "", run + ["--resume", str(state)]) == 2
    captured = capsys.readouterr()
    assert "unpickled!" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    line = lines[0]
    assert line.endswith("(it holds Python objects (print) besides tensors, which are not unpickled)"), line
    assert "weights_only" not in line and "\x1b" not in line
    (state / "state.pt").write_bytes(good)
    summary = state / "train_state.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "global_step": "two"}))
    assert train_entry("lora", "", run + ["--dry_run", "--resume", str(state)]) == 2
    assert "records global_step 'two', not a step" in one_line(capsys)


def test_an_interrupted_run_names_the_state_to_resume_and_leftovers_go(tiny_train_args, tmp_path, capsys,
                                                                       monkeypatch):
    from library.train.trainer import Trainer

    out = tmp_path / "int"
    (out / "sample").mkdir(parents=True)
    (out / "sample" / ".lora_e000001.png.k1ll3d.tmp").write_bytes(b"half a png")
    original = Trainer.step

    def interrupted_at_step_3(self):
        if self.global_step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "step", interrupted_at_step_3)
    args = tiny_train_args + ["--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2",
                              "--output_dir", str(out)]
    assert train_entry("lora", "", args) == 130
    err = capsys.readouterr().err
    assert f"the newest state of this run is {out / 'lora-step00000002-state'}" in err and "interrupted" in err
    assert not list((out / "sample").glob(".*.tmp"))  # the run's own subfolder is swept when it starts
    (out / "lora.safetensors").write_bytes(b"")  # as if killed between the LoRA and its record
    monkeypatch.setattr(Trainer, "step", original)
    assert train_entry("lora", "", args) == 2
    line = one_line(capsys)
    assert "a run's LoRA without its run record" in line and "lora-step00000002-state (its newest state)" in line


def test_a_run_that_crashes_names_the_state_to_resume(tiny_train_args, tmp_path, capsys, monkeypatch):
    """A crash mid-run names the newest state as Ctrl-C does: on two processes, the main rank of a run whose other
    rank was killed dies in the gradients' all-reduce with gloo's "Connection closed by peer" (torchrun's SIGTERM,
    which would print the hint, mostly comes too late), and said nothing about what to resume."""
    from library.train.trainer import Trainer

    out = tmp_path / "crash"
    original = Trainer.step

    def peer_gone_at_step_3(self):
        if self.global_step == 3:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer")
        return original(self)

    monkeypatch.setattr(Trainer, "step", peer_gone_at_step_3)
    args = tiny_train_args + ["--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2",
                              "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="Connection closed by peer"):  # the cause keeps its traceback
        train_entry("lora", "", args)
    err = capsys.readouterr().err
    assert f"the newest state of this run is {out / 'lora-step00000002-state'}" in err, err


@pytest.mark.parametrize("stop", ["crash", "sigterm"])
def test_a_process_that_is_not_the_main_one_names_the_state_too(stop, tiny_train_args, tmp_path, capsys, monkeypatch):
    """When the main process itself was killed, torchrun SIGTERMs the others (or they die in gloo's all-reduce):
    they name the state then, each with its index, since the main one cannot. Here the one process stops being
    the main one as it stops."""
    from accelerate import Accelerator

    from library.cli import Terminated
    from library.train.trainer import Trainer

    out = tmp_path / "stop"
    original = Trainer.step

    def main_gone_at_step_3(self):
        if self.global_step == 3:
            monkeypatch.setattr(Accelerator, "is_main_process", property(lambda accelerator: False))
            raise RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer") if stop == "crash" \
                else Terminated
        return original(self)

    monkeypatch.setattr(Trainer, "step", main_gone_at_step_3)
    args = tiny_train_args + ["--max_train_steps", "4", "--save_state", "--save_every_n_steps", "2",
                              "--output_dir", str(out)]
    if stop == "crash":
        with pytest.raises(RuntimeError, match="Connection closed by peer"):
            train_entry("lora", "", args)
    else:
        assert train_entry("lora", "", args) == 143
    err = capsys.readouterr().err
    what = "the run stopped on an error" if stop == "crash" else "nothing was saved at the interruption"
    assert f"process 0: {what}; the newest state of this run is {out / 'lora-step00000002-state'}" in err, err


def test_a_moved_dataset_keeps_its_lora_and_its_state(finished_run, tmp_path, manifest_path, digits_dir):
    """The dataset moved and its manifest was written again (same splits, another dataset_root, so other bytes):
    the run resumes from its state, and evaluate_mia.py takes its LoRA, with the new manifest."""
    from library.data.manifest import read_manifest, write_manifest
    from library.eval.config import EvalConfig
    from library.eval.inputs import load_samples, model_specs

    base, out = copy_run(finished_run, tmp_path)
    moved_images = tmp_path / "moved" / "images"
    shutil.copytree(digits_dir, moved_images)
    moved = tmp_path / "elsewhere" / "split.json"
    write_manifest(read_manifest(manifest_path, dataset_root=moved_images), moved)
    assert moved.read_bytes() != manifest_path.read_bytes()
    flags = [str(moved) if arg == str(manifest_path) else arg for arg in base]
    assert train_entry("lora", "", flags + ["--max_train_steps", "3", "--resume", str(out / "lora-state"),
                                            "--output_dir", str(tmp_path / "r")]) == 0
    config = EvalConfig(pretrained_model_name_or_path="unused", split_manifest=str(moved),
                        network_weights=[str(out / "lora.safetensors"), str(tmp_path / "r" / "lora.safetensors")])
    assert [spec.name for spec in model_specs(config, load_samples(config)[2])] == ["base", "lora", "lora-2"]


def test_state_without_summary_is_refused_in_one_line(finished_run, tmp_path, capsys):
    """state.pt alone carries no identity: a copied state.pt resumed any run with other settings, and a state of a
    LoRA continued from another split lost that record (evaluate_mia.py then passed it)."""
    base, out = copy_run(finished_run, tmp_path)
    (out / "lora-state" / "train_state.json").unlink()
    args = base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--output_dir", str(tmp_path / "r")]
    for method, extra in (("smp_lora", []), ("lora", ["--learning_rate", "5e-3"])):  # the second used to resume
        assert train_entry(method, "", args + extra) == 2
        assert "holds no train_state.json" in one_line(capsys)


# ---- 5 and the sd-scripts way of continuing a run ---------------------------------------------------------
def test_resume_into_its_own_folder_needs_no_overwrite_and_survives_leftovers(finished_run, tmp_path, capsys):
    base, out = copy_run(finished_run, tmp_path)
    for leftover in ("lora-state.old", ".lora-state.old", ".lora-state.k1ll3d.tmp", ".lora-state.old.x9.tmp"):
        (out / leftover).mkdir()
        (out / leftover / "state.pt").write_text("stale")
    args = base + ["--max_train_steps", "3", "--save_state", "--resume", str(out / "lora-state"),
                   "--output_dir", str(out)]
    assert train_entry("lora", "", args) == 0
    assert json.loads((out / "lora-state" / "train_state.json").read_text())["global_step"] == 3
    assert not list(out.glob(".*.tmp"))  # stale staging folders are swept at the start
    assert (out / "lora-state.old" / "state.pt").read_text() == "stale"  # not ours: left alone
    assert (out / ".lora-state.old" / "state.pt").read_text() == "stale"


def test_dry_run_refuses_an_attacker_batch_larger_than_the_aux_sets(tiny_train_args, capsys):
    """Checked with the data, before any latent is encoded: --dry_run says it, not the real run minutes later."""
    assert train_entry("smp_lora", "", tiny_train_args + ["--attacker_batch_size", "13", "--dry_run"]) == 2
    line = one_line(capsys)
    assert "D^m_aux (--attacker_batch_size) has 12 image(s)" in line and "lower the batch size" in line
    assert train_entry("smp_lora", "", tiny_train_args + ["--attacker_batch_size", "12", "--dry_run"]) == 0


@pytest.mark.parametrize("method,extra,expected", [
    ("dp_lora", ["--gradient_checkpointing"], "gradient_checkpointing"),  # used to fail after the latents
    ("lora", ["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], "constant_with_warmup"),  # was ignored
    ("lora", ["--clip_skip", "5"], "clip_skip must be between 1 and 2"),  # the tiny CLIP has 2 layers
])
def test_dry_run_refuses_what_the_real_run_could_not_do(tiny_train_args, capsys, method, extra, expected):
    assert train_entry(method, "", tiny_train_args + extra + ["--dry_run"]) == 2
    assert expected in one_line(capsys)


def test_continuing_a_lora_of_another_rank_names_the_flag(finished_run, tmp_path, capsys):
    base, out = finished_run  # a rank-4 LoRA
    args = base + ["--network_dim", "8", "--network_weights", str(out / "lora.safetensors"), "--max_train_steps", "1",
                   "--output_dir", str(tmp_path / "more")]
    assert train_entry("lora", "", args) == 2
    assert "has rank 4" in (line := one_line(capsys)) and "--network_dim 4" in line and "--dim_from_weights" in line


def test_dim_from_weights_continues_a_file_whose_ranks_differ(finished_run, tmp_path, capsys):
    """sd-scripts' --dim_from_weights: a resized LoRA (ranks per layer, resize_lora.py --dynamic_method) could not
    be continued: each --network_dim the error suggested was the wrong one for some other layer."""
    from safetensors.torch import load_file, save_file

    base, out = finished_run  # rank 4, alpha 4
    mixed = load_file(str(out / "lora.safetensors"))
    layer = sorted(k.removesuffix(".lora_down.weight") for k in mixed if k.endswith(".lora_down.weight"))[0]
    mixed[f"{layer}.lora_down.weight"] = mixed[f"{layer}.lora_down.weight"][:2].contiguous()
    mixed[f"{layer}.lora_up.weight"] = mixed[f"{layer}.lora_up.weight"][:, :2].contiguous()
    mixed[f"{layer}.alpha"] = torch.tensor(1.0)
    source = tmp_path / "mixed.safetensors"
    save_file(mixed, str(source))
    args = base + ["--network_weights", str(source), "--max_train_steps", "1", "--output_dir", str(tmp_path / "a")]
    assert train_entry("lora", "", args) == 2
    assert "has rank 2" in one_line(capsys)
    assert train_entry("lora", "", args + ["--dim_from_weights", "--learning_rate", "0", "--unet_lr", "0",
                                           "--text_encoder_lr", "1e-9"]) == 0  # the UNet LoRA stays as loaded
    saved = load_file(str(tmp_path / "a" / "lora.safetensors"))
    assert set(saved) == set(mixed)
    for key, tensor in mixed.items():
        if key.startswith("lora_unet_"):
            assert torch.equal(saved[key].to(tensor.dtype), tensor), key
    with safe_open(tmp_path / "a" / "lora.safetensors", "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"])["variable_rank"] is True
    # its state resumes whatever --network_dim says (the flags do not describe the network), with a warning
    state_args = args + ["--dim_from_weights", "--learning_rate", "0", "--unet_lr", "0", "--text_encoder_lr", "1e-9",
                         "--output_dir", str(tmp_path / "s"), "--save_state"]
    assert train_entry("lora", "", state_args) == 0
    capsys.readouterr()
    resumed = state_args + ["--max_train_steps", "2", "--resume", str(tmp_path / "s" / "lora-state"),
                            "--network_dim", "8", "--dry_run"]
    assert train_entry("lora", "", resumed) == 0
    assert "network_dim ignored: --dim_from_weights shapes the network" in capsys.readouterr().err
    assert train_entry("lora", "", base + ["--dim_from_weights", "--dry_run"]) == 2
    assert "'dim_from_weights' builds the network from the --network_weights file" in one_line(capsys)


def test_continuing_a_lora_with_another_alpha_says_which_alpha_it_keeps(finished_run, tmp_path, capsys):
    from safetensors import safe_open

    base, out = finished_run  # alpha 4
    args = base + ["--network_alpha", "1", "--network_weights", str(out / "lora.safetensors"), "--max_train_steps",
                   "1", "--output_dir", str(tmp_path / "more")]
    assert train_entry("lora", "", args) == 0
    assert "--network_alpha 1 is not used" in capsys.readouterr().err
    with safe_open(tmp_path / "more" / "lora.safetensors", "pt") as handle:
        assert float(handle.metadata()["ss_network_alpha"]) == 4.0


def test_each_run_logs_into_a_tensorboard_run_of_its_own(tiny_train_args, tmp_path, monkeypatch):
    import library.train.trainer as trainer_module

    stamps = iter(["20261205100000", "20261205100001"])
    monkeypatch.setattr(trainer_module.time, "strftime", lambda _: next(stamps))
    logs = tmp_path / "logs"
    for run in ("a", "b"):
        args = tiny_train_args + ["--max_train_steps", "1", "--logging_dir", str(logs), "--output_dir",
                                  str(tmp_path / run)]
        assert train_entry("lora", "", args) == 0
    assert sorted(p.name for p in logs.iterdir()) == ["lora-20261205100000", "lora-20261205100001"]


def test_tensorboard_has_sd_scripts_curves(tiny_train_args, tmp_path):
    """A kohya user's dashboard reads loss/current, loss/average, loss/epoch_average and lr/unet, lr/textencoder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.train.trainer import train

    logs = tmp_path / "logs"
    # 24 members in batches of 4: 6 steps an epoch, 9 steps = one and a half epochs; every step logged
    args = tiny_train_args + ["--max_train_steps", "9", "--log_every_n_steps", "1", "--logging_dir", str(logs),
                              "--text_encoder_lr", "1e-5"]
    record = json.loads(train(parse_config(TrainConfig, args), "lora").record_path.read_text())
    events = EventAccumulator(str(next(logs.iterdir()))).Reload()
    scalar = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    current = [value for _, value in scalar["loss/current"]]
    assert [step for step, _ in scalar["loss/current"]] == list(range(1, 10))
    average = [value for _, value in scalar["loss/average"]]
    assert average[5] == pytest.approx(sum(current[:6]) / 6, rel=1e-6)  # the last epoch's worth of steps ...
    assert average[8] == pytest.approx(sum(current[3:9]) / 6, rel=1e-6)  # ... a moving window, as sd-scripts'
    assert scalar["loss/epoch_average"] == [(1, pytest.approx(sum(current[:6]) / 6, rel=1e-6))]  # at the epoch
    assert current[5] == pytest.approx(record["epochs"][0]["l_ada"], rel=1e-6)
    assert [v for _, v in scalar["lr/unet"]] == pytest.approx([1e-3] * 9)
    assert [v for _, v in scalar["lr/textencoder"]] == pytest.approx([1e-5] * 9)


def test_a_resumed_runs_loss_curves_cover_the_steps_before_the_resume(tiny_train_args, tmp_path):
    """6 steps an epoch, resumed at step 3: loss/epoch_average of epoch 1 and loss/average are the uninterrupted
    run's (the state keeps the losses they are means of); an older state without them resumes as before, with epoch
    1's average over steps 4-6 only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from library.train.checkpoint import STATE_FILE
    from library.train.trainer import train

    def curves(name: str, *extra: str) -> dict[str, list[tuple[int, float]]]:
        args = tiny_train_args + ["--max_train_steps", "9", "--log_every_n_steps", "1", "--save_every_n_steps", "3",
                                  "--save_state", "--logging_dir", str(tmp_path / f"logs-{name}"), "--output_dir",
                                  str(tmp_path / name), *extra]
        train(parse_config(TrainConfig, args), "lora")
        events = EventAccumulator(str(next((tmp_path / f"logs-{name}").iterdir()))).Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("loss/epoch_average", "loss/average",
                                                                                "loss/current")}

    full = curves("full")
    state = tmp_path / "full" / "lora-step00000003-state"
    resumed = curves("resumed", "--resume", str(state))
    assert resumed["loss/epoch_average"] == [(1, pytest.approx(full["loss/epoch_average"][0][1], rel=1e-6))]
    assert [v for _, v in resumed["loss/average"]] == pytest.approx([v for _, v in full["loss/average"][3:]], rel=1e-6)
    older = tmp_path / "older-state"
    shutil.copytree(state, older)
    kept = torch.load(older / STATE_FILE, weights_only=True)
    del kept["loss_recorder"]
    torch.save(kept, older / STATE_FILE)
    old = curves("old", "--resume", str(older))
    assert old["loss/epoch_average"] == [(1, pytest.approx(sum(v for _, v in old["loss/current"][:3]) / 3, rel=1e-6))]


def test_the_loss_curves_follow_the_methods_objective_and_each_epoch_averages_its_own_steps():
    """SMP-LoRA's loss/current is Eq. 10's loss, not L_ada; an epoch's average must not carry the earlier epochs'."""
    from library.train.loss_recorder import LossRecorder

    recorder = LossRecorder(steps_per_epoch=2)
    assert recorder.add({"l_ada": 1.0, "loss": 2.0})["loss/current"] == 2.0
    assert recorder.add({"l_ada": 4.0}) == {"loss/current": 4.0, "loss/average": 3.0}  # plain LoRA logs L_ada only
    assert recorder.add({"grad_norm": 1.0}) == {}
    assert recorder.end_epoch() == {"loss/epoch_average": 3.0}
    recorder.add({"loss": 10.0})
    assert recorder.end_epoch() == {"loss/epoch_average": 10.0}
    assert recorder.end_epoch() == {}  # no step ended in that epoch
    # --gradient_accumulation_steps past an epoch's batches: no whole step an epoch, still a window of one
    assert LossRecorder(steps_per_epoch=0).add({"loss": 5.0}) == {"loss/current": 5.0, "loss/average": 5.0}


def test_the_plan_counts_only_the_parameters_that_train(tiny_train_args, capsys):
    import re

    def count(*extra: str) -> int:
        assert train_entry("lora", "", tiny_train_args + [*extra, "--dry_run"]) == 0
        return int(re.search(r"([\d,]+) trained parameters", capsys.readouterr().out).group(1).replace(",", ""))

    both, unet_only, text_only = count(), count("--text_encoder_lr", "0"), count("--unet_lr", "0")
    assert 0 < text_only < both and 0 < unet_only < both and text_only + unet_only == both


# ---- 10: lambda so large that SMP-LoRA cannot train -------------------------------------------------------
def test_huge_privacy_lambda_warns_in_one_line(tiny_train_args, capsys):
    assert train_entry("smp_lora", "", tiny_train_args + ["--privacy_lambda", "1e9", "--dry_run"]) == 0
    assert "privacy_lambda" in one_line(capsys, starts="warning:")
    assert train_entry("smp_lora", "", tiny_train_args + ["--privacy_lambda", "100", "--dry_run"]) == 0
    assert capsys.readouterr().err == ""


def test_privacy_settings_given_to_plain_lora_are_one_warning(tiny_train_args, tmp_path, capsys, monkeypatch):
    smp_toml = tmp_path / "smp.toml"
    smp_toml.write_text("[privacy]\nprivacy_lambda = 0.5\nattacker_features = 'loss'\n")
    assert train_entry("lora", "", tiny_train_args + ["--config_file", str(smp_toml), "--k_steps", "2",
                                                      "--dry_run"]) == 0
    line = one_line(capsys, starts="warning:")
    assert "privacy_lambda" in line and "attacker_features" in line and "k_steps" in line and "lora ignores" in line
    assert train_entry("lora", "", tiny_train_args + ["--dry_run"]) == 0
    assert capsys.readouterr().err == ""
    # In a multi-process launch only the main process (RANK 0) says it: one line per run, not one per process.
    monkeypatch.setenv("RANK", "1")
    assert train_entry("lora", "", tiny_train_args + ["--config_file", str(smp_toml), "--dry_run"]) == 0
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("method,extra,expected", [
    ("smp_lora", ["--relaxloss_alpha", "0.5", "--dp_noise_multiplier", "3"], "(train_dp_lora.py) only act on"),
    ("lora", ["--prior_loss_weight", "0.5"], "only act with --with_prior_preservation"),
    ("lora", ["--caption_extension", ".caption"], "captions come from the manifest"),
])
def test_settings_another_method_or_mode_reads_are_one_warning(tiny_train_args, capsys, method, extra, expected):
    assert train_entry(method, "", tiny_train_args + extra + ["--dry_run"]) == 0
    assert expected in one_line(capsys, starts="warning:")


def test_prior_settings_warn_only_without_prior_preservation(capsys):
    """With --with_prior_preservation the class settings are read: no "only act with" warning for them."""
    from library.train.config_scope import check_for_method

    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json",
                                        "--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a dog",
                                        "--prior_loss_weight", "0.5"])
    check_for_method(config, "lora")
    assert "warning:" not in capsys.readouterr().err


def test_the_attacker_phases_order_and_steps_are_proxy_attacker_options(capsys):
    """update_order and k_steps shape Algorithm 1's attacker phase only: plain LoRA warns that it ignores them,
    and a resume of it may change them (an SMP-LoRA resume may not)."""
    from library.train.config_scope import check_for_method, inert_settings

    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json",
                                        "--update_order", "lora_first", "--k_steps", "2"])
    check_for_method(config, "lora")
    assert "k_steps, update_order only act on MP/SMP-LoRA's proxy attacker" in one_line(capsys, starts="warning:")
    assert {"update_order", "k_steps"} <= inert_settings(config, "lora")
    assert not {"update_order", "k_steps"} & inert_settings(config, "smp_lora")


def test_what_a_run_never_reads_may_change_at_its_resume():
    """The proxy restart period without restarts, the LoRA shape of a full fine-tune or of --dim_from_weights, and
    the attacker of plain LoRA are inert; the same settings are read (not inert) where they act."""
    from library.train.config_scope import ATTACKER_FIELDS, inert_settings

    base = ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json"]
    lora = parse_config(TrainConfig, base)
    assert "attacker_restart_every_n_epochs" in inert_settings(lora, "smp_lora")
    assert ATTACKER_FIELDS <= inert_settings(lora, "lora")
    assert inert_settings(lora, "smp_lora") & ATTACKER_FIELDS == {"attacker_restart_every_n_epochs"}  # no restarts
    assert not {"network_dim", "network_alpha"} & inert_settings(lora, "lora")
    restarted = parse_config(TrainConfig, base + ["--attacker_restart", "warm"])
    assert "attacker_restart_every_n_epochs" not in inert_settings(restarted, "smp_lora")
    assert {"network_dim", "network_module"} <= inert_settings(parse_config(TrainConfig, base + ["--train_mode", "full"]),
                                                                "lora")
    continued = parse_config(TrainConfig, base + ["--network_weights", "a.safetensors"])
    assert "network_dim" not in inert_settings(continued, "lora")  # the rank is checked against the file's


# ---- 11: conditioning in the metadata --------------------------------------------------------------------------
def test_lora_metadata_records_the_conditioning(finished_run, tiny_train_args):
    with safe_open(finished_run[1] / "lora.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_clip_skip"] == "1" and meta["ss_max_token_length"] == "None"
    assert meta["ss_resolution"] == "(32, 32)" and meta["modelspec.resolution"] == "32x32"
    assert meta["ss_v_parameterization"] == "False"
    config = parse_config(TrainConfig, tiny_train_args + ["--clip_skip", "2", "--max_token_length", "225"])
    paper = conditioning_metadata(config)
    assert paper["ss_clip_skip"] == "2" and paper["ss_max_token_length"] == "225"


# ---- 12 and the dry-run plan --------------------------------------------------------------------------------
def test_allow_pickle_reaches_the_loader(tiny_train_args, capsys, monkeypatch):
    seen = {}

    def fake_loader(path, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr("library.train.setup.load_sd_model", fake_loader)
    for extra, expected in (([], False), (["--allow_pickle"], True)):
        assert train_entry("lora", "", tiny_train_args + extra) == 2
        assert one_line(capsys) == "error: stop here" and seen["allow_pickle"] is expected


def test_a_dry_run_creates_no_output_folder(tiny_train_args, tmp_path):
    """--dry_run writes nothing: a mistyped --output_dir or --logging_dir must not be left behind as a new folder."""
    out, logs = tmp_path / "new" / "out", tmp_path / "logs"
    assert train_entry("lora", "", tiny_train_args + ["--dry_run", "--output_dir", str(out), "--logging_dir",
                                                      str(logs)]) == 0
    assert not (tmp_path / "new").exists() and not logs.exists()


def test_dry_run_names_what_decides_the_length(tiny_train_args, capsys):
    assert train_entry("lora", "", tiny_train_args + ["--dry_run"]) == 0
    assert "set by max_train_steps = 4" in capsys.readouterr().out
    assert train_entry("lora", "", tiny_train_args + ["--dry_run", "--max_train_epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "set by max_train_epochs = 2; max_train_steps is ignored" in out
    assert math.isfinite(float(out.split(" optimisation steps")[0].split()[-1]))


# ---- a diverging run: its last good LoRA is a good one ----------------------------------------------------
def test_non_finite_gradients_stop_before_the_step_and_keep_the_weights_of_the_last_one(
        finished_run, tmp_path, capsys, monkeypatch):
    """A finite loss can still give non-finite gradients (an overflow in the backward pass, DP-SGD's noise); the
    optimizer step would write them into the weights, and the "last good" file would be all NaN."""
    from safetensors.torch import load_file

    from library.train.collectives import Collectives

    base, _ = finished_run
    one = tmp_path / "one"
    assert train_entry("lora", "", base + ["--max_train_steps", "1", "--output_dir", str(one)]) == 0
    calls = []
    reduce_gradients = Collectives.reduce_gradients

    def overflowing_second_step(self, params):  # the second step's gradients overflow
        calls.append(1)
        if len(calls) == 2:
            next(p for p in params if p.grad is not None).grad.view(-1)[0] = float("inf")
        return reduce_gradients(self, params)

    monkeypatch.setattr(Collectives, "reduce_gradients", overflowing_second_step)
    out = tmp_path / "diverged"
    assert train_entry("lora", "", base + ["--max_train_steps", "3", "--output_dir", str(out)]) == 2
    line = one_line(capsys)
    assert "step 1: non-finite gradients" in line and "clip" not in line and "privacy_lambda" not in line, line
    kept = load_file(out / "lora-last-good.safetensors")
    reference = load_file(one / "lora.safetensors")
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert all(torch.equal(kept[key], reference[key]) for key in reference)  # the weights after step 1


@pytest.mark.parametrize("method, flags, says, not_said", [
    ("lora", [], "Lower the learning rate.", ["privacy_lambda", "fp16", "dp_clip_norm"]),
    ("smp_lora", ["--mixed_precision", "fp16"], "Lower the learning rate or privacy_lambda, or use mixed_precision "
     "bf16/no instead of fp16.", ["dp_clip_norm"]),
    ("dp_lora", ["--max_grad_norm", "0"], "Lower the learning rate or dp_clip_norm / dp_noise_multiplier, clip "
     "gradients (max_grad_norm 1).", ["privacy_lambda"]),
])
def test_divergence_advice_fits_the_run(method, flags, says, not_said):
    from types import SimpleNamespace

    from library.train.divergence import advice
    from library.train.methods import method_class

    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s"] + flags)
    text = advice(SimpleNamespace(config=config, method_class=method_class(method)))  # the class, not its name
    assert text == says and not any(word in text for word in not_said)


@pytest.mark.parametrize("flags, says", [
    (["--learning_rate", "1e38"], "step 0: the optimizer step overflowed float32"),
    (["--attacker_lr", "1e38"], "the proxy attacker's optimizer step overflowed float32"),
])
def test_a_rate_that_overflows_the_optimizer_is_one_line(tiny_train_args, tmp_path, capsys, flags, says):
    """1e38 is finite and passes validation, but AdamW divides it by 1 - beta1 = 0.1: torch's RuntimeError from
    inside the optimizer, before any weight moved."""
    from safetensors.torch import load_file

    out = tmp_path / "overflow"
    args = tiny_train_args + ["--attacker_batch_size", "2", "--output_dir", str(out), *flags]
    assert train_entry("smp_lora", "", args) == 2
    line = one_line(capsys)
    assert says in line and flags[0][2:] in line, line
    if flags[0] == "--learning_rate":
        assert all(torch.isfinite(t).all() for t in load_file(out / "smp_lora-last-good.safetensors").values())


def test_the_last_good_lora_is_kept_in_float32_whatever_the_save_precision(tiny_train_args, tmp_path, capsys):
    """Weights that grew past fp16's range on their way to diverging were kept as inf under --save_precision fp16."""
    from safetensors.torch import load_file

    out = tmp_path / "diverged"
    args = tiny_train_args + ["--learning_rate", "1e25", "--max_grad_norm", "0", "--save_precision", "fp16",
                              "--max_train_steps", "6", "--output_dir", str(out)]
    assert train_entry("lora", "", args) == 2
    line = one_line(capsys)
    assert "The last good LoRA was kept (in float32)" in line and ". The last" in line, line
    kept = load_file(out / "lora-last-good.safetensors")
    assert {t.dtype for t in kept.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in kept.values())
    assert max(t.abs().max().item() for t in kept.values()) > 65504  # what fp16 would have made inf


def _doubling_trainer(prior_in_objective: bool, monkeypatch):
    """A stand-in trainer for :mod:`library.train.divergence`: its method's loss is twice L_ada, and saving the last
    good LoRA only names the file."""
    from types import SimpleNamespace

    import library.train.divergence as divergence
    from library.train.methods import method_class

    monkeypatch.setattr(divergence.artifacts, "save_last_good", lambda trainer: None)
    monkeypatch.setattr(divergence.artifacts, "last_good_path", lambda trainer: "out/x-last-good.safetensors")

    def lora_loss(ctx, result):
        loss = 2 * result.adaptation_loss()
        return loss, {"l_ada": result.adaptation_loss().item(), "loss": loss.item()}

    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s"])
    config.prior_in_objective = prior_in_objective
    return SimpleNamespace(config=config, method=SimpleNamespace(lora_loss=lora_loss),
                           method_class=method_class("lora"), global_step=7)


@pytest.mark.parametrize("in_objective, loss", [(True, 2 * (3.0 + 0.5)), (False, 2 * 3.0 + 0.5)])
def test_the_prior_term_goes_into_the_methods_objective_or_is_added_after_it(in_objective, loss, monkeypatch):
    """DreamBooth's prior term enters the loss once: inside Eq. 6/10 (--prior_in_objective) or added after it."""
    from library.train.divergence import checked_loss
    from library.train.methods import ForwardResult

    trainer = _doubling_trainer(in_objective, monkeypatch)
    zeros = torch.zeros(4, 1)
    result = ForwardResult(zeros, torch.tensor([1.0, 2.0, 3.0, 6.0]), zeros, zeros, prior_loss=torch.tensor(0.5))
    total, logs = checked_loss(trainer, None, result)
    assert total.item() == logs["loss"] == loss and logs["prior_loss"] == 0.5


def test_an_infinite_loss_stops_the_run_as_a_nan_one_does(monkeypatch):
    """+inf is no less a diverged run than NaN: the step after it would write NaN weights."""
    from library.errors import TrainingError
    from library.train.divergence import checked_loss
    from library.train.methods import ForwardResult

    trainer = _doubling_trainer(True, monkeypatch)
    zeros = torch.zeros(2, 1)
    with pytest.raises(TrainingError, match=r"^step 7: non-finite training loss .*Lower the learning rate"):
        checked_loss(trainer, None, ForwardResult(zeros, torch.tensor([1.0, float("inf")]), zeros, zeros))


def test_non_finite_gradients_under_fp16_are_left_to_the_gradient_scaler(monkeypatch):
    """fp16's scaler skips an overflowing step and lowers its scale: a routine event there, not a diverged run."""
    from types import SimpleNamespace

    from library.errors import TrainingError
    from library.train.divergence import check_gradient_norm

    trainer = _doubling_trainer(True, monkeypatch)
    trainer.grad_scaler = SimpleNamespace(is_enabled=lambda: True)
    check_gradient_norm(trainer, float("inf"))
    trainer.grad_scaler = SimpleNamespace(is_enabled=lambda: False)
    check_gradient_norm(trainer, 1.0)
    with pytest.raises(TrainingError, match=r"^step 7: non-finite gradients \(norm nan\)"):
        check_gradient_norm(trainer, float("nan"))


def test_a_stop_line_ends_the_reason_with_a_full_stop_before_naming_the_last_good_lora(monkeypatch):
    """A reason without one (SMP-LoRA's refusal) must not run on into "... checkpoint The last good LoRA"."""
    from library.errors import TrainingError
    from library.train.divergence import stop

    trainer = _doubling_trainer(True, monkeypatch)
    for what in ("resume from the last checkpoint", "resume from the last checkpoint.  "):
        with pytest.raises(TrainingError) as stopped:
            stop(trainer, what)
        assert str(stopped.value) == ("step 7: resume from the last checkpoint. The last good LoRA was kept (in "
                                      "float32) as out/x-last-good.safetensors.")


def test_a_full_disk_at_a_state_save_is_one_line_and_the_earlier_files_survive(finished_run, tmp_path, capsys,
                                                                                monkeypatch):
    """torch's own writer under a real file-size limit (it raised a bare RuntimeError, a traceback), during the
    final save: the older state survives and the run is not marked finished (its record comes last)."""
    import resource

    import library.train.checkpoint as checkpoint

    base, out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    real_save = checkpoint.torch.save

    def save_past_the_limit(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            return real_save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    monkeypatch.setattr(checkpoint.torch, "save", save_past_the_limit)
    args = base + ["--max_train_steps", "3", "--save_state", "--resume", str(out / "lora-state"),
                   "--output_dir", str(out)]
    assert train_entry("lora", "", args) == 2
    line = one_line(capsys)
    assert f"cannot write {out / 'lora-state'}: File too large" in line, line
    assert f"the newest state of this run is {out / 'lora-state'}: the same command with --resume latest" in line
    after = snapshot(out)
    assert after["lora-state/state.pt"] == before["lora-state/state.pt"]  # the older state is the one to resume
    assert "lora.json" not in after  # not finished: --resume latest continues from lora-state


def test_overwrite_with_resume_latest_replaces_a_run_of_other_settings_and_a_refusal_keeps_it(finished_run,
                                                                                                 tmp_path, capsys):
    """The launchers' retrain on another split is `--overwrite --resume latest`: the newest state there is the
    replaced run's, which this run cannot resume. It was refused, after the old run's record had been deleted,
    and every rerun failed the same way; now a new run starts. A refused --overwrite changes nothing."""
    base, out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    refused = base + ["--max_train_steps", "2", "--seed", "7", "--overwrite", "--output_dir", str(out)]
    assert train_entry("lora", "", refused + ["--resume", str(out / "lora-state")]) == 2
    assert "it was trained with seed = " in one_line(capsys)
    assert snapshot(out) == before  # the finished run's record is still there
    assert train_entry("lora", "", refused + ["--save_state", "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "--resume latest: lora-state is the replaced run's (it was trained with seed = " in printed
    assert "--overwrite starts a new run" in printed
    assert json.loads((out / "lora.json").read_text())["config"]["seed"] == 7
    # the same command again continues the new run's own state (same settings): no new run this time
    assert train_entry("lora", "", refused + ["--save_state", "--resume", "latest"]) == 0
    assert f"--resume latest: resuming from {out / 'lora-state'}" in capsys.readouterr().out


def test_resume_latest_without_overwrite_refuses_a_state_of_other_settings(finished_run, tmp_path, capsys):
    """Only --overwrite turns a newest state this run cannot resume into a new run: without it, --resume latest
    refuses it as --resume <state> does, and the folder is left as it was."""
    base, out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    args = base + ["--max_train_steps", "2", "--seed", "7", "--output_dir", str(out), "--resume", "latest"]
    assert train_entry("lora", "", args) == 2
    assert "cannot resume from" in (line := one_line(capsys)) and "it was trained with seed = " in line, line
    assert snapshot(out) == before


def test_another_process_count_resumes_with_the_same_total_batch_only(finished_run, tmp_path, capsys):
    """Per-process batches were compared: 1 x 4 -> 2 x 2 (the same total) was refused, 1 x 4 -> 2 x 4 (double) ran.
    A state written by 2 processes at batch 2 is simulated by its summary (what check_resume reads)."""
    base, out = copy_run(finished_run, tmp_path)  # 1 process, train_batch_size 4
    summary_file = out / "lora-state" / "train_state.json"
    summary = json.loads(summary_file.read_text())
    assert summary["identity"]["total_batch"] == 4
    args = base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--dry_run"]
    assert train_entry("lora", "", args + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "a")]) == 2
    assert "total_batch = 4, this run has 2" in (line := one_line(capsys)) and "number of processes" in line
    summary["identity"]["total_batch"] = 8  # as 2 processes x 4 wrote it
    summary_file.write_text(json.dumps(summary))
    assert train_entry("lora", "", args + ["--output_dir", str(tmp_path / "b")]) == 2
    assert "total_batch = 8, this run has 4" in one_line(capsys)
    summary["identity"]["total_batch"], summary["config"]["train_batch_size"] = 4, 2  # as 2 processes x 2 wrote it
    summary_file.write_text(json.dumps(summary))
    assert train_entry("lora", "", args + ["--output_dir", str(tmp_path / "c")]) == 0


def test_continuing_a_lora_never_drops_its_text_encoder_part_in_silence(finished_run, tmp_path, capsys):
    """A run that trains no text-encoder LoRA threw the continued file's lora_te_* weights away, and still named the
    file as its parent; refused as --dim_from_weights refuses it."""
    base, out = copy_run(finished_run, tmp_path)
    parent = ["--network_weights", str(out / "lora.safetensors"), "--output_dir", str(tmp_path / "next"), "--dry_run"]
    for flags in (["--network_train_unet_only"], ["--text_encoder_lr", "0"]):
        assert train_entry("lora", "", base + parent + flags) == 2
        line = one_line(capsys)
        assert "has a text-encoder part (lora_te_" in line and "--no-network_train_unet_only" in line, line
    assert train_entry("lora", "", base + parent) == 0  # training it too continues the whole file


def test_dim_from_weights_never_drops_a_text_encoder_part_either(finished_run, tmp_path, capsys):
    """--dim_from_weights in a run that trains no text-encoder LoRA: the file's lora_te_* part is refused, not built
    frozen beside the UNet's and saved as if it had been continued."""
    base, out = copy_run(finished_run, tmp_path)
    args = base + ["--network_weights", str(out / "lora.safetensors"), "--dim_from_weights", "--network_train_unet_only",
                   "--output_dir", str(tmp_path / "next"), "--dry_run"]
    assert train_entry("lora", "", args) == 2
    assert "adapts the text encoder, which this network does not include" in capsys.readouterr().err


def test_an_overwrite_that_replaces_a_continued_run_does_not_inherit_its_lora_record(finished_run, tmp_path, capsys):
    """--overwrite --resume latest over a run that continued a LoRA starts from scratch: naming that LoRA's splits
    as its parent would make evaluate_mia.py hold the new LoRA to splits it never trained on."""
    base, out = finished_run
    child = tmp_path / "child"
    continued = base + ["--max_train_steps", "1", "--save_state", "--output_dir", str(child)]
    assert train_entry("lora", "", continued + ["--network_weights", str(out / "lora.safetensors")]) == 0
    assert train_entry("lora", "", continued + ["--seed", "7", "--overwrite", "--resume", "latest"]) == 0
    assert "lora-state is the replaced run's" in capsys.readouterr().out
    with safe_open(child / "lora.safetensors", "pt") as handle:
        assert "smp_lora.parent_split_sha256" not in handle.metadata()


def test_a_resume_without_prior_preservation_may_change_the_class_image_count(finished_run, tmp_path):
    """--num_class_images is read only with --with_prior_preservation: the identity records 0 class images
    without it, so a resume that changes the unused count is no other run."""
    base, out = finished_run
    assert train_entry("lora", "", base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"),
                                           "--num_class_images", "7", "--dry_run",
                                           "--output_dir", str(tmp_path / "r")]) == 0


def test_a_resume_from_another_loras_weights_than_its_state_started_from_is_refused(finished_run, tmp_path, capsys):
    """The state's weights came from the LoRA its record names: a resume naming another one as --network_weights
    would save them under that LoRA's splits, laundering which split they started from."""
    base, out = copy_run(finished_run, tmp_path)
    summary_file = out / "lora-state" / "train_state.json"
    summary = json.loads(summary_file.read_text())
    summary["identity"]["parent_splits"] = "0" * 64  # as a state continued from a LoRA of another split
    summary_file.write_text(json.dumps(summary))
    assert train_entry("lora", "", base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"),
                                           "--network_weights", str(out / "lora.safetensors"), "--dry_run",
                                           "--output_dir", str(tmp_path / "r")]) == 2
    assert "it was trained with parent_splits = '00000000" in one_line(capsys)


def test_a_failed_state_save_leaves_the_older_state_and_no_staging_folder(tmp_path, monkeypatch):
    """A save cut short (full disk, Ctrl-C) must not replace the older state, nor leave its half-written copy
    beside it (a state holds the whole optimizer: each failed save would keep one more)."""
    from library.train import checkpoint

    target = tmp_path / "run-state"
    checkpoint.save_state(target, {"w": torch.ones(1)}, {"global_step": 1})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_state(target, {"w": torch.zeros(1)}, {"global_step": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["run-state"]
    assert checkpoint.read_summary(target)["global_step"] == 1 and checkpoint.load_state(target)["w"].item() == 1


def test_a_resume_with_another_lr_scheduler_is_refused(finished_run, tmp_path, capsys):
    """The state's scheduler goes on with its own schedule: a resume naming another would train at the old rates
    while the LoRA's ss_lr_scheduler named the new one (a constant-rate state records no schedule length)."""
    base, out = finished_run
    assert train_entry("lora", "", base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"),
                                           "--lr_scheduler", "cosine", "--dry_run",
                                           "--output_dir", str(tmp_path / "r")]) == 2
    assert "lr_scheduler = 'constant', this run has 'cosine'" in one_line(capsys)


def test_a_resume_may_change_how_it_computes_logs_and_saves(finished_run, tmp_path, capsys, torch_defaults_restored):
    """Memory, speed, logging, saving and the files' own words (title, comment) change nothing that is trained: a
    resume that needs another setting to fit its machine, or another save cadence, must not be refused."""
    base, out = finished_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a digit\n")
    changes = ["--gradient_checkpointing", "--full_determinism", "--vae_batch_size", "2", "--latent_cache_dir",
               str(tmp_path / "cache"), "--logging_dir", str(tmp_path / "logs"), "--save_every_n_epochs", "1",
               "--save_last_n_epochs", "1", "--save_state", "--sample_prompts", str(prompts), "--sample_at_first",
               "--sample_steps", "2", "--progress_bar", "--allow_pickle", "--training_comment", "resumed",
               "--metadata_title", "a title"]
    assert train_entry("lora", "", base + ["--max_train_steps", "3", "--resume", str(out / "lora-state"), "--dry_run",
                                           "--output_dir", str(tmp_path / "r"), *changes]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("text,says", [('{"global_step": ', "is unreadable"), ("3", "is not a training-state summary"),
                                       ("[1, 2]", "is not a training-state summary")])
def test_a_cut_or_foreign_state_summary_is_one_refusal_naming_it(tmp_path, text, says):
    """A half-copied or foreign train_state.json must be the one-line refusal, not a JSON traceback at --resume."""
    from library.errors import TrainingError
    from library.train.checkpoint import read_summary

    (tmp_path / "train_state.json").write_text(text)
    with pytest.raises(TrainingError, match=f"cannot resume: .*train_state.json {says}"):
        read_summary(tmp_path)


def test_a_state_holding_objects_is_refused_not_unpickled(tmp_path):
    """--resume of a downloaded or tampered state must never build arbitrary objects (pickle runs their code)."""
    import argparse

    from library.errors import TrainingError
    from library.train.checkpoint import load_state, save_state

    save_state(tmp_path / "s", {"step": torch.tensor(3), "config": argparse.Namespace(seed=1)}, {"global_step": 3})
    with pytest.raises(TrainingError, match=r"cannot resume: .*state.pt is corrupt or not a training state"):
        load_state(tmp_path / "s")
    save_state(tmp_path / "s", {"step": torch.tensor(3), "rng": [1, 2]}, {"global_step": 3})
    assert load_state(tmp_path / "s")["rng"] == [1, 2]


def test_a_state_too_old_to_name_its_run_is_this_runs_only_by_its_name_and_a_dash(tmp_path):
    """``lora2-state`` (no summary: written before states named their run) is run ``lora2``'s: resuming it into
    the folder of the finished run ``lora`` must not pass as ``lora`` continuing its own state."""
    from types import SimpleNamespace

    from library.train.preflight import check_overwrite

    (tmp_path / "lora2-state").mkdir()
    (tmp_path / "lora2-state" / "state.pt").write_bytes(b"")
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"lora{suffix}").write_text("{}")
    trainer = SimpleNamespace(config=SimpleNamespace(overwrite=False, resume=str(tmp_path / "lora2-state")),
                              output_dir=tmp_path, output_name="lora", total_steps=2,
                              accelerator=SimpleNamespace(is_main_process=True))
    with pytest.raises(ConfigError, match="already holds the finished run lora.safetensors"):
        check_overwrite(trainer)


def test_a_refused_resume_of_a_finished_run_does_not_first_warn_it_will_replace_it(finished_run, tmp_path, capsys):
    """The warning that continuing a finished run replaces its LoRA came before the checks of the state, so a
    refused resume said both that the LoRA would be replaced and that nothing would run."""
    base, copy = copy_run(finished_run, tmp_path)
    common = base + ["--output_dir", str(copy), "--resume", str(copy / "lora-state"), "--max_train_steps", "3"]
    assert train_entry("lora", "", common + ["--seed", "7"]) == 2
    captured = capsys.readouterr()
    assert "it was trained with seed" in captured.err and "this continues the finished run" not in captured.out
    assert train_entry("lora", "", common + ["--dry_run"]) == 0  # a resume that goes ahead still says it
    assert "this continues the finished run lora.safetensors from step 2 to 3" in capsys.readouterr().out
