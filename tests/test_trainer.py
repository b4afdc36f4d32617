"""End-to-end training on the tiny stack: the three methods, exact resume, kohya output, clear errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import parse_config
from library.train.cli import train_entry
from library.train.config import TrainConfig
from library.train.trainer import train


def run(method: str, args: list[str]):
    return train(parse_config(TrainConfig, args), method)


def test_plain_lora_writes_kohya_file_with_safe_metadata(tiny_train_args, manifest_path, capsys):
    result = run("lora", tiny_train_args)
    assert f"saved LoRA to {result.weights_path}\n" in capsys.readouterr().out  # what it saved, and where
    assert result.global_step == 4
    tensors = load_file(result.weights_path)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") and k.endswith(".lora_down.weight")
               for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0") for k in tensors)
    with safe_open(result.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["smp_lora.method"] == "lora"
    from library.data.manifest import manifest_sha256

    assert meta["smp_lora.manifest_sha256"] == manifest_sha256(manifest_path)
    leaked = [k for k in meta if k in ("ss_dataset_dirs", "ss_tag_frequency", "ss_datasets")]
    assert not leaked
    assert not any(str(Path(manifest_path).parent) in v for v in meta.values())  # no private paths
    # the training keys sd-scripts writes and A1111 / civitai show (those that say nothing of the data)
    assert {k: meta[k] for k in ("ss_lr_scheduler", "ss_lr_warmup_steps", "ss_batch_size_per_device",
                                 "ss_gradient_accumulation_steps", "ss_total_batch_size", "ss_max_grad_norm",
                                 "ss_steps")} == {
        "ss_lr_scheduler": "constant", "ss_lr_warmup_steps": "0", "ss_batch_size_per_device": "4",
        "ss_gradient_accumulation_steps": "1", "ss_total_batch_size": "4", "ss_max_grad_norm": "1.0", "ss_steps": "4"}
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    record = json.loads(result.record_path.read_text())
    assert record["global_step"] == 4 and record["method"] == "lora"
    # where and by what it ran (seeded trainings can end in other files on another CPU model: results §23)
    assert record["machine"]["cores"] == os.cpu_count() and record["provenance"]["command"] == sys.argv
    assert result.attacker_path is None


def test_kohya_metadata_and_record_name_the_runs_own_settings(tiny_train_args, manifest_path):
    """ss_* values that the defaults cannot tell apart: the total batch over accumulation, the per-part rates, the
    steps that --max_train_epochs (not --max_train_steps) sets, the conditioning, the author's own metadata; the
    split in the file and the record; the weights in --save_precision; a state under its own --output_name, which
    --resume latest finds."""
    from library.data.manifest import manifest_sha256, read_manifest, split_sha256
    from library.train.retention import latest_state

    args = ["--max_train_epochs", "1", "--gradient_accumulation_steps", "2", "--unet_lr", "2e-3",
            "--text_encoder_lr", "5e-4", "--clip_skip", "2", "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", "1", "--output_name", "digits", "--save_state", "--save_precision", "fp16",
            "--training_comment", "digits, rank 4", "--metadata_title", "Digits", "--metadata_author", "the lab",
            "--metadata_trigger_phrase", "handwritten"]
    result = run("lora", tiny_train_args + args)  # 24 members, batches of 4 accumulated over 2: 3 steps
    with safe_open(result.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert {t.dtype for t in load_file(result.weights_path).values()} == {torch.float16}  # --save_precision
    assert {k: meta[k] for k in ("ss_total_batch_size", "ss_unet_lr", "ss_text_encoder_lr", "ss_learning_rate",
                                 "ss_max_train_steps", "ss_steps", "ss_clip_skip", "ss_lr_warmup_steps",
                                 "ss_resolution", "ss_max_token_length", "ss_output_name")} == {
        "ss_total_batch_size": "8", "ss_unet_lr": "0.002", "ss_text_encoder_lr": "0.0005", "ss_learning_rate": "0.001",
        "ss_max_train_steps": "3", "ss_steps": "3", "ss_clip_skip": "2", "ss_lr_warmup_steps": "1",
        "ss_resolution": "(32, 32)", "ss_max_token_length": "None", "ss_output_name": "digits"}
    # sd-scripts' --training_comment / --metadata_*: as given, the title in place of the file's name
    assert (meta["ss_training_comment"], meta["modelspec.title"], meta["modelspec.author"],
            meta["modelspec.trigger_phrase"]) == ("digits, rank 4", "Digits", "the lab", "handwritten")
    assert "modelspec.license" not in meta
    split = split_sha256(read_manifest(manifest_path))
    assert meta["smp_lora.split_sha256"] == split != manifest_sha256(manifest_path)
    record = json.loads(result.record_path.read_text())
    assert (record["split_sha256"], record["total_steps"], record["global_step"]) == (split, 3, 3)
    assert latest_state(result.weights_path.parent, "digits") == result.weights_path.parent / "digits-state"


@pytest.mark.parametrize("method", ["mp_lora", "smp_lora"])
def test_privacy_methods_train_and_save_attacker_separately(method, tiny_train_args):
    args = tiny_train_args + ["--attacker_batch_size", "2", "--k_steps", "2", "--privacy_lambda", "0.5"]
    result = run(method, args)
    lora_keys = load_file(result.weights_path).keys()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora_keys)  # the attacker never goes in it
    attacker = load_file(result.attacker_path)
    assert attacker["net.0.weight"].shape[1] == 4 * 8 * 8  # input size from the 4x8x8 latent, not hard-coded
    assert {"l_ada", "g", "loss", "attacker_ce", "attacker_acc"} <= set(result.final_logs)
    if method == "smp_lora":
        assert result.final_logs["denominator"] >= 1.0  # 1 - lambda*G + delta with G <= 0


@pytest.mark.parametrize("every, order, expected_steps", [(1, "attacker_first", [0, 1, 2, 3, 4]),
                                                          (2, "attacker_first", [0, 2, 4]),
                                                          (3, "lora_first", [0, 3])])
def test_attacker_every_n_steps_runs_the_attacker_phase_on_those_steps(every, order, expected_steps,
                                                                      tiny_train_args, monkeypatch):
    from library.train.methods.adversarial import AdversarialLoRA
    from library.train.trainer import Trainer

    seen: list[int] = []
    original_step, original_phase = Trainer.step, AdversarialLoRA.attacker_phase
    current: list[int] = []

    def step(self):
        current[:] = [self.global_step]
        return original_step(self)

    def phase(self, ctx):
        seen.append(current[0])
        return original_phase(self, ctx)

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(AdversarialLoRA, "attacker_phase", phase)
    result = run("smp_lora", tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "5",
                                                "--attacker_every_n_steps", str(every), "--update_order", order])
    assert seen == expected_steps
    assert result.final_logs["g"] <= 0  # G enters every LoRA step, attacker phase or not
    with safe_open(result.weights_path, "pt") as handle:
        assert handle.metadata()["smp_lora.attacker_every_n_steps"] == str(every)


def test_an_accumulated_steps_logs_are_the_mean_over_its_micro_batches(tiny_train_args, monkeypatch):
    """With --gradient_accumulation_steps the step logged its last micro-batch's L_ada, G and loss only."""
    import library.train.divergence as divergence
    from library.train.loss_recorder import mean_logs

    micro_logs, checked_loss = [], divergence.checked_loss

    def spy(*args):
        loss, logs = checked_loss(*args)
        micro_logs.append(dict(logs))
        return loss, logs

    monkeypatch.setattr(divergence, "checked_loss", spy)
    result = run("smp_lora", tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "1",
                                                "--gradient_accumulation_steps", "3"])
    assert len(micro_logs) == 3 and micro_logs[0]["l_ada"] != micro_logs[-1]["l_ada"]
    for key in ("l_ada", "g", "loss", "denominator"):
        assert result.final_logs[key] == pytest.approx(sum(m[key] for m in micro_logs) / 3, rel=1e-12)
    assert mean_logs([{"a": 1.0, "b": 4.0}, {"a": 3.0}]) == {"a": 2.0, "b": 4.0}


