"""What a training run writes (:mod:`library.train.artifacts`): the LoRA's and the attacker's metadata."""

from __future__ import annotations

from safetensors import safe_open

from library.config import parse_config
from library.train.artifacts import conditioning_metadata
from library.train.checkpoint import read_summary
from library.train.config import TrainConfig
from library.train.trainer import train


def test_conditioning_metadata_names_the_runs_caption_and_timestep_settings():
    """sd-scripts' keys for caption shuffling and the timestep range: each from its own setting, as trained."""
    config = parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json",
                                        "--shuffle_caption", "--keep_tokens", "2", "--min_timestep", "10",
                                        "--max_timestep", "900"])
    meta = conditioning_metadata(config)
    assert {k: meta[k] for k in ("ss_shuffle_caption", "ss_keep_tokens", "ss_min_timestep", "ss_max_timestep")} == {
        "ss_shuffle_caption": "True", "ss_keep_tokens": "2", "ss_min_timestep": "10", "ss_max_timestep": "900"}


def test_the_lora_names_its_precision_and_seed_and_the_attacker_file_its_method(tiny_train_args):
    """The files say how they were made: --mixed_precision, the run's --seed (both keys), the attacker's method."""
    args = tiny_train_args + ["--mixed_precision", "bf16", "--seed", "5", "--attacker_batch_size", "2",
                              "--max_train_steps", "1"]
    result = train(parse_config(TrainConfig, args), "smp_lora")
    with safe_open(result.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_mixed_precision"], meta["ss_seed"], meta["smp_lora.seed"]) == ("bf16", "5", "5")
    assert meta["smp_lora.latent_mode"] == "mean"  # the default: the posterior's mean
    with safe_open(result.attacker_path, "pt") as handle:
        assert handle.metadata() == {"smp_lora.method": "smp_lora"}


def test_a_states_summary_counts_completed_epochs_not_steps(tiny_train_args, tmp_path):
    """train_state.json tells a user where a state stands: 8 steps of 6 per epoch are step 8 of epoch 1 done."""
    train(parse_config(TrainConfig, tiny_train_args + ["--max_train_steps", "8", "--save_state"]), "lora")
    summary = read_summary(tmp_path / "out" / "lora-state")
    assert (summary["global_step"], summary["epoch"]) == (8, 1)


def test_a_lora_trained_on_sampled_latents_says_so(tiny_train_args):
    """--latent_mode sample is in the file: an auditor reads that the members' latents were one posterior draw."""
    result = train(parse_config(TrainConfig, tiny_train_args + ["--latent_mode", "sample", "--max_train_steps", "1"]),
                   "lora")
    with safe_open(result.weights_path, "pt") as handle:
        assert handle.metadata()["smp_lora.latent_mode"] == "sample"
