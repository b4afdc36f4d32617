"""Auditing SD v1.x fine-tunes that did not come from this toolkit (issue 15 "Protocol"): a diffusers/PEFT-format
LoRA and a fully fine-tuned UNet (diffusers folder and single file) evaluated end to end on the tiny stack, the
same numbers as the kohya LoRA they were made from, the base weights restored, and one error line for a file
that does not fit the model."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mia_world import base_args
from safetensors.torch import load_file, save_file

import evaluate_mia
from library.errors import ModelError
from library.eval.features import FeatureSettings, applied_lora, feature_cache_key
from library.eval.unet_weights import check_unet_weights, resolve_unet_weights
from library.sd.bundle import fingerprint
from library.sd.single_file import save_single_file
from networks.lora import create_network_from_weights, lora_file_sha256
from networks.lora_convert import group_lora_state_dict, to_kohya_state_dict

# No bootstrap and no plots: these tests compare per-sample scores and AUCs, which need neither (half the time).
ATTACKS = ("--attacks", "loss", "calibrated", "sima", "--n_bootstrap", "0", "--no-plots")
ATTENTION = ("to_q", "to_k", "to_v", "to_out_0")  # diffusers' convert_state_dict_to_diffusers renames only these


# ---------------------------------------------------------------------------------------------- helpers


def kohya_to_diffusers(kohya: dict[str, torch.Tensor], unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The keys train_text_to_image_lora.py would write for these weights, built without networks.lora_convert:
    module paths found by spelling the UNet's own paths kohya's way; attention projections as ``.lora.down``
    (what convert_state_dict_to_diffusers makes of PEFT's lora_A), the other layers keep PEFT's ``lora_A/B``;
    ``unet.`` prefix; no alphas (alpha = rank, as the over-fitted LoRA has)."""
    paths = {"lora_unet_" + path.replace(".", "_"): path for path, _ in unet.named_modules() if path}
    out = {}
    for key, tensor in kohya.items():
        name, _, suffix = key.partition(".")
        if suffix == "alpha":
            assert float(tensor) == tensor.new_tensor(kohya[f"{name}.lora_down.weight"].shape[0]).item()
            continue
        path = paths[name]
        if name.endswith(ATTENTION):
            tail = "lora.down.weight" if suffix == "lora_down.weight" else "lora.up.weight"
        else:
            tail = "lora_A.weight" if suffix == "lora_down.weight" else "lora_B.weight"
        out[f"unet.{path}.{tail}"] = tensor
    return out


def evaluate(world, out, *extra):
    assert evaluate_mia.main(base_args(world, out, *extra)) == 0
    report = json.loads((out / "report.json").read_text())
    with open(out / "scores.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    return report, table


def column(table, model, label):
    return np.array([float(row[f"{model}|{label}"]) for row in table])


def labels_of(table, model):
    return sorted(c.split("|", 1)[1] for c in table[0] if c.startswith(f"{model}|"))


def auc(report, model, label):
    return next(r["auc"] for r in report["results"] if r["model"] == model and r["label"] == label)


def one_error(capsys, argv):
    capsys.readouterr()
    assert evaluate_mia.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "warning: ")) for line in lines), lines
    return errors[0]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(mia_world):
    return mia_world


@pytest.fixture(scope="module")
def kohya_run(world, merged, tmp_path_factory):
    """One run: the kohya LoRA (row ``overfit``) and the same LoRA merged into full UNets (``ft_folder``,
    ``ft_single``)."""
    return evaluate(world, tmp_path_factory.mktemp("kohya") / "out", "--network_weights", str(world["lora"]),
                    "--unet_weights", str(merged["folder"]), str(merged["single"]), *ATTACKS)


