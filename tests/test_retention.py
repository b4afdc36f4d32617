"""Checkpoint retention (--save_last_n_*) and --resume latest: the pure choices, then runs on the tiny stack."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from library.config import parse_config
from library.errors import ConfigError
from library.train import retention
from library.train.config import TrainConfig
from library.train.trainer import Trainer, train


def run(args: list[str], method: str = "lora"):
    return train(parse_config(TrainConfig, args), method)


def test_epochs_keep_the_newest_n_saves_and_steps_keep_the_last_n_steps():
    assert retention.to_remove([10, 20, 30, 40], "epoch", 40, 2) == [10, 20]
    assert retention.to_remove([10, 20], "epoch", 20, 2) == []
    assert retention.to_remove([10, 20, 30, 50], "epoch", 30, 1) == [10, 20]  # 50: a later run's, not ours
    assert retention.to_remove([10, 20, 30], "epoch", 30, None) == []
    # sd-scripts' --save_last_n_steps is a distance: at step 600 with N = 250, 350 and older go
    assert retention.to_remove([200, 300, 350, 400, 600], "step", 600, 250) == [200, 300]


def test_checkpoint_names_round_trip_and_foreign_names_are_not_ours():
    assert retention.checkpoint_name("run", "epoch", 5) == "run-000005"
    assert retention.checkpoint_name("run", "step", 5) == "run-step00000005"
    assert retention.parse_checkpoint("run", "run-000005") == retention.Checkpoint("run-000005", "epoch", 5)
    assert retention.parse_checkpoint("run", "run-step00000005").cadence == "step"
    for other in ["run", "run-5", "run-last-good", "runx-000005", "other-000005", "run-000005-attacker"]:
        assert retention.parse_checkpoint("run", other) is None, other
    assert retention.parse_checkpoint("a.b", "aXb-000005") is None  # the name is not a regular expression


def test_latest_state_is_the_one_this_run_wrote_last(tmp_path):
    def state(name, step, written, run="run"):
        (tmp_path / name).mkdir()
        summary = tmp_path / name / "train_state.json"
        summary.write_text(json.dumps({"global_step": step, "output_name": run}))
        os.utime(summary, ns=(written, written))

    assert retention.latest_state(tmp_path, "run") is None
    state("run-000001-state", 6, 10**18)
    state("run-000002-state", 12, 2 * 10**18)
    state("run-step00000018-state", 18, 3 * 10**18)
    state("other-000009-state", 99, 9 * 10**18, run="other")  # another run's name
    state("run-000007-state", 42, 9 * 10**18, run="run-000007")  # another run named like a checkpoint of this one
    (tmp_path / "run-000009-state").mkdir()  # not a state (no summary)
    assert retention.latest_state(tmp_path, "run") == tmp_path / "run-step00000018-state"
    state("run-state", 60, 4 * 10**18)  # a finished run's final state ...
    assert retention.latest_state(tmp_path, "run") == tmp_path / "run-state"
    state("run-000003-state", 18, 5 * 10**18)  # ... replaced by an --overwrite retrain, killed after its epoch 3
    assert retention.latest_state(tmp_path, "run") == tmp_path / "run-000003-state"


def test_retention_deletes_older_checkpoints_and_keeps_the_final_ones(tiny_train_args, tmp_path):
    out = tmp_path / "kept"
    # 24 members in batches of 4: 6 steps an epoch, so 24 steps are 4 epochs and epochs 1-3 write checkpoints
    run(tiny_train_args + ["--max_train_steps", "24", "--save_every_n_epochs", "1", "--save_last_n_epochs", "2",
                           "--save_state", "--save_last_n_epochs_state", "1", "--output_dir", str(out)])
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["lora-000002.json", "lora-000002.safetensors", "lora-000003-state", "lora-000003.json",
                     "lora-000003.safetensors", "lora-state", "lora.json", "lora.safetensors"]
    # A run named like a checkpoint of another ("lora-000001") in the same folder is not that run's to delete
    run(tiny_train_args + ["--max_train_steps", "6", "--save_state", "--output_name", "lora-000001",
                           "--output_dir", str(out)])
    run(tiny_train_args + ["--max_train_steps", "18", "--save_every_n_epochs", "2", "--save_last_n_epochs", "1",
                           "--save_state", "--output_dir", str(out), "--overwrite"])  # prunes at epoch 2
    assert {"lora-000001.safetensors", "lora-000001.json", "lora-000001-state"} <= {p.name for p in out.iterdir()}
    steps = tmp_path / "steps"
    run(tiny_train_args + ["--max_train_steps", "8", "--save_every_n_steps", "2", "--save_last_n_steps", "3",
                           "--output_dir", str(steps)])
    assert sorted(p.name for p in steps.glob("lora-step*.safetensors")) == [
        "lora-step00000004.safetensors", "lora-step00000006.safetensors"]


def test_states_are_kept_as_the_files_are_unless_told_otherwise(tiny_train_args, tmp_path):
    """Without --save_last_n_steps_state, the step states follow --save_last_n_steps (sd-scripts' default): a long
    run does not pile up a state (a LoRA, its optimizer and RNGs) at every save."""
    steps = tmp_path / "steps"
    run(tiny_train_args + ["--max_train_steps", "8", "--save_every_n_steps", "2", "--save_last_n_steps", "3",
                           "--save_state", "--output_dir", str(steps)])
    assert sorted(p.name for p in steps.glob("lora-step*")) == [
        "lora-step00000004-state", "lora-step00000004.json", "lora-step00000004.safetensors",
        "lora-step00000006-state", "lora-step00000006.json", "lora-step00000006.safetensors"]


def test_a_state_count_alone_prunes_the_states_and_keeps_every_file(tiny_train_args, tmp_path):
    """--save_last_n_steps_state without --save_last_n_steps: the old states go (the large part), every LoRA stays."""
    run(tiny_train_args + ["--max_train_steps", "8", "--save_every_n_steps", "2", "--save_last_n_steps_state", "1",
                           "--save_state", "--output_dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.glob("lora-step*-state")) == ["lora-step00000006-state"]
    assert len(list(tmp_path.glob("lora-step*.safetensors"))) == 3


def test_retention_without_the_saves_it_prunes_is_one_warning(tiny_train_args, capsys):
    parse_config(TrainConfig, tiny_train_args + ["--save_last_n_epochs", "2"])  # sd-scripts ignores it: so do we
    assert "warning: 'save_last_n_epochs' prunes the checkpoints of 'save_every_n_epochs'" in capsys.readouterr().err
    parse_config(TrainConfig, tiny_train_args + ["--save_every_n_steps", "2", "--save_last_n_steps_state", "1"])
    err = capsys.readouterr().err
    assert "warning: 'save_last_n_steps_state' prunes" in err and "and 'save_state'" in err
    with pytest.raises(ConfigError, match="'save_last_n_epochs' must be > 0"):
        parse_config(TrainConfig, tiny_train_args + ["--save_every_n_epochs", "1", "--save_last_n_epochs", "0"])


def test_resume_latest_continues_a_killed_run_exactly(tiny_train_args, tmp_path, monkeypatch, capsys):
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "18", "--save_every_n_epochs",
                                "1", "--save_state", "--save_last_n_epochs_state", "1"]
    whole = run(common + ["--output_dir", str(tmp_path / "whole")], "smp_lora")

    killed = tmp_path / "killed"
    original_step = Trainer.step

    def step_until_killed(self):
        if self.global_step == 15:  # in epoch 3, after the states of epochs 1 and 2
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(Trainer, "step", step_until_killed)
    with pytest.raises(KeyboardInterrupt):
        run(common + ["--resume", "latest", "--output_dir", str(killed)], "smp_lora")
    assert "no state of this run yet, starting a new run" in capsys.readouterr().out
    assert [p.name for p in killed.glob("*-state")] == ["smp_lora-000002-state"]  # epoch 1's was pruned
    steps_taken: list[int] = []

    def counted_step(self):
        steps_taken.append(self.global_step)
        return original_step(self)

    monkeypatch.setattr(Trainer, "step", counted_step)
    resumed = run(common + ["--resume", "latest", "--output_dir", str(killed)], "smp_lora")
    assert f"resuming from {killed / 'smp_lora-000002-state'}" in capsys.readouterr().out
    assert steps_taken == list(range(12, 18))  # from epoch 2's state on, not from the start
    for produced, expected in [(resumed.weights_path, whole.weights_path), (resumed.attacker_path, whole.attacker_path)]:
        a, b = load_file(produced), load_file(expected)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run_says_its_lora_will_be_replaced(tiny_train_args, tmp_path, capsys):
    out = tmp_path / "extended"
    common = tiny_train_args + ["--save_state", "--resume", "latest", "--output_dir", str(out)]
    run(common + ["--max_train_steps", "2"])
    capsys.readouterr()
    run(common + ["--max_train_steps", "4"])  # sd-scripts replaces the step-2 LoRA in silence
    assert "warning: this continues the finished run lora.safetensors from step 2 to 4; its LoRA and run record are " \
           "replaced when it ends: copy lora.safetensors now" in capsys.readouterr().out
    run(common + ["--max_train_steps", "4"])  # nothing left to train: the same file again, nothing to warn about
    assert "warning: this continues" not in capsys.readouterr().out


def test_a_full_fine_tune_checkpoint_goes_with_its_model_folders(tiny_train_args, tmp_path):
    out = tmp_path / "full"
    run(tiny_train_args + ["--train_mode", "full", "--learning_rate", "1e-5", "--max_train_steps", "4",
                           "--train_text_encoder", "--save_every_n_steps", "1", "--save_last_n_steps", "1",
                           "--output_dir", str(out)])
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("lora-step"))
    # at step 3, "the last 1 step" keeps steps 2 and 3; step 1's file, record and model folders are gone
    assert kept == [f"lora-step0000000{s}{suffix}" for s in (2, 3)
                    for suffix in ("-text_encoder", "-unet", ".json", ".safetensors")]


def test_a_pruned_checkpoint_takes_its_record_and_its_attacker_file_with_it(tmp_path):
    """Left behind, a pruned checkpoint's run record and proxy-attacker file fill the disk and name a LoRA that
    is gone (only smp_lora-like methods write the attacker file, which the tiny plain-LoRA runs never show)."""
    from library.fileio import write_safetensors

    for step in (2, 4, 6):
        name = retention.checkpoint_name("run", "step", step)
        write_safetensors(tmp_path / f"{name}.safetensors", {"w": torch.zeros(1)}, {"ss_output_name": "run"})
        write_safetensors(tmp_path / f"{name}-attacker.safetensors", {"w": torch.zeros(1)})
        (tmp_path / f"{name}.json").write_text("{}")
    removed = retention.prune(tmp_path, "run", "step", 6, retention.Retention(files=2, states=None),
                              lambda folder, name: (folder / f"{name}.safetensors").unlink())
    assert removed == ["run-step00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"run-step0000000{step}{suffix}" for step in (4, 6)
        for suffix in ("-attacker.safetensors", ".json", ".safetensors")]


def test_resume_latest_takes_a_state_too_old_to_name_its_run_by_its_folder_name(tmp_path):
    """A state written before summaries named their run is this run's by its name: skipping it, --resume latest
    would start the run over instead of continuing it."""
    (tmp_path / "run-000002-state").mkdir()
    (tmp_path / "run-000002-state" / "train_state.json").write_text(json.dumps({"global_step": 12}))
    assert retention.latest_state(tmp_path, "run") == tmp_path / "run-000002-state"


def test_a_later_runs_checkpoint_one_past_the_current_one_is_kept():
    """A checkpoint numbered above the current one is a later run's leftover (an --overwrite retrain that is
    shorter): retention counts and deletes only what this run has reached."""
    assert retention.to_remove([1, 2, 3, 4], "epoch", 3, 1) == [1, 2]
    assert retention.to_remove([2, 4, 6, 7], "step", 6, 2) == [2]


def test_step_retention_leaves_the_epoch_states_alone(tmp_path):
    """A run saving states at epochs and at steps prunes each cadence by its own rule: an epoch state's number is
    no step, and pruning it as one deleted a folder that is not there (the run crashed mid-training)."""
    for name in ("run-000001-state", "run-step00000002-state", "run-step00000006-state"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.json").write_text(json.dumps({"output_name": "run"}))
    removed = retention.prune(tmp_path, "run", "step", 6, retention.Retention(files=None, states=2),
                              lambda folder, name: None)
    assert removed == ["run-step00000002-state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-000001-state", "run-step00000006-state"]


def test_a_prune_killed_while_deleting_a_state_leaves_no_half_state(tmp_path, monkeypatch):
    """A kill (here: the first file deleted, then Ctrl-C) while --save_last_n_*_state deletes an old state must not
    leave a visible half state: one without its summary is no state to --resume latest or to a later prune, so
    its state.pt (a whole UNet in a full fine-tune) would stay on disk for good. The state goes aside first, as a
    hidden temporary that the next run's lock sweeps."""
    from library.outputs import remove_stale_temporaries
    from library.train import checkpoint

    for step in (2, 6):
        checkpoint.save_state(tmp_path / f"{retention.checkpoint_name('run', 'step', step)}-state",
                              {"w": torch.zeros(1)}, {"global_step": step, "output_name": "run"})
    real_unlink, deleted = os.unlink, []

    def unlink_then_killed(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        deleted.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "unlink", unlink_then_killed)
    with pytest.raises(KeyboardInterrupt):
        retention.prune(tmp_path, "run", "step", 6, retention.Retention(files=None, states=1), lambda *_: None)
    monkeypatch.undo()
    assert deleted  # the kill came inside the deletion
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["run-step00000006-state"]
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-step00000006-state"]


