"""What is trained, independently of the objective: full fine-tuning of the UNet (library.train.parametrization)."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import parse_config
from library.sd.loading import load_sd_model
from library.train.cli import train_entry
from library.train.config import TrainConfig
from library.train.parametrization import FullParametrization
from library.train.trainer import Trainer, train

FULL = ["--train_mode", "full", "--learning_rate", "1e-4"]


def _unet_output(unet, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 4, 4, generator=generator)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def _trained(args: list[str], method: str) -> Trainer:
    trainer = Trainer(parse_config(TrainConfig, args), method)
    trainer.prepare()
    trainer.run()
    return trainer


def test_smp_full_finetune_changes_the_unet_only_and_both_saved_forms_give_its_outputs(tiny_train_args, tiny_model_dir):
    from diffusers import UNet2DConditionModel

    trainer = _trained(tiny_train_args + FULL + ["--attacker_batch_size", "2"], "smp_lora")
    out = trainer.output_dir
    base = load_sd_model(str(tiny_model_dir))
    trained_unet = {k: v.detach() for k, v in trainer.bundle.unet.state_dict().items()}
    unchanged = [k for k, v in base.unet.state_dict().items() if torch.equal(v, trained_unet[k])]
    assert not unchanged, unchanged[:5]  # every UNet weight moved (AdamW over all of them)
    for name in ("text_encoder", "vae"):  # ... and nothing else did
        before, after = getattr(base, name).state_dict(), getattr(trainer.bundle, name).state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name
    expected = _unet_output(trainer.bundle.unet)

    folder = UNet2DConditionModel.from_pretrained(out / "smp_lora-unet")  # diffusers' own loader
    assert torch.allclose(_unet_output(folder), expected, atol=1e-6)
    auto = diffusers.AutoModel.from_pretrained(str(out / "smp_lora-unet"))  # its config.json names the class
    assert isinstance(auto, UNet2DConditionModel) and torch.allclose(_unet_output(auto), expected, atol=1e-6)
    single = load_sd_model(str(out / "smp_lora.safetensors"))  # the SD single file, as a base model
    assert torch.allclose(_unet_output(single.unet), expected, atol=1e-6)
    from_single = UNet2DConditionModel.from_single_file(str(out / "smp_lora.safetensors"), config=str(tiny_model_dir),
                                                        subfolder="unet")  # diffusers' own LDM converter
    assert torch.allclose(_unet_output(from_single), expected, atol=1e-6)
    assert all(torch.equal(v, base.text_encoder.state_dict()[k]) for k, v in single.text_encoder.state_dict().items())
    with safe_open(out / "smp_lora.safetensors", "pt") as handle:
        meta = handle.metadata()
    assert meta["smp_lora.method"] == "smp_lora" and meta["smp_lora.train_mode"] == "full"
    assert "smp_lora.manifest_sha256" in meta and not any(str(tiny_model_dir) in v for v in meta.values())
    assert not (out / "smp_lora-text_encoder").exists()
    assert trainer.method.attacker is not None and (out / "smp_lora-attacker.safetensors").is_file()


def test_train_text_encoder_saves_it_too(tiny_train_args, tiny_model_dir):
    import transformers
    from transformers import CLIPTextModel

    trainer = _trained(tiny_train_args + FULL + ["--train_text_encoder", "--max_train_steps", "2"], "lora")
    folder = trainer.output_dir / "lora-text_encoder"
    saved = load_file(folder / "model.safetensors")
    base = load_sd_model(str(tiny_model_dir)).text_encoder.state_dict()
    assert [k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], base[k])]
    loaded = CLIPTextModel.from_pretrained(folder)  # transformers' own loader gives the trainer's text encoder
    assert isinstance(transformers.AutoModel.from_pretrained(folder), CLIPTextModel)  # config.json has model_type
    ids = torch.tensor([[trainer.bundle.tokenizer.bos_token_id, 5, 9, trainer.bundle.tokenizer.eos_token_id]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).last_hidden_state, trainer.bundle.text_encoder(ids).last_hidden_state,
                              atol=1e-6)
    # Overwritten by a run that trains the UNet only: that text encoder is not this run's, so it goes.
    _trained(tiny_train_args + FULL + ["--max_train_steps", "1", "--overwrite"], "lora")
    assert not folder.exists() and (trainer.output_dir / "lora-unet").is_dir()
    folder.mkdir()  # a folder of that name that no run of ours wrote stays
    (folder / "model.safetensors").write_bytes(b"not ours")
    _trained(tiny_train_args + FULL + ["--max_train_steps", "1", "--overwrite"], "lora")
    assert (folder / "model.safetensors").read_bytes() == b"not ours"


def test_resume_is_exact_for_full_finetuning(tiny_train_args, tmp_path):
    common = tiny_train_args + FULL + ["--attacker_batch_size", "2"]
    whole = train(parse_config(TrainConfig, common + ["--max_train_steps", "4", "--output_dir", str(tmp_path / "a")]),
                  "smp_lora")
    train(parse_config(TrainConfig, common + ["--max_train_steps", "2", "--save_state", "--output_dir",
                                              str(tmp_path / "b")]), "smp_lora")
    resumed = train(parse_config(TrainConfig, common + ["--max_train_steps", "4", "--resume",
                                                        str(tmp_path / "b" / "smp_lora-state"), "--output_dir",
                                                        str(tmp_path / "c")]), "smp_lora")
    a, b = load_file(whole.weights_path), load_file(resumed.weights_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A full fine-tune reads no LoRA setting, so a resume may change them (a LoRA TOML reused for it): they were
    # compared, and refused ("it was trained with network_dim = 4, this run has 8")
    again = common + ["--max_train_steps", "4", "--network_dim", "8", "--network_alpha", "2", "--network_dropout", "0.1",
                      "--resume", str(tmp_path / "b" / "smp_lora-state"), "--output_dir", str(tmp_path / "d"), "--dry_run"]
    assert train_entry("smp_lora", "", again) == 0


def test_base_model_switch_swaps_the_initial_weights_in_and_back(tiny_model_dir):
    bundle = load_sd_model(str(tiny_model_dir))
    initial = _unet_output(bundle.unet)
    trained = FullParametrization(bundle, train_text_encoder=False, keep_base=True)
    with torch.no_grad():
        for p in trained.params:
            p.add_(0.01)
    moved = _unet_output(bundle.unet)
    assert not torch.allclose(moved, initial)
    with trained.disabled():
        assert torch.equal(_unet_output(bundle.unet), initial)
    assert torch.equal(_unet_output(bundle.unet), moved)
    assert all(p.requires_grad for p in trained.params)


@pytest.mark.parametrize("method", ["smp_lora", "mp_lora"])  # MP-LoRA did not keep the base: it crashed
def test_calibrated_proxy_trains_a_full_finetune(tiny_train_args, method, tmp_path):
    args = tiny_train_args + FULL + ["--attacker_batch_size", "2", "--attacker_features", "t_loss",
                                     "--attacker_calibration", "base", "--attacker_normalization", "standardize",
                                     "--max_train_steps", "2", "--output_dir", str(tmp_path / method)]
    result = train(parse_config(TrainConfig, args), method)
    assert result.global_step == 2 and "g" in result.final_logs


@pytest.mark.parametrize("flags, method, expected", [
    (["--network_weights", "x.safetensors"], "lora", "'network_weights' continues a LoRA"),
    ([], "dp_lora", "DP-SGD trains adapters only"),
    (["--unet_lr", "0"], "lora", "nothing to train"),
])
def test_bad_full_finetune_settings_are_one_line(tiny_train_args, capsys, flags, method, expected):
    lora_shape = tiny_train_args.index("--network_dim")  # "--network_dim 4 --network_alpha 4": a LoRA's, warned
    args = tiny_train_args[:lora_shape] + tiny_train_args[lora_shape + 4:]
    assert train_entry(method, "", args + FULL + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert train_entry("lora", "", tiny_train_args + FULL + ["--dry_run"]) == 0
    assert "network_alpha, network_dim configure a LoRA; 'train_mode = full' ignores them" in capsys.readouterr().err


def test_train_text_encoder_without_full_mode_is_refused(tiny_train_args, capsys):
    assert train_entry("lora", "", tiny_train_args + ["--train_text_encoder"]) == 2
    assert "'train_text_encoder' is for 'train_mode = full'" in capsys.readouterr().err


def test_dry_run_states_the_trained_parameter_count(tiny_train_args, capsys, tiny_model_dir):
    assert train_entry("lora", "", tiny_train_args + FULL + ["--dry_run"]) == 0
    count = sum(p.numel() for p in load_sd_model(str(tiny_model_dir)).unet.parameters())
    assert f"{count:,} trained parameters" in capsys.readouterr().out


def test_evaluate_mia_audits_a_full_finetune_in_both_saved_forms(tiny_train_args, tiny_model_dir, manifest_path,
                                                                 digits_dir, tmp_path, capsys):
    import evaluate_mia

    # with its text encoder trained: both forms are audited with it (the folder's from lora-text_encoder/ beside it)
    result = train(parse_config(TrainConfig, tiny_train_args + FULL + ["--max_train_steps", "2", "--clip_skip", "2",
                                                                       "--train_text_encoder"]), "lora")
    folder, single = result.weights_path.parent / "lora-unet", result.weights_path
    common = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--resolution", "32", "--timesteps", "100",
              "200", "--num_noise_draws", "1", "--attacks", "loss", "gsa", "--gsa_timesteps", "2", "--n_bootstrap", "0",
              "--no-plots", "--no-progress_bar", "--unet_weights", str(folder), str(single)]
    out = tmp_path / "eval"
    assert evaluate_mia.main(common + ["--split_manifest", str(manifest_path), "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["label"]): r["auc"] for r in report["results"]}
    for label in {label for _, label in rows}:
        assert rows[("lora-unet", label)] == pytest.approx(rows[("lora", label)], abs=1e-9), label
    assert report["conditioning"]["clip_skip"] == 2  # read from the fine-tune's own metadata
    single_meta = next(m["metadata"] for m in report["models"] if m["name"] == "lora")
    assert single_meta["smp_lora.train_mode"] == "full" and "smp_lora.sd_configs" not in single_meta
    assert single_meta["smp_lora.trained_text_encoder"] == "true"
    assert {m["name"]: m["text_encoder"] for m in report["models"]} == {"base": None, "lora-unet": "own", "lora": "own"}

    from conftest import SPLIT_SIZES

    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split

    other = tmp_path / "other.json"  # the same images under another split: the labels would be wrong
    write_manifest(make_split(scan_dataset(digits_dir), sizes=SPLIT_SIZES, seed=1, dataset_root=digits_dir), other)
    capsys.readouterr()
    assert evaluate_mia.main(common + ["--split_manifest", str(other), "--output_dir", str(tmp_path / "x")]) == 2
    assert "was trained with another split manifest" in capsys.readouterr().err


def test_resuming_a_lora_state_as_a_full_finetune_is_one_line(tiny_train_args, tmp_path, capsys):
    train(parse_config(TrainConfig, tiny_train_args + ["--max_train_steps", "1", "--save_state"]), "lora")
    state = tmp_path / "out" / "lora-state"
    args = tiny_train_args + FULL + ["--resume", str(state), "--output_dir", str(tmp_path / "full")]
    assert train_entry("lora", "", args) == 2
    err = capsys.readouterr().err.replace(  # tiny_train_args' LoRA shape: said to be ignored by a full fine-tune
        "warning: network_alpha, network_dim configure a LoRA; 'train_mode = full' ignores them\n", "")
    assert err.count("\n") == 1 and "train_mode = 'lora'" in err and "--train_mode" in err, err


def test_bf16_full_finetune_keeps_fp32_master_weights(tiny_train_args):
    trainer = _trained(tiny_train_args + FULL + ["--mixed_precision", "bf16", "--max_train_steps", "2"], "lora")
    assert {p.dtype for p in trainer.trained.params} == {torch.float32}
    assert trainer.bundle.text_encoder.dtype == torch.bfloat16  # the frozen parts run in the autocast dtype


def test_gradient_checkpointing_gives_the_same_full_finetune(tiny_train_args, tmp_path):
    runs = [train(parse_config(TrainConfig, tiny_train_args + FULL + ["--max_train_steps", "2", "--output_dir",
                                                                       str(tmp_path / name)] + extra), "lora")
            for name, extra in (("a", []), ("b", ["--gradient_checkpointing"]))]
    a, b = (load_file(r.weights_path.parent / "lora-unet" / "diffusion_pytorch_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("args, frozen", [
    (["--unet_lr", "0", "--text_encoder_lr", "1e-3"], "lora_unet"),  # only the text-encoder LoRA trains
    (FULL + ["--train_text_encoder", "--unet_lr", "0"], "unet"),  # only the text encoder trains
])
def test_a_part_at_rate_zero_is_frozen_and_gathers_no_gradient(tiny_train_args, args, frozen):
    """Before, every part kept requires_grad: the optimiser never zeroed the rate-0 part's gradients, which piled
    up step after step into the logged gradient norm and the clipping of the other part."""
    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + args + ["--max_train_steps", "3"]), "lora")
    trainer.prepare()
    if trainer.trained.kind == "lora":
        parts = {"lora_unet": [p for m in trainer.trained.network.unet_loras for p in m.parameters()]}
    else:
        parts = {"unet": list(trainer.bundle.unet.parameters())}
    norms = [trainer.step()["grad_norm"] for _ in range(3)]
    assert all(not p.requires_grad and p.grad is None for p in parts[frozen])
    optimised_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in trainer.trained.params} == optimised_ids
    optimised = torch.cat([p.grad.flatten() for p in trainer.trained.params if p.grad is not None])
    assert norms[-1] == pytest.approx(optimised.norm().item())  # the norm is the trained part's, this step's


def test_dim_from_weights_reads_the_parent_lora_once(tiny_train_args, tiny_model_dir, tmp_path, safetensors_reads):
    """--dim_from_weights takes the network's shape, its weights and the parent's metadata (its lineage) from one
    read of the --network_weights file (its header was read a second time for the metadata)."""
    from library.train.parametrization import _lora_network
    from networks.lora import create_network

    bundle = load_sd_model(str(tiny_model_dir))
    parent = tmp_path / "parent.safetensors"
    create_network(1.0, 4, 4, None, bundle.text_encoder, bundle.unet).save_weights(parent)
    config = parse_config(TrainConfig, tiny_train_args + ["--network_weights", str(parent), "--dim_from_weights"])
    safetensors_reads.clear()
    network, metadata = _lora_network(config, bundle)
    assert dict(safetensors_reads) == {("load_file", parent.name): 1, ("safe_open", parent.name): 1}
    assert metadata["ss_network_dim"] == "4" and {m.rank for m in network.loras} == {4}


def test_a_new_lora_has_the_flags_rank_alpha_and_dropout(tiny_train_args, tiny_model_dir):
    """--network_dim is the rank and --network_alpha the scale: swapped or dropped, a run trains another LoRA."""
    from library.train.parametrization import _lora_network

    config = parse_config(TrainConfig, tiny_train_args + ["--network_dim", "8", "--network_alpha", "2",
                                                          "--network_dropout", "0.1"])
    network, parent = _lora_network(config, load_sd_model(str(tiny_model_dir)))
    assert parent is None and (network.lora_dim, network.alpha, network.dropout) == (8, 2.0, 0.1)
    assert {(m.rank, m.dropout) for m in network.loras} == {(8, 0.1)}


def test_a_saved_model_folder_is_in_the_save_precision_and_tagged_for_its_loaders(tmp_path):
    """--save_precision fp16 halves the model folders as it does the single file; loaders check "format": "pt"."""
    from library.train.parametrization import _save_model_folder

    model = torch.nn.Linear(2, 3)
    model.register_buffer("ids", torch.arange(3))  # an integer buffer keeps its dtype
    _save_model_folder(tmp_path / "m", model, {"a": 1}, "model.safetensors", torch.float16,
                       {"smp_lora.train_mode": "full"})
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as handle:
        assert handle.metadata() == {"format": "pt", "smp_lora.train_mode": "full"}
        assert {k: handle.get_tensor(k).dtype for k in handle.keys()} == {
            "weight": torch.float16, "bias": torch.float16, "ids": torch.int64}
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("flag", [[], ["--gradient_checkpointing"]])
def test_gradient_checkpointing_is_switched_on_only_when_asked(tiny_train_args, flag):
    """It trades compute for memory: a run that asked for it and ran out of memory without it would be a surprise."""
    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + FULL + flag), "lora")
    trainer.prepare()
    assert trainer.bundle.unet.is_gradient_checkpointing == bool(flag)