@pytest.fixture(scope="module")
def peft_file(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("peft") / "overfit.safetensors"  # same stem: the same row name "overfit"
    save_file(kohya_to_diffusers(load_file(str(world["lora"])), world["bundle"].unet), str(path),
              metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def merged(world, tmp_path_factory):
    """The over-fitted LoRA merged into a copy of the tiny model, saved as a diffusers UNet folder and as a
    single-file checkpoint."""
    root = tmp_path_factory.mktemp("merged")
    bundle = copy.deepcopy(world["bundle"])
    network, _ = create_network_from_weights(1.0, world["lora"], None, bundle.text_encoder, bundle.unet)
    network.merge_to(None, bundle.unet)
    bundle.unet.save_pretrained(str(root / "ft_folder"), safe_serialization=True)
    save_single_file(bundle, root / "ft_single.safetensors")
    return {"folder": root / "ft_folder", "single": root / "ft_single.safetensors", "unet": bundle.unet}


# ---------------------------------------------------------------------------------------------- LoRA formats


def test_diffusers_names_are_what_diffusers_writes(peft_file):
    keys = set(load_file(str(peft_file)))
    # By hand, as train_text_to_image_lora.py's pytorch_lora_weights.safetensors names them.
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight" in keys
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in keys
    assert not any(k.startswith("lora_") or k.endswith("alpha") for k in keys)


@pytest.fixture(scope="module")
def peft_run(world, peft_file, tmp_path_factory):
    return evaluate(world, tmp_path_factory.mktemp("peft_run") / "out", "--network_weights", str(peft_file), *ATTACKS)


def test_peft_format_lora_gives_the_kohya_numbers_end_to_end(kohya_run, peft_run):
    report, table = peft_run
    kohya_report, kohya_table = kohya_run
    labels = labels_of(kohya_table, "overfit")
    assert labels == labels_of(table, "overfit") and any(label.startswith("sima") for label in labels)
    for label in labels:
        np.testing.assert_allclose(column(table, "overfit", label), column(kohya_table, "overfit", label),
                                   rtol=1e-6, atol=1e-6, err_msg=label)
        assert auc(report, "overfit", label) == pytest.approx(auc(kohya_report, "overfit", label), abs=1e-9)
    print({label: round(auc(report, "overfit", label), 3) for label in labels})
    assert auc(report, "overfit", "loss avg") > 0.75
    assert report["models"][1]["lora_sha256"] != kohya_report["models"][1]["lora_sha256"]


def test_peft_prefixes_and_processor_layout_read_as_kohya():
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    kohya = f"lora_unet_{block.replace('.', '_')}_attn1_to_out_0"
    layouts = [(f"unet.{block}.attn1.to_out.0.lora_{{}}.weight", "A", "B"),  # PEFT keys, three prefixes
               (f"base_model.model.{block}.attn1.to_out.0.lora_{{}}.weight", "A", "B"),
               (f"{block}.attn1.to_out.0.lora_{{}}.default.weight", "A", "B"),
               (f"unet.{block}.attn1.to_out.0.lora.{{}}.weight", "down", "up"),  # diffusers
               (f"unet.{block}.attn1.processor.to_out_lora.{{}}.weight", "down", "up")]  # attention processors
    for pattern, d, u in layouts:
        converted, origin = to_kohya_state_dict({pattern.format(d): down, pattern.format(u): up})
        assert converted == {f"{kohya}.lora_down.weight": down, f"{kohya}.lora_up.weight": up}, pattern
        assert origin[f"{kohya}.lora_down.weight"] == pattern.format(d)
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"
    assert set(to_kohya_state_dict({te: down})[0]) == {"lora_te_text_model_encoder_layers_0_self_attn_q_proj"
                                                       ".lora_down.weight"}
    old_te = "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.up.weight"
    assert set(to_kohya_state_dict({old_te: up})[0]) == {"lora_te_text_model_encoder_layers_1_self_attn_out_proj"
                                                         ".lora_up.weight"}
    kohya_sd = {f"{kohya}.lora_down.weight": down}
    assert to_kohya_state_dict(kohya_sd) == (kohya_sd, {})


def test_each_attention_processor_projection_reads_as_its_own_layer():
    """The old attention-processor layout names the projection in the key: q, k, v and out each land on their own
    layer (a swapped q/k would load every weight, onto the wrong matrix)."""
    unet, te = "unet.mid_block.attentions.0.transformer_blocks.0.attn2", "text_encoder.text_model.encoder.layers.0"
    for projection, unet_name, te_name in (("to_q", "to_q", "q_proj"), ("to_k", "to_k", "k_proj"),
                                           ("to_v", "to_v", "v_proj"), ("to_out", "to_out_0", "out_proj")):
        assert set(to_kohya_state_dict({f"{unet}.processor.{projection}_lora.down.weight": torch.zeros(1)})[0]) == {
            f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_{unet_name}.lora_down.weight"}
        assert set(to_kohya_state_dict({f"{te}.self_attn.{projection}_lora.up.weight": torch.zeros(1)})[0]) == {
            f"lora_te_text_model_encoder_layers_0_self_attn_{te_name}.lora_up.weight"}


def test_a_peft_key_without_a_prefix_reads_as_its_part_and_alpha_patterns_match_module_suffixes():
    """A PEFT text-encoder adapter saved without a prefix (``text_model.`` / ``encoder.layers.`` paths) is the text
    encoder's; an ``alpha_pattern`` key applies, as in PEFT, to the modules whose path ends with it, not to any
    path that contains it (a block's name)."""
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"
    for path in ("text_model.encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.q_proj"):
        assert set(to_kohya_state_dict({f"{path}.lora_A.weight": torch.zeros(1)})[0]) == {te}
    key = "unet.mid_block.attentions.0.proj_in"
    sd = {f"{key}.lora_A.weight": torch.randn(4, 8), f"{key}.lora_B.weight": torch.randn(8, 4)}
    for pattern, alpha in (({"mid_block": 6}, 2.0), ({"attentions.0.proj_in": 6}, 6.0)):
        meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.alpha_pattern": pattern})}
        assert float(to_kohya_state_dict(sd, meta)[0]["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == alpha


def test_alpha_from_adapter_metadata_and_alpha_keys():
    key = "unet.mid_block.attentions.0.proj_in"
    sd = {f"{key}.lora_A.weight": torch.randn(4, 8), f"{key}.lora_B.weight": torch.randn(8, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2, "unet.alpha_pattern": {}})}
    converted, _ = to_kohya_state_dict(sd, meta)
    assert float(converted["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 2.0
    pattern = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2,
                                                    "unet.alpha_pattern": {"proj_in": 6}, "unet.use_rslora": True})}
    converted, _ = to_kohya_state_dict(sd, pattern)
    assert float(converted["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == pytest.approx(6 * 2.0)  # *sqrt(4)
    converted, _ = to_kohya_state_dict({**sd, f"{key}.alpha": torch.tensor(3.0)}, meta)  # the file's own alpha wins
    assert float(converted["lora_unet_mid_block_attentions_0_proj_in.alpha"]) == 3.0
    with pytest.raises(ModelError, match="DoRA"):
        to_kohya_state_dict({**sd, f"{key}.lora_magnitude_vector": torch.ones(8)})
    with pytest.raises(ModelError, match="both give"):
        to_kohya_state_dict({**sd, "unet.mid_block.attentions.0.proj_in.lora.down.weight": torch.randn(4, 8)})


def test_an_sdxl_second_text_encoder_key_in_any_layout_is_named_as_sdxl():
    """diffusers/PEFT SDXL files name text_encoder_2 keys with the usual tails; read as UNet layers, the error
    blamed a layer the model lacks (and to_kohya_state_dict alone converted them) instead of naming SDXL."""
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    for key in (f"{te2}.lora_A.weight", f"{te2}.lora_linear_layer.down.weight", f"{te2}.alpha"):
        with pytest.raises(ModelError, match=r"x\.safetensors: key 'text_encoder_2\..*an SDXL LoRA"):
            to_kohya_state_dict({key: torch.zeros(4, 8)}, source="x.safetensors")


def test_dora_and_bias_networks_are_refused_by_name():
    """A DoRA adapter (use_dora in its metadata) or a LoRA with bias terms is named as such, not loaded without them."""
    key = "unet.mid_block.attentions.0.proj_in"
    sd = {f"{key}.lora_A.weight": torch.randn(4, 8), f"{key}.lora_B.weight": torch.randn(8, 4)}
    with pytest.raises(ModelError, match=rf"key '{key}\.lora_B\.bias' belongs to a LoRA with bias terms"):
        to_kohya_state_dict({**sd, f"{key}.lora_B.bias": torch.zeros(8)}, source="x.safetensors")
    dora = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.use_dora": True})}
    with pytest.raises(ModelError, match=r"x\.safetensors is a DoRA network \(unet\.use_dora\)"):
        to_kohya_state_dict(sd, dora, source="x.safetensors")


def test_an_attention_processor_segment_is_not_part_of_the_layers_name():
    """diffusers drops ``.processor.`` from a key (KEYS_TO_ALWAYS_REPLACE); kept, the layer would match none."""
    path = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
    converted, _ = to_kohya_state_dict({f"{path}.processor.to_q.lora.down.weight": torch.zeros(1)})
    assert set(converted) == {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"}


def test_a_peft_layer_missing_its_a_or_b_names_the_files_key_and_the_missing_one():
    """A half-written PEFT file: the error names the key as the file spells it and which of A / B is missing."""
    key = "unet.mid_block.attentions.0.proj_in"
    for present, missing in (("lora_A", r"up \(lora_B\)"), ("lora_B", r"down \(lora_A\)")):
        with pytest.raises(ModelError, match=rf"'{key}\.{present}\.weight' .* has no matching {missing} weight"):
            group_lora_state_dict({f"{key}.{present}.weight": torch.zeros(4, 4)}, "x.safetensors")


def test_diffusers_text_encoder_lora_is_applied_with_its_scale(world):
    bundle = world["bundle"]
    layer = bundle.text_encoder.get_submodule("text_model.encoder.layers.0.self_attn.q_proj") \
        if hasattr(bundle.text_encoder, "text_model") else bundle.text_encoder.get_submodule(
            "encoder.layers.0.self_attn.q_proj")
    width = layer.in_features
    down, up = torch.randn(2, width), torch.randn(width, 2)
    prefix = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    network, _ = create_network_from_weights(1.0, {f"{prefix}.down.weight": down, f"{prefix}.up.weight": up},
                                          None, bundle.text_encoder, bundle.unet)
    x = torch.randn(3, width)
    expected = layer(x) + x @ (up @ down).T  # no alpha: scale 1
    network.apply_to(bundle.text_encoder, bundle.unet)
    try:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    finally:
        network.restore()


def test_sd_scripts_locon_conv_key_loads_with_its_alpha(world):
    unet = world["bundle"].unet
    conv = unet.down_blocks[0].resnets[0].conv1
    rank, alpha = 2, 1.0
    down = torch.randn(rank, conv.in_channels, 3, 3)
    up = torch.randn(conv.out_channels, rank, 1, 1)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"  # sd-scripts' LoCon naming of this conv
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    network, _ = create_network_from_weights(1.0, sd, None, None, unet)
    x = torch.randn(1, conv.in_channels, 8, 8)
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (alpha / rank)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, padding=conv.padding)
    network.apply_to(None, unet, apply_text_encoder=False)
    try:
        torch.testing.assert_close(conv(x), expected, rtol=1e-4, atol=1e-4)
    finally:
        network.restore()


def test_peft_key_for_a_missing_module_is_one_error_line(world, tmp_path, capsys):
    bad = tmp_path / "peft_bad.safetensors"
    key = "unet.down_blocks.7.attentions.0.proj_in"
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 32), f"{key}.lora_B.weight": torch.zeros(32, 2)}, str(bad))
    err = one_error(capsys, base_args(world, tmp_path / "out", "--network_weights", str(bad), "--attacks", "loss"))
    assert "peft_bad.safetensors" in err and f"{key}.lora_A.weight" in err and "matches no layer" in err


# ---------------------------------------------------------------------------------------------- full UNet


def test_merged_unet_gives_the_lora_losses_end_to_end(kohya_run, peft_run):
    report, table = kohya_run
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "overfit", "ft_folder", "ft_single"]
    keys = report["features"]["cache"]
    assert len({keys[name]["key"] for name in names}) == 4  # two UNets never share a cache entry
    for name in ("ft_folder", "ft_single"):
        labels = labels_of(table, name)
        assert labels == labels_of(table, "overfit") and "loss avg" in labels
        for label in labels:
            np.testing.assert_allclose(column(table, name, label), column(table, "overfit", label), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name} {label}")
        print(name, {label: round(auc(report, name, label), 3) for label in labels})
        assert auc(report, name, "loss avg") > 0.75
    # The base row is the base model's: the same as in the run without --unet_weights.
    peft_table = peft_run[1]
    for label in labels_of(table, "base"):
        np.testing.assert_array_equal(column(table, "base", label), column(peft_table, "base", label))


def test_unet_swap_restores_the_base_weights(world, merged):
    bundle = world["bundle"]
    before = fingerprint(bundle)
    params = dict(bundle.unet.named_parameters())
    weights = resolve_unet_weights(merged["single"])
    x = torch.randn(1, bundle.unet.config.in_channels, 4, 4)
    cond = torch.randn(1, 3, bundle.unet.config.cross_attention_dim)
    with torch.no_grad():
        base_out = bundle.unet(x, 5, cond).sample
        with applied_lora(bundle, None, 1.0, torch.device("cpu"), torch.float32, unet=weights) as network:
            assert network is None
            swapped_out = bundle.unet(x, 5, cond).sample
            torch.testing.assert_close(swapped_out, merged["unet"](x, 5, cond).sample, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="inside"):
            with applied_lora(bundle, None, 1.0, torch.device("cpu"), torch.float32, unet=weights):
                raise RuntimeError("inside")
        assert not torch.allclose(swapped_out, base_out)
        torch.testing.assert_close(bundle.unet(x, 5, cond).sample, base_out, rtol=0, atol=0)
    assert fingerprint(bundle) == before
    assert all(p is params[n] and not p.requires_grad for n, p in bundle.unet.named_parameters())


def test_model_specs_name_and_record_each_unet(world, merged, tmp_path):
    from library.data.manifest import manifest_sha256
    from library.eval.config import EvalConfig
    from library.eval.inputs import SplitIdentity, model_specs

    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    for file in merged["folder"].iterdir():
        (pipeline / "unet" / file.name).write_bytes(file.read_bytes())
    config = EvalConfig(unet_weights=[str(merged["folder"]), str(merged["single"]), str(pipeline / "unet"),
                                      str(pipeline)], network_weights=[str(world["lora"])])
    specs = model_specs(config, SplitIdentity(manifest_sha256(world["manifest_file"]), "not recorded by these files"))
    assert [(s.name, s.kind) for s in specs] == [("base", "base"), ("overfit", "lora"), ("ft_folder", "unet"),
                                                 ("ft_single", "unet"), ("pipe", "unet"), ("pipe-2", "unet")]
    record = specs[2].record()
    assert record["kind"] == "unet" and record["layout"] == "diffusers" and record["sha256"] == specs[2].unet.sha256
    assert specs[4].sha256 == specs[5].sha256 == specs[2].sha256  # the same weights, wherever they lie
    assert specs[1].record()["sha256"] == specs[1].lora_sha256 and specs[0].record()["path"] is None


def test_diffusers_alphas_in_the_header_are_part_of_a_loras_identity(world, peft_file, tmp_path):
    """Two diffusers files with the same tensors and another lora_alpha in the header are other models: they must
    not share a feature cache entry (the second used to be served the first one's numbers)."""
    from library.data.manifest import manifest_sha256
    from library.eval.config import EvalConfig
    from library.eval.inputs import SplitIdentity, model_specs

    files = []
    for alpha in (16, 4):
        path = tmp_path / f"alpha{alpha}" / "pytorch_lora_weights.safetensors"
        path.parent.mkdir()
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 16, "unet.lora_alpha": alpha})}
        save_file(load_file(str(peft_file)), str(path), metadata=meta)
        files.append(str(path))
    config = EvalConfig(network_weights=[*files, str(peft_file)])
    specs = model_specs(config, SplitIdentity(manifest_sha256(world["manifest_file"]), "-"))[1:]
    assert len({spec.sha256 for spec in specs}) == 3
    assert specs[2].sha256 == lora_file_sha256(peft_file)  # no adapter header: the tensors' hash, as before