def test_a_prune_killed_midway_is_finished_by_the_next_one(tmp_path, monkeypatch):
    """A checkpoint is known by its weights file: deleted first, a kill right after it orphaned the checkpoint's run
    record and proxy file, which no later prune saw again. Deleted last, the next prune finishes the job."""
    from library.fileio import write_safetensors

    for step in (2, 4, 6):
        name = retention.checkpoint_name("run", "step", step)
        write_safetensors(tmp_path / f"{name}.safetensors", {"w": torch.zeros(1)}, {"ss_output_name": "run"})
        write_safetensors(tmp_path / f"{name}-attacker.safetensors", {"w": torch.zeros(1)})
        (tmp_path / f"{name}.json").write_text("{}")
    real_unlink = os.unlink

    def unlink_then_killed(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        raise KeyboardInterrupt

    keep = retention.Retention(files=2, states=None)
    remove = lambda folder, name: (folder / f"{name}.safetensors").unlink()  # noqa: E731 - what LoRAs remove
    monkeypatch.setattr(os, "unlink", unlink_then_killed)
    with pytest.raises(KeyboardInterrupt):
        retention.prune(tmp_path, "run", "step", 6, keep, remove)
    monkeypatch.undo()
    retention.prune(tmp_path, "run", "step", 6, keep, remove)  # the next checkpoint's prune
    assert not [p.name for p in tmp_path.iterdir() if "step00000002" in p.name]