@pytest.mark.parametrize("method", ["lora", "smp_lora"])
def test_only_a_method_with_a_proxy_attacker_encodes_the_non_members(method, tiny_train_args, monkeypatch):
    """Plain LoRA encoded D^nm_aux and D^nm_te with the VAE too (half the latent work of a start), and never read
    them; the proxy attacker reads D_aux, its monitor D_te."""
    from library.data.latents import LatentCache
    from library.data.manifest import read_manifest

    encoded, get_many = set(), LatentCache.get_many

    def spy(self, paths, digests=None):
        encoded.update(str(p) for p in paths)
        return get_many(self, paths, digests)

    monkeypatch.setattr(LatentCache, "get_many", spy)
    args = tiny_train_args + ["--max_train_steps", "1"] + (["--attacker_batch_size", "2"] if method != "lora" else [])
    config = parse_config(TrainConfig, args)
    train(config, method)
    manifest = read_manifest(config.split_manifest, verify=False)
    members = {str(manifest.abs_path(e)) for e in manifest.members()}
    nonmembers = {str(manifest.abs_path(e)) for e in manifest.nonmember_aux + manifest.nonmember_test}
    assert encoded == (members if method == "lora" else members | nonmembers)


def test_resume_is_exact(tiny_train_args, tmp_path):
    common = tiny_train_args + ["--attacker_batch_size", "2"]
    full = run("smp_lora", common + ["--max_train_steps", "6", "--output_dir", str(tmp_path / "full")])
    run("smp_lora", common + ["--max_train_steps", "3", "--save_state", "--output_dir", str(tmp_path / "half")])
    state = tmp_path / "half" / "smp_lora-state"
    resumed = run("smp_lora", common + ["--max_train_steps", "6", "--resume", str(state),
                                        "--output_dir", str(tmp_path / "resumed")])
    a, b = load_file(full.weights_path), load_file(resumed.weights_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in load_file(full.attacker_path).items():
        assert torch.equal(value, load_file(resumed.attacker_path)[key]), key


@pytest.mark.parametrize("dropout", [[], ["--network_dropout", "0.1"]], ids=["no-dropout", "lora-dropout"])
def test_the_proxy_monitor_does_not_change_what_is_trained(dropout, tiny_train_args, tmp_path):
    # The fixture's D_tr holds 24 members: 6 steps of 4 per epoch, so 13 steps cross two epoch ends. With LoRA
    # dropout the monitor's forwards would draw masks from torch's global RNG and shift every later one.
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "13", *dropout]
    monitored = run("smp_lora", common + ["--attacker_eval_every_n_epochs", "1",
                                          "--output_dir", str(tmp_path / "monitored")])
    unmonitored = run("smp_lora", common + ["--attacker_eval_every_n_epochs", "1000",
                                            "--output_dir", str(tmp_path / "unmonitored")])
    epochs = json.loads(monitored.record_path.read_text())["epochs"]
    assert [e["epoch"] for e in epochs if "proxy_acc_aux" in e] == [1, 2]  # the monitor did run
    a, b = load_file(monitored.weights_path), load_file(unmonitored.weights_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key, value in load_file(monitored.attacker_path).items():
        assert torch.equal(value, load_file(unmonitored.attacker_path)[key]), key


def test_cli_errors_are_one_line(tiny_train_args, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rat = 1e-4\n")
    assert train_entry("lora", "", tiny_train_args + ["--config_file", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'learning_rat'" in err[0] and "bad.toml" in err[0]
    assert train_entry("smp_lora", "", tiny_train_args + ["--privacy_lambda", "-1"]) == 2
    assert "privacy_lambda" in capsys.readouterr().err


def test_network_args_conv_dim_trains_a_locon_and_bad_entries_are_one_line(tiny_train_args, tmp_path, capsys):
    result = run("lora", tiny_train_args + ["--network_args", "conv_dim=2", "conv_alpha=1"])
    tensors = load_file(result.weights_path)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[:2] == (2, 32)
    with safe_open(result.weights_path, "pt") as handle:
        assert json.loads(handle.metadata()["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    for bad, expected in ((["conv_dim"], "key=value"), (["conv_dim=0"], "conv_dim"),
                          (["dropout=0.1"], "--network_dropout"),
                          (["rank_dropout=0.1"], "rank_dropout: sd-scripts' LoRA options that this network does not have"),
                          (["algo=loha"], "LyCORIS options are not supported")):
        assert train_entry("lora", "", tiny_train_args + ["--network_args", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_batch_larger_than_a_set_is_one_line(tiny_train_args, capsys):
    # The fixture's split has 12 images in D^m_aux and 24 members in D_tr.
    assert train_entry("smp_lora", "", tiny_train_args + ["--attacker_batch_size", "13"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "D^m_aux" in err and "--attacker_batch_size" in err, err
    assert train_entry("lora", "", tiny_train_args + ["--train_batch_size", "25"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "D_tr" in err and "--train_batch_size" in err, err


def test_lora_file_for_another_model_is_refused(tiny_train_args, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}, str(foreign))
    assert train_entry("lora", "", tiny_train_args + ["--network_weights", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "foreign.safetensors" in err and err.count("\n") == 1


def test_dry_run_trains_nothing(tiny_train_args, tmp_path, capsys):
    assert train_entry("smp_lora", "", tiny_train_args + ["--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "optimisation steps" in out and "full batches only" not in out  # 24 = 6 x 4
    assert not (tmp_path / "out" / "smp_lora.safetensors").exists()
    assert train_entry("lora", "", tiny_train_args + ["--dry_run", "--train_batch_size", "5"]) == 0
    assert "4 batches/epoch (full batches only: each epoch's shuffle leaves 4 image(s) for a later epoch)" in \
        capsys.readouterr().out


def test_tiny_config_trains_and_diffusers_loads_the_lora(tiny_model_dir, manifest_path, tmp_path):
    """`train_lora.py --config_file configs/tiny/lora.toml` output loads in diffusers with the same UNet output."""
    from diffusers import StableDiffusionPipeline

    from library.sd.loading import load_sd_model
    from networks.lora import create_network_from_weights

    root = Path(__file__).resolve().parents[1]
    args = ["--config_file", str(root / "configs/tiny/lora.toml"),
            "--pretrained_model_name_or_path", str(tiny_model_dir), "--split_manifest", str(manifest_path),
            "--max_train_epochs", "1", "--no-network_train_unet_only", "--output_dir", str(tmp_path / "o"),
            "--no-cache_latents_to_disk", "--no-progress_bar"]
    assert train_entry("lora", "", args) == 0
    lora_file = tmp_path / "o" / "lora.safetensors"

    ours = load_sd_model(tiny_model_dir)
    network, _ = create_network_from_weights(1.0, lora_file, ours.vae, ours.text_encoder, ours.unet)
    network.apply_to(ours.text_encoder, ours.unet)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, local_files_only=True)
    pipe.load_lora_weights(str(lora_file))

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    tokens = ours.tokenizer(["a handwritten digit one", "a handwritten digit two"], padding="max_length",
                            max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ours_cond = ours.text_encoder(tokens)[0]
        theirs_cond = pipe.text_encoder(tokens)[0]
        assert torch.allclose(ours_cond, theirs_cond, atol=1e-5)
        t = torch.tensor([10, 500])
        ours_out = ours.unet(latents, t, encoder_hidden_states=ours_cond).sample
        theirs_out = pipe.unet(latents, t, encoder_hidden_states=ours_cond).sample
        base_out = load_sd_model(tiny_model_dir).unet(latents, t, encoder_hidden_states=ours_cond).sample
    assert torch.allclose(ours_out, theirs_out, atol=1e-5)
    assert not torch.allclose(ours_out, base_out, atol=1e-4)  # the LoRA really changed the model


def test_bf16_autocast_trains_with_fp32_lora(tiny_train_args, tmp_path):
    args = tiny_train_args + ["--mixed_precision", "bf16", "--attacker_batch_size", "2", "--max_train_steps", "2"]
    result = run("smp_lora", args)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.final_logs.values())
    assert all(t.dtype == torch.float32 for t in load_file(result.weights_path).values())


def test_gradient_checkpointing_gives_the_same_lora(tiny_train_args, tmp_path):
    plain = run("lora", tiny_train_args + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "a")])
    ckpt = run("lora", tiny_train_args + ["--max_train_steps", "2", "--gradient_checkpointing",
                                         "--output_dir", str(tmp_path / "b")])
    a, b = load_file(plain.weights_path), load_file(ckpt.weights_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_up" in k)  # it trained


def test_the_same_weights_as_one_file_or_a_folder_train_the_same_lora(tiny_train_args, tiny_model_dir, tmp_path):
    from library.sd.loading import load_sd_model
    from library.sd.single_file import save_single_file

    single = save_single_file(load_sd_model(tiny_model_dir), tmp_path / "base.safetensors")
    folder = run("lora", tiny_train_args + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "a")])
    as_file = run("lora", tiny_train_args + ["--max_train_steps", "2", "--output_dir", str(tmp_path / "b"),
                                            "--pretrained_model_name_or_path", str(single)])
    a, b = load_file(folder.weights_path), load_file(as_file.weights_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_determinism_switches_torch_and_keeps_the_cpu_bits(tiny_train_args, tmp_path, torch_defaults_restored):
    """--full_determinism turns on torch's deterministic kernels (what makes a GPU repeat itself; checked on a GPU
    by tests/test_cuda.py) and changes no bit on the CPU, which is deterministic already."""
    import os

    # one latent cache for both runs: the strict run's latents (other kernels on a GPU) must not be the plain run's
    cache = tmp_path / "latents"
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "2", "--cache_latents_to_disk",
                                "--latent_cache_dir", str(cache)]
    plain = run("smp_lora", common + ["--output_dir", str(tmp_path / "plain")])
    plain_files = set(cache.glob("*.safetensors"))
    assert not torch.are_deterministic_algorithms_enabled()
    strict = run("smp_lora", common + ["--full_determinism", "--output_dir", str(tmp_path / "strict")])
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    a, b = load_file(plain.weights_path), load_file(strict.weights_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strict_files = set(cache.glob("*.safetensors")) - plain_files
    assert plain_files and len(strict_files) == len(plain_files)  # every latent encoded again, under its own key


def test_a_step_that_ends_two_epochs_runs_the_end_of_each(tiny_train_args, tmp_path):
    """24 members in batches of 4 (6 per epoch) accumulated over 12: every step ends two epochs, and each of them
    gets its record and its save (before, only the second one did)."""
    out = tmp_path / "out"
    result = run("lora", tiny_train_args + ["--max_train_epochs", "4", "--save_every_n_epochs", "1",
                                            "--gradient_accumulation_steps", "12", "--output_dir", str(out)])
    record = json.loads(result.record_path.read_text())
    assert result.global_step == 2 and [(e["epoch"], e["step"]) for e in record["epochs"]] == [(1, 1), (2, 1), (3, 2),
                                                                                               (4, 2)]
    # Epochs 3 and 4 end with the last step: the final lora.safetensors is theirs.
    assert sorted(p.name for p in out.glob("lora-0*.safetensors")) == ["lora-000001.safetensors", "lora-000002.safetensors"]
    # An epoch file's name and step count would give the batches per epoch (the member-set size up to the batch
    # size): its metadata has no step count; the final file's has.
    for name, steps in (("lora-000002", None), ("lora", "2")):
        with safe_open(str(out / f"{name}.safetensors"), "pt") as handle:
            assert handle.metadata().get("ss_steps") == steps, name


def test_a_step_checkpoint_at_an_epochs_end_keeps_its_step_count(tiny_train_args, tmp_path):
    """24 members in batches of 4: step 6 ends epoch 1 and is a step checkpoint too. The epoch file has no step
    count (with its epoch it would give the batches per epoch); the step file, named by its step, keeps it (before,
    any file saved at an epoch's end lost it)."""
    out = tmp_path / "out"
    run("lora", tiny_train_args + ["--max_train_steps", "9", "--save_every_n_steps", "3", "--save_every_n_epochs",
                                   "1", "--output_dir", str(out)])
    for name, steps in (("lora-step00000003", "3"), ("lora-000001", None), ("lora-step00000006", "6"), ("lora", "9")):
        with safe_open(str(out / f"{name}.safetensors"), "pt") as handle:
            assert handle.metadata().get("ss_steps") == steps, name
    assert not (out / "lora-step00000009.safetensors").exists()  # the last step's file is the final one


def test_resuming_a_finished_state_keeps_the_final_metrics(tiny_train_args, tmp_path):
    out = tmp_path / "out"
    first = run("smp_lora", tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "2", "--save_state",
                                               "--output_dir", str(out)])
    final = json.loads(first.record_path.read_text())["final"]
    assert final and "l_ada" in final
    again = run("smp_lora", tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "2", "--save_state",
                                               "--resume", str(out / "smp_lora-state"), "--output_dir", str(out)])
    assert json.loads(again.record_path.read_text())["final"] == final


def test_g_attacker_dropout_scores_g_with_upstreams_train_mode_attacker(tiny_train_args, tmp_path):
    common = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "2", "--attacker_dropout", "0.5"]
    default = run("smp_lora", common + ["--output_dir", str(tmp_path / "eval")])
    upstream = run("smp_lora", common + ["--g_attacker_dropout", "--output_dir", str(tmp_path / "train")])
    meta = {}
    with safe_open(upstream.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["smp_lora.g_attacker_dropout"] == "true"
    with safe_open(default.weights_path, "pt") as handle:
        assert "smp_lora.g_attacker_dropout" not in handle.metadata()
    assert upstream.final_logs["g"] != default.final_logs["g"]  # dropout masks on h_w's hidden layers
    a, b = load_file(default.attacker_path), load_file(upstream.attacker_path)
    key = "normalizer.num_batches_tracked"  # G never updates the normaliser: only the two attacker batches did
    assert a[key].item() == b[key].item() == 2


def test_shuffle_caption_shuffles_the_attacker_batches_captions_too(tiny_train_args):
    """h_w is applied (in G) to D_tr captions in shuffled order: it must be trained on shuffled aux captions too, as
    upstream's aux samples came through the same shuffling dataset. Seeded per draw: the same run, the same order."""
    from library.train.trainer import Trainer

    def attacker_captions() -> list[list[str]]:
        trainer = Trainer(parse_config(TrainConfig, tiny_train_args + [
            "--attacker_batch_size", "4", "--shuffle_caption", "--k_steps", "3"]), "smp_lora")
        trainer.prepare()
        aux = trainer.method.aux
        aux.member_captions = [f"digit {i}, tag a, tag b, tag c, tag d" for i in range(len(aux.member_captions))]
        aux.nonmember_captions = [f"digit {i}, tag a, tag b, tag c, tag d" for i in range(len(aux.nonmember_captions))]
        seen, features = [], trainer.method._features
        trainer.method._features = lambda ctx, latents, keys, captions, *rest: (seen.append(captions), features(
            ctx, latents, keys, captions, *rest))[1]
        trainer.method.attacker_phase(trainer._context())
        return seen

    first = attacker_captions()
    assert len(first) == 3 and any(not c.endswith("tag d") for batch in first for c in batch)
    assert all(sorted(t for t in c.split(", ") if t.startswith("tag")) == ["tag a", "tag b", "tag c", "tag d"]
               for batch in first for c in batch)  # the same tags, in another order
    assert attacker_captions() == first  # seeded


def test_each_process_takes_its_own_random_streams_back_and_a_state_of_another_count_says_so():
    """Rank r continues rank r's (t, eps) stream; a state of another process count (or one written before the
    ranks' streams were kept, which has the main process's only) cannot continue them, and says so instead."""
    from library.train.rng_state import process_rng_state, restore_process_rng_state

    cpu = torch.device("cpu")
    streams = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        streams.append(process_rng_state(generator, cpu))
    mine = torch.Generator()
    assert restore_process_rng_state({"rank_rng": streams}, mine, cpu, rank=1, world_size=2) is None
    assert torch.equal(mine.get_state(), streams[1]["noise_generator"])
    warning = restore_process_rng_state({"rank_rng": streams}, mine, cpu, rank=0, world_size=1)
    assert warning.startswith("warning: the state was written by 2 process(es), this run has 1")
    older = dict(streams[0])  # the keys of a state written before 2026-12-05, at its top level
    assert restore_process_rng_state(older, mine, cpu, rank=0, world_size=1) is None
    assert torch.equal(mine.get_state(), streams[0]["noise_generator"])
    assert "keeps one process's random streams" in restore_process_rng_state(older, mine, cpu, rank=0, world_size=2)


def _logged_and_applied_gradient_norms(args: list[str], monkeypatch) -> tuple[float, float]:
    """One plain-LoRA step: the gradient norm it logs, and the norm of the gradient the optimiser then applies."""
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, args), "lora")
    trainer.prepare()
    applied: list[float] = []
    scaler_step = trainer.grad_scaler.step

    def step(optimizer, *rest):
        # max_norm=inf leaves the gradients as they are and returns their total L2 norm
        applied.append(torch.nn.utils.clip_grad_norm_(trainer.trained.params, float("inf")).item())
        return scaler_step(optimizer, *rest)

    monkeypatch.setattr(trainer.grad_scaler, "step", step)
    return trainer.step()["grad_norm"], applied[0]


@pytest.mark.parametrize("flags, applied", [(["--max_grad_norm", "0"], "as logged"),
                                            (["--max_grad_norm", "1e-4"], 1e-4),
                                            (["--grad_normalize", "--max_grad_norm", "0"], 1.0)],
                         ids=["no-clipping", "clipped", "normalised"])
def test_the_optimiser_steps_on_the_logged_gradient_clipped_or_normalised_as_asked(flags, applied, tiny_train_args,
                                                                                   monkeypatch):
    """grad_norm is the L2 norm before clipping (paper Fig. 1b); --max_grad_norm 0 must not clip, --grad_normalize
    must give a unit-norm step (Table 10's baseline): otherwise a run trains other than its settings say."""
    logged, seen = _logged_and_applied_gradient_norms(tiny_train_args + flags, monkeypatch)
    assert logged > 1e-3 and logged != pytest.approx(1.0, rel=1e-2)  # so that each case tells the others apart
    assert seen == pytest.approx(logged if applied == "as logged" else applied, rel=1e-4)


def test_an_accumulated_steps_gradient_is_the_mean_of_its_micro_batches(tiny_train_args, monkeypatch):
    """Over 3 micro-batches the step's gradient is their mean, as one batch 3 times the size gives: a sum would
    triple every unclipped step (and grad_norm), so --gradient_accumulation_steps would change the learning rate."""
    import library.train.divergence as divergence
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--gradient_accumulation_steps", "3",
                                                                   "--max_grad_norm", "0"]), "lora")
    trainer.prepare()
    params = [p for p in trainer.trained.params if p.requires_grad]
    checked_loss = divergence.checked_loss

    def unit_gradient_loss(*args):
        _, logs = checked_loss(*args)
        return sum(p.sum() for p in params), logs  # a gradient of 1 on every weight, in every micro-batch

    monkeypatch.setattr(divergence, "checked_loss", unit_gradient_loss)
    assert trainer.step()["grad_norm"] == pytest.approx(sum(p.numel() for p in params) ** 0.5, rel=1e-6)


def test_the_proxy_monitor_labels_each_splits_members_1_and_its_non_members_0(tiny_train_args, monkeypatch):
    """proxy_acc_aux / proxy_acc_test are h_w's accuracy on D_aux and on D_te, members labelled 1: swapped labels or
    splits would report 1 - accuracy, or the attacker's own training data as its held-out score."""
    from library.train.methods.adversarial import AdversarialLoRA
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--attacker_batch_size", "2"]), "smp_lora")
    trainer.prepare()
    seen: list[tuple[set[str], set[str]]] = []

    def proxy_accuracy(self, ctx, latents, captions, keys, labels):
        assert len(latents) == len(captions) == len(keys) == len(labels)
        seen.append(({k for k, y in zip(keys, labels.tolist()) if y == 1},
                     {k for k, y in zip(keys, labels.tolist()) if y == 0}))
        return 0.5

    monkeypatch.setattr(AdversarialLoRA, "proxy_accuracy", proxy_accuracy)
    assert trainer._proxy_monitor(epoch=1) == {"proxy_acc_aux": 0.5, "proxy_acc_test": 0.5}
    data = trainer.data
    assert seen == [(set(data.member_aux.keys), set(data.nonmember_aux.keys)),
                    (set(data.member_test.keys), set(data.nonmember_test.keys))]


def test_shuffle_caption_gives_each_step_its_own_seeded_tag_order(tiny_train_args):
    """kohya's --shuffle_caption reshuffles the tags at every step (the same order every step would teach it), and
    the order depends on the step only, so a resumed run shuffles as the uninterrupted one did."""
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--shuffle_caption"]), "lora")
    trainer.prepare()
    members = trainer.data.members
    members.captions = [f"digit {i}, tag a, tag b, tag c, tag d, tag e" for i in range(len(members.captions))]
    ctx = trainer._context()

    def captions_at(step: int) -> list[str]:
        trainer.global_step = step
        return trainer._forward(list(range(8)), ctx).captions

    first = captions_at(0)
    assert captions_at(1) != first and captions_at(0) == first


@pytest.mark.parametrize("batch, batches_per_epoch", [(4, 6), (5, 4)], ids=["exact", "leftover"])
def test_an_epoch_ends_with_its_last_full_batch(batch, batches_per_epoch, tiny_train_args):
    """24 members: an epoch's end (its record, checkpoint, samples, proxy monitor) comes with its last full batch, not
    a batch early; 4 images short of a batch of 5 are left for the next epoch's shuffle, not waited for."""
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--train_batch_size", str(batch)]), "lora")
    counts = [trainer.completed_epochs()]
    for _ in range(batches_per_epoch + 1):
        trainer.sampler.next_indices()
        counts.append(trainer.completed_epochs())
    assert counts == [0] * batches_per_epoch + [1, 1]


def test_a_state_round_trip_keeps_the_runs_history(tiny_train_args):
    """A resumed run's record goes on from the state's: the epochs before the resume, the last step's logs and the
    step count come back (else its record starts at the resume, and its final metrics are lost at the end)."""
    from library.train.trainer import Trainer

    def prepared() -> Trainer:
        trainer = Trainer(parse_config(TrainConfig, tiny_train_args), "lora")
        trainer.prepare()
        return trainer

    trainer = prepared()
    trainer.global_step, trainer.last_logs = 6, {"loss": 0.5, "l_ada": 0.5}
    trainer.epoch_logs = [{"epoch": 1, "step": 6, "l_ada": 0.25}]
    resumed = prepared()
    resumed.load_state_dict(trainer.state_dict(trainer.gather_rng_states()))
    assert (resumed.global_step, resumed.epoch_logs, resumed.last_logs) == (6, trainer.epoch_logs, trainer.last_logs)


def test_the_loss_average_spans_one_epochs_optimisation_steps(tiny_train_args):
    """Tensorboard's loss/average is the mean over the last epoch's worth of steps (sd-scripts' curve): 24 members
    in batches of 4 accumulated over 2 are 3 steps an epoch, not 6."""
    from library.train.trainer import Trainer

    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--gradient_accumulation_steps", "2"]), "lora")
    for loss in (1.0, 2.0, 3.0, 4.0):
        logs = trainer.loss_recorder.add({"loss": loss})
    assert logs["loss/average"] == pytest.approx(3.0)
