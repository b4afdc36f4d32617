"""The one-line run plan (:mod:`library.train.run_plan`): what a user reads before anything costly."""

from __future__ import annotations

from pathlib import Path

from library.config import parse_config
from library.train.config import TrainConfig
from library.train.data import LabelledSet
from library.train.run_plan import describe_run
from library.train.samplers import EpochCyclingSampler


def _plan(tmp_path: Path, extra: list[str], *, images: int = 10, distinct: int = 10, batch: int = 4,
          world_size: int = 1, trained: int = 1000, total_steps: int = 6) -> str:
    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", str(tmp_path / "model"),
                                        "--train_data_dir", str(tmp_path / "data"), "--output_dir",
                                        str(tmp_path / "out"), "--train_batch_size", str(batch), *extra])
    members = LabelledSet([tmp_path / f"{i % distinct}.png" for i in range(images)], ["a digit"] * images)
    sampler = EpochCyclingSampler(images, batch, seed=0, world_size=world_size)
    return describe_run(config, method_name="smp_lora", trained_kind="lora", trained_parameters=trained,
                        sampler=sampler, total_steps=total_steps, world_size=world_size, members=members,
                        class_images_ready=True, output=tmp_path / "out" / "mine.safetensors")


def test_plan_names_budget_output_and_memory(tmp_path):
    plan = _plan(tmp_path, ["--max_train_steps", "6"], trained=2**27)
    assert plan.startswith("method smp_lora: 134,217,728 trained parameters (lora; ~2.00 GiB")  # 16 bytes each
    assert "10 member images," in plan and "batch 4 x 1 process(es), 2 batches/epoch" in plan
    assert "6 optimisation steps (~3.0 epochs; set by max_train_steps = 6)" in plan
    assert plan.endswith(f"output {tmp_path / 'out' / 'mine.safetensors'}")


def test_plan_says_what_an_epoch_leaves_and_counts_repeats_once(tmp_path):
    plan = _plan(tmp_path, ["--max_train_epochs", "3"], images=10, distinct=5, world_size=2, batch=2)
    assert "5 member images (10 per epoch with their kohya repeats)" in plan
    assert "2 batches/epoch (full batches only: each epoch's shuffle leaves 2 image(s) for a later epoch)" in plan
    assert "set by max_train_epochs = 3; max_train_steps is ignored" in plan


def test_plan_prices_8bit_moments_at_two_bytes(tmp_path):
    plan = _plan(tmp_path, ["--optimizer_type", "AdamW8bit"], trained=2**30 // 10)
    assert "~1.00 GiB of weights" in plan  # (4 + 4 + 2) bytes a parameter


def test_plan_counts_epochs_in_micro_batches_when_steps_accumulate(tmp_path):
    """A step of --gradient_accumulation_steps 3 reads 3 batches: 6 steps over 2 batches/epoch are 9 epochs, not 3."""
    plan = _plan(tmp_path, ["--max_train_steps", "6", "--gradient_accumulation_steps", "3"])
    assert "6 optimisation steps (~9.0 epochs; set by max_train_steps = 6)" in plan


def test_plan_names_the_class_images_and_the_prior_weight(tmp_path):
    """DreamBooth's prior term: how many class images and at what weight, so a wrong weight shows before training."""
    plan = _plan(tmp_path, ["--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"),
                            "--class_prompt", "a digit", "--num_class_images", "12", "--prior_loss_weight", "0.5"])
    assert ", prior preservation on 12 class images x 0.5, output " in plan


def test_a_too_small_member_set_counts_its_repeats_as_the_plan_does(tmp_path):
    """30 images with kohya repeats are 48 per epoch: the batch error says which count its number is."""
    from library.train.run_plan import members_sampler_name

    repeated = LabelledSet([tmp_path / f"{i % 5}.png" for i in range(8)], ["a digit"] * 8)
    plain = LabelledSet([tmp_path / f"{i}.png" for i in range(8)], ["a digit"] * 8)
    assert members_sampler_name(repeated) == "D_tr, the members with their kohya repeats (--train_batch_size)"
    assert members_sampler_name(plain) == "D_tr, the members (--train_batch_size)"