def test_unet_sha256_enters_the_cache_key(merged):
    settings = FeatureSettings(timesteps=(1,), num_noise_draws=1, seed=0)
    plain = feature_cache_key(settings, "fp", None, "m", 4, kernels="k")
    assert feature_cache_key(settings, "fp", None, "m", 4, None, kernels="k") == plain
    folder, single = resolve_unet_weights(merged["folder"]), resolve_unet_weights(merged["single"])
    assert folder.layout == "diffusers" and single.layout == "single_file" and folder.sha256 != single.sha256
    assert resolve_unet_weights(merged["folder"]).sha256 == folder.sha256  # deterministic
    keyed = {feature_cache_key(settings, "fp", None, "m", 4, w.sha256, kernels="k") for w in (folder, single)}
    assert len(keyed | {plain}) == 3


def test_unet_of_another_shape_is_one_error_line(world, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    config = dict(world["bundle"].unet.config)
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    UNet2DConditionModel.from_config(config).save_pretrained(str(tmp_path / "wide" / "unet"))
    with pytest.raises(ModelError, match="conv_in.weight"):  # from the headers alone, no weight read
        check_unet_weights(resolve_unet_weights(tmp_path / "wide"), world["bundle"].unet, world["bundle"].text_encoder)
    err = one_error(capsys, base_args(world, tmp_path / "out", "--unet_weights", str(tmp_path / "wide"),
                                      "--attacks", "loss"))
    assert "wide" in err and "do not fit the base model's UNet" in err


def test_bad_unet_paths_are_one_error_line(world, tmp_path, capsys):
    missing = one_error(capsys, base_args(world, tmp_path / "a", "--unet_weights", str(tmp_path / "nope")))
    assert "does not exist" in missing
    ckpt = tmp_path / "ft.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    assert "--allow_pickle" in one_error(capsys, base_args(world, tmp_path / "b", "--unet_weights", str(ckpt)))
    lora_as_unet = one_error(capsys, base_args(world, tmp_path / "c", "--unet_weights", str(world["lora"])))
    assert "not an SD single-file checkpoint" in lora_as_unet
    assert "it is a LoRA: pass it with --network_weights" in lora_as_unet  # the user's mix-up, named as such
    peft = tmp_path / "peft.safetensors"  # a diffusers/PEFT LoRA (lora_A with an adapter name) too
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.default.weight": torch.zeros(4, 8)}, str(peft))
    assert "it is a LoRA: pass it with --network_weights" in one_error(
        capsys, base_args(world, tmp_path / "d", "--unet_weights", str(peft)))


def test_a_unet_folder_is_read_in_each_layout_diffusers_writes(tmp_path):
    """A sharded save (each shard once, in order; a missing one named), pickle-only folders (read with --allow_pickle
    only) and the text encoder a full fine-tune writes beside its UNet (also as its fp16 variant)."""
    unet = tmp_path / "ft-unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {"conv_in.weight": shards[1], "conv_in.bias": shards[0], "conv_out.weight": shards[0]}
    for shard in shards:
        save_file({k: torch.ones(2) for k, v in weight_map.items() if v == shard}, str(unet / shard))
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert resolve_unet_weights(unet).files == (unet / shards[0], unet / shards[1])
    (tmp_path / "ft-text_encoder").mkdir()
    text_encoder = tmp_path / "ft-text_encoder" / "model.fp16.safetensors"
    save_file({"text_model.final_layer_norm.weight": torch.ones(2)}, str(text_encoder))
    with_text_encoder = resolve_unet_weights(unet)
    assert with_text_encoder.text_encoder == (text_encoder,)
    save_file({"text_model.final_layer_norm.weight": torch.zeros(2)}, str(text_encoder))
    assert resolve_unet_weights(unet).sha256 != with_text_encoder.sha256  # another text encoder: another model
    (unet / shards[1]).unlink()
    with pytest.raises(ModelError, match=f"shard {shards[1]} named by .*index.json is missing"):
        resolve_unet_weights(unet)
    for name in shards[:1] + ["diffusion_pytorch_model.safetensors.index.json"]:
        (unet / name).unlink()
    text_encoder.rename(text_encoder.with_name("pytorch_model.bin"))
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match=r"ft-unet holds only pickle weights \(diffusion_pytorch_model\.bin\)"):
        resolve_unet_weights(unet)
    (unet / "diffusion_pytorch_model.bin").unlink()
    save_file({"conv_in.weight": torch.ones(2)}, str(unet / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelError, match=r"text encoder .*ft-text_encoder .*only pickle weights.*--allow_pickle"):
        resolve_unet_weights(unet)
    pickled = resolve_unet_weights(unet, allow_pickle=True)
    assert pickled.files == (unet / "diffusion_pytorch_model.safetensors",)
    assert pickled.text_encoder == (tmp_path / "ft-text_encoder" / "pytorch_model.bin",)


def test_a_single_files_text_encoder_is_its_own_unless_our_full_finetune_says_it_was_not_trained(tmp_path):
    """Whose text encoder a single file is audited with decides every feature: its own is part of its identity, and a
    UNet folder whose fine-tune trained one is refused without it (naming where it belongs)."""
    tensors = {"model.diffusion_model.conv_in.weight": torch.ones(2),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    files = {"published": None, "untrained": {"smp_lora.train_mode": "full", "smp_lora.trained_text_encoder": "false"},
             "older": {"smp_lora.train_mode": "full"}}
    for name, metadata in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
    own, base = (resolve_unet_weights(tmp_path / f"{name}.safetensors") for name in ("published", "untrained"))
    assert own.text_encoder == (tmp_path / "published.safetensors",) and base.text_encoder == ()
    assert own.sha256 != base.sha256  # the same tensors, another text encoder: another model
    assert resolve_unet_weights(tmp_path / "older.safetensors").text_encoder == ()
    (tmp_path / "older-text_encoder").mkdir()  # written before the record: the folder beside it says it trained one
    save_file({"text_model.final_layer_norm.weight": torch.zeros(2)},
              str(tmp_path / "older-text_encoder" / "model.safetensors"))
    assert resolve_unet_weights(tmp_path / "older.safetensors").text_encoder == (tmp_path / "older.safetensors",)
    for unet, where in ((tmp_path / "ft-unet", "ft-text_encoder/ next to ft-unet/"),
                        (tmp_path / "pipe" / "unet", "text_encoder/ next to unet/")):
        unet.mkdir(parents=True)
        (unet / "config.json").write_text("{}")
        save_file({"conv_in.weight": torch.ones(2)}, str(unet / "diffusion_pytorch_model.safetensors"),
                  metadata={"smp_lora.trained_text_encoder": "true"})
        with pytest.raises(ModelError, match=f"text encoder too, which is not beside them \\(as {where}\\)"):
            resolve_unet_weights(unet)


def test_weights_of_another_architecture_are_named_and_a_swap_casts_and_gives_the_base_back(tmp_path):
    """A fine-tune must fit its base tensor for tensor (an extra, missing or resized one is one error naming it); its
    weights are cast to the base's dtype for the block and the base's own tensors are put back afterwards."""
    from library.eval.unet_weights import (
        UNetWeights,
        load_text_encoder_state_dict,
        load_unet_state_dict,
        swapped_weights,
    )

    base = torch.nn.Linear(2, 1)
    unet = tmp_path / "diffusion_pytorch_model.safetensors"

    def fits(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        save_file(tensors, str(unet))
        return load_unet_state_dict(UNetWeights(tmp_path, "diffusers", (unet,), "0" * 64), base)

    good = {"weight": torch.full((1, 2), 2.0, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    state = fits(good)
    with pytest.raises(ModelError, match=r"1 tensors missing, 1 unexpected, e.g. missing bias"):
        fits({"weight": good["weight"], "extra": torch.zeros(1)})
    with pytest.raises(ModelError, match=r"0 tensors missing, 1 unexpected, e.g. unexpected extra"):
        fits({**good, "extra": torch.zeros(1)})
    with pytest.raises(ModelError, match=r"weight is \(1, 3\), the base model's \(1, 2\)"):
        fits({**good, "weight": torch.zeros(1, 3)})
    weight = base.weight
    with swapped_weights(base, state):
        assert base.weight.dtype == torch.float32 and base(torch.ones(1, 2)).item() == 4.0
    assert base.weight is weight
    text = tmp_path / "model.safetensors"  # transformers versions differ in the text_model. prefix of the names
    save_file({"text_model.final_layer_norm.weight": torch.ones(2)}, str(text))
    weights = UNetWeights(tmp_path, "diffusers", (unet,), "0" * 64, (text,))
    for names in (["text_model.final_layer_norm.weight"], ["final_layer_norm.weight"]):
        encoder = SimpleNamespace(state_dict=lambda names=names: {k: torch.zeros(2) for k in names})
        assert list(load_text_encoder_state_dict(weights, encoder)) == names
    extra = {"text_model.embeddings.position_ids": torch.zeros(2)}  # a buffer older exports hold: not a misfit
    save_file({"text_model.final_layer_norm.weight": torch.ones(2), **extra}, str(text))
    assert list(load_text_encoder_state_dict(weights, encoder)) == names
    save_file({"text_model.final_layer_norm.weight": torch.ones(2), "text_model.extra.weight": torch.ones(2)},
              str(text))
    with pytest.raises(ModelError, match=r"text encoder \(0 tensors missing, 1 unexpected, e.g. unexpected extra"):
        load_text_encoder_state_dict(weights, encoder)


def test_a_single_file_unet_is_a_safetensors_or_with_allow_pickle_a_pickle(tmp_path):
    """A pickle is read only when the user vouches for it; a file of no weight format is named as such."""
    from library.eval.unet_weights import _read_file

    ckpt, notes = tmp_path / "ft.ckpt", tmp_path / "ft.txt"
    ckpt.write_bytes(b"pickle")
    notes.write_text("notes")
    with pytest.raises(ModelError, match=r"ft\.ckpt is a pickle \(\.ckpt\) checkpoint; pass --allow_pickle"):
        resolve_unet_weights(ckpt)
    assert resolve_unet_weights(ckpt, allow_pickle=True).files == (ckpt,)
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": torch.ones(2)}, "global_step": 3}, ckpt)
    read = _read_file(ckpt, meta=False, wanted="model.diffusion_model.")  # A1111's state_dict wrapper
    assert list(read) == ["model.diffusion_model.conv_in.weight"]
    with pytest.raises(ModelError, match=r"ft\.txt is neither a diffusers folder nor a \.safetensors checkpoint"):
        resolve_unet_weights(notes)


def test_an_upper_case_safetensors_name_is_read_as_safetensors(tmp_path):
    """FT.SAFETENSORS (as some Windows tools write it) is the same checkpoint as ft.safetensors: its identity, metadata
    and own text encoder; it was hashed with its metadata, its text encoder ignored and its tensors unpickled."""
    from library.eval.unet_weights import _read_file, weights_metadata

    tensors = {"model.diffusion_model.conv_in.weight": torch.ones(2, 2),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}
    lower, upper = tmp_path / "ft.safetensors", tmp_path / "FT.SAFETENSORS"
    save_file(tensors, str(lower))
    save_file(tensors, str(upper), metadata={"note": "saved again"})
    expected, weights = resolve_unet_weights(lower), resolve_unet_weights(upper)
    assert (weights.layout, weights.sha256, weights.text_encoder) == ("single_file", expected.sha256, (upper,))
    assert weights_metadata(weights) == {"note": "saved again"}
    read = _read_file(upper, meta=True, wanted="model.diffusion_model.")
    assert list(read) == ["model.diffusion_model.conv_in.weight"]


def test_an_sdxl_kohya_file_is_named_as_sdxl_not_as_a_corrupt_diffusers_file():
    # sd-scripts' SDXL LoRAs carry lora_te1_/lora_te2_ keys with .alpha tensors; the .alpha tail once read them as
    # PEFT alphas and called the file "incomplete or corrupt — re-export it".
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"
    sd = {f"{te1}.lora_down.weight": torch.randn(4, 768), f"{te1}.lora_up.weight": torch.randn(768, 4),
          f"{te1}.alpha": torch.tensor(4.0)}
    for keys in (sd, {k.replace("lora_te1_", "lora_te2_"): v for k, v in sd.items()}):
        with pytest.raises(ModelError, match="SDXL") as info:
            group_lora_state_dict(keys, "sdxl.safetensors")
        assert "corrupt" not in str(info.value)
    unet = "lora_unet_input_blocks_4_1_proj_in"  # kohya keys of another model pass to the layer check unchanged
    kohya = {f"{unet}.lora_down.weight": torch.randn(4, 8), f"{unet}.alpha": torch.tensor(4.0)}
    assert to_kohya_state_dict(kohya) == (kohya, {})


def test_a_finetunes_own_text_encoder_is_audited_with_it(world, merged, tmp_path, capsys):
    """A full fine-tune that trained its text encoder is audited with it, in each saved form (single file, pipeline
    folder, this toolkit's <name>-unet/ + <name>-text_encoder/); a bare UNet folder keeps the base's; the base
    text encoder is back after the block."""
    from library.sd.text import encode_prompts

    bundle = copy.deepcopy(world["bundle"])
    with torch.no_grad():
        for p in bundle.text_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bundle.unet.load_state_dict(merged["unet"].state_dict())
    single = tmp_path / "ft.safetensors"
    save_single_file(bundle, single)
    for unet_folder, te_folder in ((tmp_path / "ft-unet", tmp_path / "ft-text_encoder"),
                                   (tmp_path / "pipe" / "unet", tmp_path / "pipe" / "text_encoder")):
        bundle.unet.save_pretrained(str(unet_folder), safe_serialization=True)
        bundle.text_encoder.save_pretrained(str(te_folder), safe_serialization=True)
    base = world["bundle"]

    def encoded(model):
        with torch.no_grad():
            return encode_prompts(base.tokenizer, model.text_encoder, ["digit 3"])

    base_states, tuned_states = encoded(base), encoded(bundle)
    assert not torch.allclose(base_states, tuned_states)
    for entry in (single, tmp_path / "ft-unet", tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        weights = resolve_unet_weights(entry)
        assert weights.text_encoder, entry
        check_unet_weights(weights, base.unet, base.text_encoder)
        with applied_lora(base, None, 1.0, torch.device("cpu"), torch.float32, unet=weights):
            torch.testing.assert_close(encoded(base), tuned_states, rtol=1e-5, atol=1e-5, msg=str(entry))
        torch.testing.assert_close(encoded(base), base_states, rtol=0, atol=0)
    bare = resolve_unet_weights(merged["folder"])
    assert not bare.text_encoder
    with applied_lora(base, None, 1.0, torch.device("cpu"), torch.float32, unet=bare):
        torch.testing.assert_close(encoded(base), base_states, rtol=0, atol=0)
    # the same UNet without its text encoder is another model in the caches
    alone = shutil.copytree(tmp_path / "ft-unet", tmp_path / "ft_alone")
    assert resolve_unet_weights(alone).sha256 != resolve_unet_weights(tmp_path / "ft-unet").sha256
    # ... and one of this toolkit's, which records that it trained its text encoder, is refused without it
    ours = {"smp_lora.train_mode": "full", "smp_lora.trained_text_encoder": "true"}
    for folder in (tmp_path / "ft-unet", alone):
        file = folder / "diffusion_pytorch_model.safetensors"
        save_file(load_file(str(file)), str(file), metadata=ours)
    assert resolve_unet_weights(tmp_path / "ft-unet").text_encoder  # beside its text encoder: audited with it
    with pytest.raises(ModelError, match=r"ft_alone come from a fine-tune that trained its text encoder too, which is "
                                         r"not beside them"):
        resolve_unet_weights(alone)

    wide = tmp_path / "wide" / "pipe"  # a text encoder of another shape: one line naming the entry
    bundle.unet.save_pretrained(str(wide / "unet"), safe_serialization=True)
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**bundle.text_encoder.config.to_dict(), "hidden_size": 48, "intermediate_size": 96})
    CLIPTextModel(config).save_pretrained(str(wide / "text_encoder"), safe_serialization=True)
    with pytest.raises(ModelError, match=r"pipe.*do not fit the base model's text encoder"):
        check_unet_weights(resolve_unet_weights(wide), base.unet, base.text_encoder)


def test_a_peft_adapter_takes_its_scale_from_its_adapter_config(world, peft_file, tmp_path):
    """PEFT's save_pretrained keeps lora_alpha in adapter_config.json beside adapter_model.safetensors; read without
    it, the adapter was audited at scale 1 instead of lora_alpha / r."""
    bundle = world["bundle"]
    folder = tmp_path / "adapter"
    folder.mkdir()
    weights = folder / "adapter_model.safetensors"
    save_file(load_file(str(peft_file)), str(weights))
    rank = next(t.shape[0] for k, t in load_file(str(peft_file)).items() if k.endswith("down.weight"))

    def scales():
        network, _ = create_network_from_weights(1.0, weights, None, bundle.text_encoder, bundle.unet)
        return {lora.scale for lora in network.loras}

    assert scales() == {1.0}  # no config beside it: diffusers' convention
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 3 * rank}))
    assert scales() == {3.0}
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA", "r": rank, "alpha": rank}))
    with pytest.raises(ModelError, match="adapter_config.json.*LOHA adapter, not a LoRA"):
        scales()
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="adapter_config.json.*not valid JSON"):
        scales()


def test_a_finetune_that_did_not_train_its_text_encoder_keeps_the_base_one(world, tmp_path, capsys):
    """This toolkit's single file always holds a text encoder: the base's, cast to --save_precision, when it was not
    trained. Read as "its own", the single file and the -unet/ folder of one fine-tune were two models."""
    bundle = world["bundle"]
    cases = {"false": False, "true": True}
    for recorded, own in cases.items():
        path = tmp_path / f"ft_{recorded}.safetensors"
        save_single_file(bundle, path, metadata={"smp_lora.train_mode": "full",
                                                 "smp_lora.trained_text_encoder": recorded})
        assert bool(resolve_unet_weights(path).text_encoder) is own, recorded
    older = tmp_path / "older.safetensors"  # written before the record: its -text_encoder/ folder says it trained one
    save_single_file(bundle, older, metadata={"smp_lora.train_mode": "full"})
    assert not resolve_unet_weights(older).text_encoder
    bundle.text_encoder.save_pretrained(str(tmp_path / "older-text_encoder"), safe_serialization=True)
    assert resolve_unet_weights(older).text_encoder
    foreign = tmp_path / "foreign.safetensors"  # no record of ours: audited as published
    save_single_file(bundle, foreign)
    assert resolve_unet_weights(foreign).text_encoder

    pipe = tmp_path / "pipe"  # a sharded text_encoder/ is not read: the base's, with a warning (it was an error)
    bundle.unet.save_pretrained(str(pipe / "unet"), safe_serialization=True)
    bundle.text_encoder.save_pretrained(str(pipe / "text_encoder"), safe_serialization=True, max_shard_size="100KB")
    capsys.readouterr()
    assert not resolve_unet_weights(pipe).text_encoder
    assert "holds no model.safetensors (a sharded text encoder is not read)" in capsys.readouterr().err
