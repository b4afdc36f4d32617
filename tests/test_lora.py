"""Tests for networks/lora.py: kohya-compatible LoRA on the tiny SD v1.x stack (CPU, offline)."""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ConfigError, ModelError
from networks.lora import (
    FORBIDDEN_METADATA_KEYS,
    LoRANetwork,
    create_network,
    create_network_from_weights,
    lora_file_sha256,
    read_lora_metadata,
)
from networks.lora_args import (
    parse_conv_args,
    parse_network_kwargs,
    single_text_encoder,
)
from networks.lora_io import check_lora_file, read_lora_source
from networks.lora_modules import LoRAModule
from networks.lora_targets import find_target_layers, layers_by_name

RANK, ALPHA = 4, 2.0  # alpha != rank, so a loader that ignores alpha is caught


@pytest.fixture(scope="module")
def stack():
    from library.demo.tiny import build_tiny_stack

    return build_tiny_stack(seed=0)


@pytest.fixture()
def models(stack):
    """Fresh copies of the frozen base text encoder and UNet (the LoRA patches them in place)."""
    return copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)


@pytest.fixture(scope="module")
def inputs(stack):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(stack.tokenizer), (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    return ids, latents, timesteps


def run(text_encoder, unet, inputs):
    """Text-encoder hidden states and the UNet's prediction conditioned on them."""
    ids, latents, timesteps = inputs
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(latents, timesteps, hidden).sample


def randomise(network: LoRANetwork, seed: int = 0, std: float = 0.2) -> None:
    """Give every lora_up a non-zero value (at init they are zero and the LoRA does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            w = lora.lora_up.weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


def trained_network(models, **kwargs) -> LoRANetwork:
    te, unet = models
    network = create_network(1.0, RANK, ALPHA, None, te, unet, **kwargs)
    randomise(network)
    return network


# ------------------------------------------------------------------------------------------ structure


def test_targets_names_and_init(models):
    te, unet = models
    network = create_network(1.0, RANK, ALPHA, None, te, unet)
    # 4 Transformer2D blocks x 12 layers (attn1/attn2 q,k,v,out, ff x2, proj_in/out); 2 CLIP layers x 6.
    assert len(network.unet_loras) == 48 and len(network.text_encoder_loras) == 12
    names = {lora.lora_name for lora in network.loras}
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_up_blocks_1_attentions_1_proj_out",
        "lora_unet_mid_block_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert expected in names
    sd = network.state_dict()
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 64, 1, 1)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"].shape == (64, RANK, 1, 1)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape == (RANK, 32)
    assert sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"].shape == (64, RANK)
    for lora in network.loras:
        assert torch.count_nonzero(lora.lora_up.weight) == 0  # kohya init: up zero ...
        assert lora.lora_down.weight.abs().max() > 0  # ... down kaiming-uniform
        assert lora.alpha.dim() == 0 and float(lora.alpha) == ALPHA and lora.scale == ALPHA / RANK
        assert lora.lora_down.bias is None and lora.lora_up.bias is None


def test_zero_change_at_init_and_params_live_in_the_unet(models, inputs):
    te, unet = models
    base = run(te, unet, inputs)
    network = create_network(1.0, RANK, ALPHA, None, te, unet)
    network.apply_to(te, unet)
    patched = run(te, unet, inputs)
    assert torch.equal(base[0], patched[0]) and torch.equal(base[1], patched[1])
    # The LoRA runs inside the models, so DDP on the UNet / text encoder sees (and syncs) its parameters.
    model_params = {id(p) for p in unet.parameters()} | {id(p) for p in te.parameters()}
    assert {id(p) for p in network.get_trainable_params()} <= model_params
    assert all(p.requires_grad for p in network.get_trainable_params())


def test_layer_output_is_base_plus_analytic_delta(models):
    te, unet = models
    network = trained_network(models)
    network.set_multiplier(0.7)
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    conv = unet.mid_block.attentions[0].proj_in
    x = torch.randn(3, 5, layer.in_features)
    xc = torch.randn(2, conv.in_channels, 4, 4)
    base_lin, base_conv = layer(x), conv(xc)
    network.apply_to(te, unet)
    lora = getattr(network, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    expected = base_lin + 0.7 * (ALPHA / RANK) * (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    lc = getattr(network, "lora_unet_mid_block_attentions_0_proj_in")
    delta = (lc.lora_up.weight[:, :, 0, 0] @ lc.lora_down.weight[:, :, 0, 0]) * (0.7 * ALPHA / RANK)
    expected_conv = base_conv + torch.einsum("oi,bihw->bohw", delta, xc)
    torch.testing.assert_close(conv(xc), expected_conv, atol=1e-6, rtol=1e-5)


def test_patched_model_equals_hand_merged_weights(models, inputs):
    te, unet = models
    reference_te, reference_unet = copy.deepcopy(te), copy.deepcopy(unet)
    network = trained_network(models)
    network.apply_to(te, unet)
    patched = run(te, unet, inputs)
    base = run(reference_te, reference_unet, inputs)
    assert (patched[1] - base[1]).abs().max() > 1e-3  # the LoRA does something
    # Independent of merge_to: add scale * up @ down to each layer's weight by hand.
    modules = dict(reference_unet.named_modules()) | dict(reference_te.named_modules())
    with torch.no_grad():
        for lora in network.loras:
            w = modules[lora.module_path].weight
            delta = lora.lora_up.weight.flatten(1) @ lora.lora_down.weight.flatten(1) * (ALPHA / RANK)
            w += delta.reshape(w.shape)
    merged = run(reference_te, reference_unet, inputs)
    torch.testing.assert_close(patched[0], merged[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(patched[1], merged[1], atol=1e-5, rtol=1e-4)


def test_multiplier_restore_and_gradients(models, inputs):
    te, unet = models
    base = run(te, unet, inputs)
    network = trained_network(models)
    network.apply_to(te, unet)
    layers = layers_by_name(te, unet)
    assert all(lora.is_applied_to(layers[lora.lora_name]) for lora in network.loras)
    network.set_multiplier(0.0)
    assert torch.equal(run(te, unet, inputs)[1], base[1])
    network.set_multiplier(1.0)
    ids, latents, timesteps = inputs
    unet(latents, timesteps, te(ids)[0]).sample.square().mean().backward()
    grads = [p.grad for p in network.get_trainable_params()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(RuntimeError, match="already"):
        network.apply_to(te, unet)  # stacking a second time on the same layers is refused
    clone_te, clone_unet = copy.deepcopy(te), copy.deepcopy(unet)  # e.g. an EMA copy keeps its LoRA
    assert torch.equal(run(clone_te, clone_unet, inputs)[1], run(te, unet, inputs)[1])
    network.restore()
    assert not any(lora.is_applied_to(layers[lora.lora_name]) for lora in network.loras)
    assert not any(".lora." in k for k in unet.state_dict())
    assert "forward" not in unet.mid_block.attentions[0].proj_in.__dict__
    assert torch.equal(run(te, unet, inputs)[1], base[1])


def test_disabled_is_the_base_model_and_restores_the_multiplier(models, inputs):
    te, unet = models
    base = run(te, unet, inputs)
    network = trained_network(models)
    network.apply_to(te, unet)
    network.set_multiplier(0.5)
    adapted = run(te, unet, inputs)
    with network.disabled():
        assert network.multiplier == 0.0 and all(lora.multiplier == 0.0 for lora in network.loras)
        assert torch.equal(run(te, unet, inputs)[1], base[1])
    assert network.multiplier == 0.5 and all(lora.multiplier == 0.5 for lora in network.loras)
    assert torch.equal(run(te, unet, inputs)[1], adapted[1])
    with pytest.raises(KeyError), network.disabled():
        raise KeyError("the block fails")
    assert network.multiplier == 0.5 and all(lora.multiplier == 0.5 for lora in network.loras)


def test_network_args_and_optimizer_groups(models):
    te, unet = models
    unet_only = create_network(1.0, RANK, ALPHA, None, te, unet, train_unet_only="True", dropout="0.1")
    assert not unet_only.text_encoder_loras and unet_only.unet_loras[0].dropout == 0.1
    with pytest.raises(ConfigError, match="unknown network argument.*conv_lora_dim"):
        create_network(1.0, RANK, ALPHA, None, te, unet, conv_lora_dim="4")
    for bad in ({"conv_dim": "0"}, {"conv_dim": "x"}, {"conv_alpha": "2"}, {"conv_dim": "2", "conv_alpha": "-1"}):
        with pytest.raises(ConfigError, match="conv_"):
            create_network(1.0, RANK, ALPHA, None, te, unet, **bad)
    network = create_network(1.0, RANK, ALPHA, None, te, unet)
    n_te = sum(p.numel() for lora in network.text_encoder_loras for p in lora.parameters())
    groups = network.prepare_optimizer_params(None, 1e-4, 5e-5)
    assert [g["lr"] for g in groups] == [5e-5, 1e-4]
    assert sum(p.numel() for p in groups[0]["params"]) == n_te
    groups = network.prepare_optimizer_params(0, None, 1e-4)  # lr 0 leaves the text encoder out
    assert len(groups) == 1 and groups[0]["name"] == "unet" and groups[0]["lr"] == 1e-4
    torch.optim.AdamW(network.prepare_optimizer_params(1e-5, 1e-4, None))
    # As in sd-scripts, applying without the text encoder drops its modules (not trained, not saved).
    network.apply_to(te, unet, apply_text_encoder=False)
    assert not network.text_encoder_loras and not any(k.startswith("lora_te_") for k in network.state_dict())
    assert not any(".lora." in k for k in te.state_dict())


CONV = {"conv_dim": "3", "conv_alpha": "1.5"}  # sd-scripts' LoCon option, as --network_args delivers it


def test_conv_dim_adapts_resnets_and_samplers_like_sd_scripts(models, tmp_path):
    te, unet = models
    plain = create_network(1.0, RANK, ALPHA, None, te, unet)
    network = create_network(1.0, RANK, ALPHA, None, te, unet, **CONV)
    by_name = {lora.lora_name: lora for lora in network.unet_loras}
    extra = by_name.keys() - {lora.lora_name for lora in plain.unet_loras}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra and "lora_unet_up_blocks_0_upsamplers_0_conv" in extra
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in extra and "lora_unet_mid_block_resnets_1_conv2" in extra
    assert not any("conv_in" in n or "conv_out" in n or "time_embedding" in n for n in by_name)  # as sd-scripts
    for name in extra:
        lora = by_name[name]
        if lora.kernel_size not in (None, (1, 1)):  # 3x3: conv_dim / conv_alpha, the layer's kernel in lora_down
            assert (lora.rank, float(lora.alpha)) == (3, 1.5)
            assert lora.lora_down.weight.shape[2:] == lora.kernel_size and lora.lora_up.weight.shape[2:] == (1, 1)
        else:  # Linear / 1x1 inside the ResNet blocks (time_emb_proj, conv_shortcut): network_dim
            assert (lora.rank, float(lora.alpha)) == (RANK, ALPHA)
    # A strided conv (the downsampler) keeps the layer's output shape.
    down = by_name["lora_unet_down_blocks_0_downsamplers_0_conv"]
    assert down.lora_down.stride == (2, 2)
    path = tmp_path / "locon.safetensors"
    randomise(network)
    network.save_weights(path)
    meta = read_lora_metadata(path)
    assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "1.5"}
    rebuilt, _ = create_network_from_weights(1.0, path, None, copy.deepcopy(te), copy.deepcopy(unet))
    assert {m.lora_name: m.rank for m in rebuilt.loras} == {m.lora_name: m.rank for m in network.loras}
    with pytest.raises(ModelError, match="conv_dim / LoCon"):  # a plain network cannot take a LoCon file
        create_network(1.0, RANK, ALPHA, None, te, unet).load_weights(path)


# ------------------------------------------------------------------------------------------ files


def test_save_layout_metadata_and_round_trip(models, stack, inputs, tmp_path):
    te, unet = models
    network = trained_network(models)
    network.apply_to(te, unet)
    expected = run(te, unet, inputs)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float32, {"smp_method": "smp", "ss_seed": "1337"})

    sd = load_file(str(path))
    assert len(sd) == 60 * 3
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in sd)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert len(alphas) == 60 and all(a.dim() == 0 and float(a) == ALPHA for a in alphas)
    assert all(v.dtype == torch.float32 for v in sd.values())

    meta = read_lora_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.sai_model_spec"].startswith("1.0.")
    assert meta["smp_method"] == "smp" and meta["ss_seed"] == "1337"
    assert meta["sshs_model_hash"] == lora_file_sha256(path)
    assert not any(k in meta for k in FORBIDDEN_METADATA_KEYS)

    te2, unet2 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    loaded, _ = create_network_from_weights(1.0, path, None, te2, unet2)
    assert len(loaded.loras) == 60 and all(lora.scale == ALPHA / RANK for lora in loaded.loras)
    loaded.apply_to(te2, unet2)
    got = run(te2, unet2, inputs)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    # Some exporters drop the "text_model_" root of text-encoder names; such files load the same.
    short = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in sd.items()}
    te4, unet4 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    create_network_from_weights(1.0, short, None, te4, unet4)[0].apply_to(te4, unet4)
    assert torch.equal(run(te4, unet4, inputs)[0], expected[0])

    # load_weights into a fresh network of the same shape reproduces it too.
    te3, unet3 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    fresh = create_network(1.0, RANK, 1.0, None, te3, unet3)
    info = fresh.load_weights(path)
    assert info.loaded_modules == 60 and not info.missing_keys and not info.unexpected_keys
    assert all(lora.scale == ALPHA / RANK for lora in fresh.loras)
    fresh.apply_to(te3, unet3)
    assert torch.equal(run(te3, unet3, inputs)[1], expected[1])


def test_fp16_save(models, tmp_path):
    network = trained_network(models)
    path = tmp_path / "half.safetensors"
    network.save_weights(path, torch.float16, None)
    sd = load_file(str(path))
    assert all(v.dtype == torch.float16 and v.is_contiguous() for v in sd.values())
    reference = network.state_dict()
    for key, value in sd.items():
        torch.testing.assert_close(value.float(), reference[key], atol=1e-3, rtol=1e-3)
    assert network.load_weights(path).loaded_modules == 60


@pytest.mark.parametrize(
    "metadata",
    [
        {"ss_dataset_dirs": "{}"},
        {"ss_tag_frequency": "{}"},
        {"ss_datasets": "[]"},
        {"ss_reg_dataset_dirs": "{}"},
        {"ss_bucket_info": "{}"},
        {"ss_num_train_images": "400"},
        {"my_captions": "a photo of x"},
        {"smp_train_data_dir": "members"},
        {"smp_note": "/home/alice/private/faces"},
        {"ss_seed": 1337},
        {"My_Captions": "a photo of x"},  # fragments are matched whatever the key's case
        {"smp_member_path": "members"},  # any *_path key
    ],
)
def test_privacy_leaking_metadata_is_refused(models, tmp_path, metadata):
    network = create_network(1.0, RANK, ALPHA, None, *models)
    path = tmp_path / "leak.safetensors"
    with pytest.raises(ValueError):
        network.save_weights(path, None, metadata)
    assert not path.exists()


# ------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("network_args", [{}, CONV], ids=["lora", "locon"])
def test_diffusers_load_lora_weights_matches(models, stack, inputs, tmp_path, network_args):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=stack.vae,
        text_encoder=copy.deepcopy(stack.text_encoder),
        tokenizer=stack.tokenizer,
        unet=copy.deepcopy(stack.unet),
        scheduler=stack.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    te, unet = models
    network = trained_network(models, **network_args)
    path = tmp_path / "interop.safetensors"
    network.save_weights(path, torch.float32)
    network.apply_to(te, unet)
    ours = run(te, unet, inputs)
    base = run(pipe.text_encoder, pipe.unet, inputs)

    pipe.load_lora_weights(str(path))
    theirs = run(pipe.text_encoder, pipe.unet, inputs)
    assert (ours[1] - base[1]).abs().max() > 1e-3 and (ours[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(theirs[0], ours[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs[1], ours[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("network_args", [{}, CONV], ids=["lora", "locon"])
def test_merge_to_equals_patched_forward(models, stack, inputs, network_args):
    te, unet = models
    network = trained_network(models, **network_args)
    network.set_multiplier(0.5)
    network.apply_to(te, unet)
    patched = run(te, unet, inputs)
    sd = network.state_dict()
    te2, unet2 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    other = create_network(1.0, RANK, 1.0, None, te2, unet2, **network_args)
    other.merge_to(te2, unet2, weights_sd=sd, multiplier=0.5)
    assert not any(".lora." in k for k in unet2.state_dict())
    merged = run(te2, unet2, inputs)
    torch.testing.assert_close(merged[0], patched[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged[1], patched[1], atol=1e-5, rtol=1e-4)
    # Merging the applied network itself removes the patch first, so the LoRA is not counted twice.
    network.merge_to(te, unet, multiplier=0.5)
    torch.testing.assert_close(run(te, unet, inputs)[1], patched[1], atol=1e-5, rtol=1e-4)


def test_sd_scripts_inference_contract(models, stack, inputs, tmp_path):
    """sd-scripts' gen_img.py: ``network, weights_sd = create_network_from_weights(m, file, vae, te, unet,
    for_inference=True)`` then ``network.merge_to(te, unet, weights_sd, dtype, device)``, positionally, at the
    network's own multiplier."""
    te, unet = models
    network = trained_network(models)
    path = tmp_path / "lora.safetensors"
    network.save_weights(path, torch.float32)
    network.set_multiplier(0.5)
    network.apply_to(te, unet)
    patched = run(te, unet, inputs)
    te2, unet2 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    loaded, weights_sd = create_network_from_weights(0.5, str(path), None, te2, unet2, for_inference=True)
    assert set(weights_sd) == set(load_file(path))
    loaded.merge_to(te2, unet2, weights_sd, torch.float32, torch.device("cpu"))
    merged = run(te2, unet2, inputs)
    torch.testing.assert_close(merged[0], patched[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged[1], patched[1], atol=1e-5, rtol=1e-4)


def test_merging_into_another_copy_leaves_the_applied_model_adapted(models, stack, inputs):
    """merge_to a second copy of the base (to export a merged model) must not unpatch the model the LoRA runs in."""
    te, unet = models
    network = trained_network(models)
    network.apply_to(te, unet)
    patched = run(te, unet, inputs)
    network.merge_to(copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet))
    assert torch.equal(run(te, unet, inputs)[1], patched[1])


# ------------------------------------------------------------------------------------------ one LoRAModule


def lora_on(layer: torch.nn.Module, rank: int = 4, alpha: float | None = None, **kwargs) -> LoRAModule:
    return LoRAModule("lora_unet_layer", "unet", "layer", layer, rank, alpha, **kwargs)


def test_a_module_built_without_alpha_is_full_strength_and_rank_zero_is_a_config_error():
    """alpha None is alpha = rank (scale 1, as kohya reads a file without alpha); rank 0 is refused, not a crash."""
    lora = lora_on(torch.nn.Linear(8, 8), rank=4)
    assert (float(lora.alpha), lora.scale) == (4.0, 1.0)
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        lora_on(torch.nn.Linear(8, 8), rank=0)


def test_down_is_initialised_like_nn_linear():
    """kohya / PEFT init lora_down as nn.Linear does (kaiming a=sqrt(5): bound 1/sqrt(fan_in)); seeded runs match."""
    torch.manual_seed(0)
    down = lora_on(torch.nn.Linear(64, 64), rank=64).lora_down.weight
    bound = 1 / 64 ** 0.5
    assert down.abs().max() <= bound and down.abs().max() > 0.95 * bound


def test_a_half_precision_layer_runs_its_float32_lora_and_keeps_its_dtype():
    """A bf16/fp16 base with fp32 LoRA weights (mixed precision): the input is cast for the LoRA, the output is not."""
    layer = torch.nn.Linear(8, 8).to(torch.bfloat16)
    lora = lora_on(layer, rank=2)
    torch.nn.init.normal_(lora.lora_up.weight)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    base = layer(x)
    lora.apply_to(layer)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = base.float() + lora.lora_up(lora.lora_down(x.float()))
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_dropout_drops_the_given_fraction_of_rank_features():
    """--network_dropout p drops a fraction p of the rank features in training (not 1 - p)."""
    layer = torch.nn.Linear(100, 100, bias=False)
    torch.nn.init.zeros_(layer.weight)  # the layer's output is the LoRA's alone
    lora = lora_on(layer, rank=100, alpha=100.0, dropout=0.1)
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.eye(100))
        lora.lora_up.weight.copy_(torch.eye(100))
    lora.apply_to(layer)
    torch.manual_seed(0)
    with torch.no_grad():
        dropped = float((layer(torch.ones(50, 100)) == 0).float().mean())
    assert 0.07 < dropped < 0.13


def test_a_module_applied_once_or_to_a_layer_with_a_patched_forward_is_refused():
    """A LoRA sits on one layer at a time, and never over another tool's patched forward (restore would drop it)."""
    first, second, hooked = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    lora = lora_on(first, rank=2)
    lora.apply_to(first)
    assert lora.is_applied_to(first) and not lora.is_applied_to(second)
    with pytest.raises(RuntimeError, match="already applied"):
        lora.apply_to(second)
    hooked.forward = lambda x: x  # e.g. an offload hook's wrapper
    with pytest.raises(RuntimeError, match="patched forward"):
        lora_on(hooked, rank=2).apply_to(hooked)


# ------------------------------------------------------------------------------------------ bad files


def _saved(network: LoRANetwork, tmp_path) -> dict[str, torch.Tensor]:
    path = tmp_path / "good.safetensors"
    network.save_weights(path)
    return load_file(str(path))


def test_lora_for_another_model_is_refused(models, tmp_path):
    network = trained_network(models)
    sd = _saved(network, tmp_path)

    wrong_shape = dict(sd)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    wrong_shape[key] = torch.zeros(RANK, 768)  # SD1.5's cross-attention width, not the tiny model's
    bad = tmp_path / "sd15_lora.safetensors"
    save_file(wrong_shape, str(bad))
    with pytest.raises(ModelError, match=r"sd15_lora\.safetensors.*attn2_to_k.*another base model"):
        create_network_from_weights(1.0, bad, None, *models)
    with pytest.raises(ModelError, match=r"sd15_lora\.safetensors.*attn2_to_k"):
        network.load_weights(bad)

    sdxl = dict(sd)
    sdxl["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(RANK, 640)
    sdxl["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"] = torch.zeros(640, RANK)
    bad = tmp_path / "sdxl_lora.safetensors"
    save_file(sdxl, str(bad))
    for load in (lambda: create_network_from_weights(1.0, bad, None, *models), lambda: network.load_weights(bad)):
        with pytest.raises(ModelError, match=r"sdxl_lora\.safetensors.*input_blocks_4_1_proj_in.*another base"):
            load()

    lycoris = dict(sd)  # LyCORIS' full-network preset also adapts conv_in / time_embedding: not another base model
    lycoris["lora_unet_conv_in.lora_down.weight"] = torch.zeros(RANK, 4, 3, 3)
    lycoris["lora_unet_conv_in.lora_up.weight"] = torch.zeros(32, RANK, 1, 1)
    bad = tmp_path / "lycoris_full.safetensors"
    save_file(lycoris, str(bad))
    for load in (lambda: create_network_from_weights(1.0, bad, None, *models), lambda: network.load_weights(bad)):
        with pytest.raises(ModelError, match=r"lycoris_full\.safetensors.*lora_unet_conv_in.*never adapt") as info:
            load()
        assert "another base model" not in str(info.value)

    # LyCORIS' other algorithms are named as such, not as a file "made for another model or tool"
    name = next(k for k in sd if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    for kind, keys in (("full/diff", [".diff", ".diff_b"]), ("IA3", [".weight", ".on_input"]),
                       ("GLoRA", [".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"]),
                       ("norm", [".w_norm", ".b_norm"])):
        bad = tmp_path / f"lycoris_{kind.replace('/', '_')}.safetensors"
        save_file({f"{name}{suffix}": torch.zeros(2) for suffix in keys}, str(bad))
        with pytest.raises(ModelError, match="LyCORIS/DoRA-type network"):
            create_network_from_weights(1.0, bad, None, *models)


def test_a_text_encoder_lora_into_a_unet_only_network_says_how_to_continue_it():
    from networks.lora_format import unknown_module_error

    error = unknown_module_error("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "te.safetensors",
                                 has_te=False)
    assert "adapts the text encoder" in str(error) and "--no-network_train_unet_only" in str(error)
    assert "another base model" not in str(error)


def test_unreadable_or_foreign_files_are_refused(models, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelError, match="corrupt.safetensors.*corrupt"):
        create_network_from_weights(1.0, corrupt, None, *models)
    with pytest.raises(ModelError, match="corrupt.safetensors"):
        read_lora_metadata(corrupt)

    with pytest.raises(ModelError, match="does not exist"):
        create_network_from_weights(1.0, tmp_path / "missing.safetensors", None, *models)

    random_file = tmp_path / "random.safetensors"
    save_file({"model.weight": torch.zeros(3)}, str(random_file))
    with pytest.raises(ModelError, match=r"random\.safetensors.*model\.weight"):
        create_network_from_weights(1.0, random_file, None, *models)

    peft_file = tmp_path / "peft.safetensors"
    save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 64, 1, 1)}, str(peft_file))
    with pytest.raises(ModelError, match="diffusers/PEFT"):
        create_network_from_weights(1.0, peft_file, None, *models)

    pickle_file = tmp_path / "lora.pt"
    pickle_file.write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="safetensors"):
        create_network_from_weights(1.0, pickle_file, None, *models)

    # this project's own files that are not LoRAs: the proxy attacker, a --save_state folder
    from library.privacy import ProxyAttacker

    attacker_file = tmp_path / "smp_lora-attacker.safetensors"
    save_file(ProxyAttacker(2).state_dict(), str(attacker_file))
    with pytest.raises(ModelError, match=r"proxy attacker .*pass the run's <name>\.safetensors"):
        create_network_from_weights(1.0, attacker_file, None, *models)
    (tmp_path / "smp_lora-state").mkdir()
    with pytest.raises(ModelError, match="is a folder"):
        create_network_from_weights(1.0, tmp_path / "smp_lora-state", None, *models)
    # a PEFT save_pretrained folder: the file in it is named; its .bin is to become that file, beside its config
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is a folder; pass the LoRA file in it: .*adapter/adapter_model\.safetensors"):
        create_network_from_weights(1.0, adapter, None, *models)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match=r"'.*adapter/adapter_model\.safetensors'\) \(that name, beside its "
                                         r"adapter_config\.json, which holds its scale\)"):
        create_network_from_weights(1.0, adapter / "adapter_model.bin", None, *models)

    # a wrong shape names the lora_down tensor, not the .alpha key that sorts first in the file
    good = tmp_path / "good.safetensors"
    trained_network(models).save_weights(good, torch.float32, {})
    sd = load_file(str(good))
    down = next(k for k in sorted(sd) if k.endswith(".lora_down.weight"))
    sd[down] = torch.zeros(sd[down].shape[0], sd[down].shape[1] + 1)
    with pytest.raises(ModelError, match=rf"'{down.replace('.', '[.]')}' has shapes"):
        create_network_from_weights(1.0, sd, None, *copy.deepcopy(models))


@pytest.mark.parametrize(("name", "content", "says"), [
    ("short.safetensors", b"\x01\x02\x03\x04", r"4 bytes, shorter than the 8-byte header length"),
    ("past_end.safetensors", (12).to_bytes(8, "little") + b"{}      ", r"header claims 12 bytes but the file has 16"),
    ("a_list.safetensors", (2).to_bytes(8, "little") + b"[]", r"header is not a JSON object"),
    ("lora.txt", b"", r"lora\.txt is not a \.safetensors file"),
    ("LORA.CKPT", b"\x80\x04", r"is a pickle \(\.ckpt\) file.*save_file\(.*'lora\.safetensors'\)$"),
])
def test_each_kind_of_unreadable_file_is_refused_with_its_own_reason(tmp_path, name, content, says):
    """The one-line error says what is wrong with the file (too short, truncated header, pickle, wrong suffix)."""
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(ModelError, match=says):
        check_lora_file(bad)


def test_a_diffusers_folder_names_its_weights_file(tmp_path):
    """A diffusers save_lora_weights folder: the error names pytorch_lora_weights.safetensors in it to pass instead."""
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"pass the LoRA file in it: .*pytorch_lora_weights\.safetensors"):
        check_lora_file(tmp_path)


def test_upper_case_suffixes_empty_files_and_stray_attacker_keys_are_still_loras(tmp_path):
    """.SAFETENSORS is read; a file with no tensors, or one net.* key among LoRA keys, is not the proxy attacker."""
    upper, empty, mixed = (tmp_path / n for n in ("LORA.SAFETENSORS", "empty.safetensors", "mixed.safetensors"))
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(upper))
    save_file({}, str(empty))
    save_file({"net.0.weight": torch.zeros(2), "lora_unet_x.alpha": torch.tensor(1.0)}, str(mixed))
    for file in (upper, empty, mixed):
        header_len, header = check_lora_file(file)
        assert header_len == len(file.read_bytes()) - 8 - sum(t.numel() * 4 for t in load_file(str(file)).values())


def test_a_peft_adapter_config_gives_both_parts_its_scale_unless_the_header_has_its_own(tmp_path):
    """adapter_config.json beside adapter_model.safetensors holds PEFT's scale (rsLoRA too); it is read for that name
    only, and a header that has diffusers' own lora_adapter_metadata keeps it."""
    weights, other = tmp_path / "adapter_model.safetensors", tmp_path / "other.safetensors"
    for file in (weights, other):
        save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(file))
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"r": 2, "lora_alpha": 8, "use_rslora": True}))  # no peft_type: a LoRA
    adapter = json.loads(read_lora_metadata(weights)["lora_adapter_metadata"])
    assert adapter == {f"{part}.{field}": value for part in ("unet", "text_encoder")
                       for field, value in (("r", 2), ("lora_alpha", 8), ("use_rslora", True))}
    assert read_lora_source(weights).metadata == read_lora_metadata(weights)
    assert "lora_adapter_metadata" not in read_lora_metadata(other)
    own = json.dumps({"unet.lora_alpha": 1})
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(weights), metadata={"lora_adapter_metadata": own})
    assert read_lora_metadata(weights)["lora_adapter_metadata"] == own
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(weights))
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ModelError, match="adapter_config.json.*has no lora_alpha"):
        read_lora_metadata(weights)


def test_a_file_with_alpha_zero_is_a_full_strength_lora(models, stack, tmp_path):
    # kohya and AUTOMATIC1111 read alpha 0 as alpha = rank (scale 1); scale 0 would make the file the base model
    # and an attack on it report a private LoRA that is not.
    path = tmp_path / "lora.safetensors"
    trained_network(models).save_weights(path, torch.float32, {})
    zero = {k: torch.zeros_like(v) if k.endswith(".alpha") else v for k, v in load_file(str(path)).items()}
    te, unet = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    assert all(lora.scale == 1.0 for lora in create_network_from_weights(1.0, zero, None, te, unet)[0].loras)
    fresh = create_network(1.0, RANK, ALPHA, None, *copy.deepcopy(models))
    fresh.load_weights(zero)
    assert all(lora.scale == 1.0 and float(lora.alpha) == RANK for lora in fresh.loras)
    fresh.load_state_dict(zero, strict=False)
    assert all(lora.scale == 1.0 for lora in fresh.loras)


def test_dropout_acts_in_training_only(models):
    """LoRA dropout (--network_dropout) is on the rank features while training; in eval mode (samples, the attack's
    and the evaluation's losses) the layer is the exact base + scale * up(down(x)), the same on every call."""
    te, unet = models
    network = trained_network(models, dropout="0.5")
    layer = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(3))
    base = layer(x)
    network.apply_to(te, unet)
    lora = getattr(network, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
    expected = base + (ALPHA / RANK) * (x @ lora.lora_down.weight.T @ lora.lora_up.weight.T)
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
        network.train()
        assert not torch.allclose(layer(x), expected, atol=1e-4)  # half the rank features dropped (and rescaled)


def test_load_state_dict_takes_the_files_alpha_into_the_forward(models, stack, inputs):
    """``network.load_state_dict`` (resume, or a caller's own loading) with another ``.alpha`` than the network was
    built with: the cached scale must follow the loaded alpha, or the LoRA runs at the old strength."""
    te, unet = models
    source = create_network(1.0, RANK, 1.0, None, *copy.deepcopy(models))  # alpha 1: scale 1/4
    randomise(source)
    network = create_network(1.0, RANK, ALPHA, None, te, unet)  # alpha 2: scale 1/2 before loading
    network.load_state_dict(source.state_dict())
    assert all(lora.scale == 1.0 / RANK for lora in network.loras)
    network.apply_to(te, unet)
    te2, unet2 = copy.deepcopy(stack.text_encoder), copy.deepcopy(stack.unet)
    source.apply_to(te2, unet2)
    torch.testing.assert_close(run(te, unet, inputs)[1], run(te2, unet2, inputs)[1])


def test_defaults_and_a_file_without_alpha(models, tmp_path):
    """sd-scripts' defaults when the caller gives none: rank 4, alpha 1 (scale 1/4). A file without ``.alpha`` keys
    is alpha = rank (scale 1) for every module and for the rebuilt network, whose re-saved metadata says so."""
    te, unet = models
    default = create_network(1.0, None, None, None, te, unet)
    assert all((lora.rank, float(lora.alpha), lora.scale) == (4, 1.0, 0.25) for lora in default.loras)
    randomise(default)
    no_alpha = {k: v for k, v in default.state_dict().items() if not k.endswith(".alpha")}
    rebuilt, _ = create_network_from_weights(1.0, no_alpha, None, *copy.deepcopy(models))
    assert all((float(lora.alpha), lora.scale) == (4.0, 1.0) for lora in rebuilt.loras)
    rebuilt.save_weights(tmp_path / "again.safetensors")
    assert read_lora_metadata(tmp_path / "again.safetensors")["ss_network_alpha"] == "4.0"


def test_metadata_records_per_layer_alphas_that_differ_at_one_rank():
    """Layers of one rank with differing alphas (a file built from weights) are ``variable_rank`` in
    ``ss_network_args``: ss_network_alpha alone would claim one scale for every layer."""
    from types import SimpleNamespace

    from networks.lora_format import default_metadata

    loras = [SimpleNamespace(rank=4, alpha=torch.tensor(a), kernel_size=None) for a in (2.0, 2.0, 1.0)]
    meta = default_metadata(loras, 4, 2.0, None)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_network_args"]) == {"variable_rank": True}
    assert "ss_network_args" not in default_metadata(loras[:2], 4, 2.0, None)


def test_a_file_whose_up_and_down_ranks_differ_is_one_error_line():
    """A layer's lora_up must take lora_down's rank: another one is the file's fault, named as such (not a
    reshape error from inside torch)."""
    from networks.lora_format import ModuleWeights, check_shapes

    keys = ("lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight")
    good = ModuleWeights(torch.zeros(4, 8), torch.zeros(6, 4), None, keys)
    assert [tuple(t.shape) for t in check_shapes("x", good, 8, 6, None, "f")] == [(4, 8), (6, 4)]
    with pytest.raises(ModelError, match="lora_unet_x.lora_down.weight' has shapes down \\(4, 8\\) / up \\(6, 2\\)"):
        check_shapes("x", ModuleWeights(torch.zeros(4, 8), torch.zeros(6, 2), None, keys), 8, 6, None, "f")


def test_write_lora_file_itself_refuses_metadata_that_names_the_data(tmp_path):
    """``write_lora_file`` (public, also called without ``save_weights``' check) keeps the privacy policy: no file
    with a dataset key is written."""
    from networks.lora_format import write_lora_file

    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}
    with pytest.raises(ValueError, match="ss_dataset_dirs"):
        write_lora_file(tmp_path / "a.safetensors", tensors, {"ss_dataset_dirs": "{}"})
    assert not (tmp_path / "a.safetensors").exists()
    written = tmp_path / "b.safetensors"
    write_lora_file(written, tensors, {"ss_seed": "1"})
    assert read_lora_metadata(written)["sshs_model_hash"] == lora_file_sha256(written)


def test_a_layer_without_its_up_or_down_weight_is_refused_naming_the_missing_one():
    """A truncated export that lost one of a layer's two matrices is one error saying which, not a KeyError."""
    from networks.lora_format import group_kohya_state_dict

    for present, missing in ((".lora_down.weight", "lora_up"), (".lora_up.weight", "lora_down")):
        sd = {"lora_unet_x" + present: torch.zeros(4, 4), "lora_unet_x.alpha": torch.tensor(2.0)}
        with pytest.raises(ModelError, match=f"'lora_unet_x{present}' has no matching {missing} weight"):
            group_kohya_state_dict(sd, "f")


def test_a_whole_sd_checkpoint_given_as_a_lora_is_named_as_such():
    """A --train_mode full output (or a base model) passed as --network_weights: the error says what it is and where
    it goes, not only that the file was made "for another model or tool"."""
    from networks.lora_format import group_kohya_state_dict

    for key in ("model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x.weight",
                "first_stage_model.encoder.conv_in.weight"):
        with pytest.raises(ModelError, match=r"whole SD checkpoint.*--unet_weights.*--pretrained_model_name_or_path") \
                as info:
            group_kohya_state_dict({key: torch.zeros(2)}, "full.safetensors")
        assert "another model or tool" not in str(info.value)  # what it is is known: no contradicting guess


def test_check_shapes_reads_flat_1x1_conv_weights_and_refuses_a_misfit_up_projection():
    """Exporters that write a 1x1 conv's LoRA as 2-D matrices load; an up projection with a spatial kernel or for
    another output width is the file's fault, one error line (not a reshape error from inside torch)."""
    from networks.lora_format import ModuleWeights, check_shapes

    keys = ("lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight")
    flat = ModuleWeights(torch.zeros(4, 8), torch.zeros(6, 4), None, keys)
    assert [tuple(t.shape) for t in check_shapes("x", flat, 8, 6, (1, 1), "f")] == [(4, 8, 1, 1), (6, 4, 1, 1)]
    for up in (torch.zeros(6, 4, 3, 3), torch.zeros(12, 4)):
        with pytest.raises(ModelError, match="has shapes down"):
            check_shapes("x", ModuleWeights(torch.zeros(4, 8), up, None, keys), 8, 6, None, "f")


def test_ranks_and_alphas_reads_a_missing_alpha_as_the_rank_and_refuses_an_unknown_layer():
    """The per-layer alphas a network is built from: a file without ``.alpha`` is alpha = rank (scale 1), as in
    every loader; a layer the model lacks is an error, not silently skipped."""
    from torch import nn

    from networks.lora_format import ModuleWeights, ranks_and_alphas

    layers = {"lora_unet_x": nn.Linear(8, 6)}
    weights = ModuleWeights(torch.zeros(4, 8), torch.zeros(6, 4), None, ("lora_unet_x.lora_down.weight",))
    assert ranks_and_alphas({"lora_unet_x": weights}, layers, "f", False) == ({"lora_unet_x": 4}, {"lora_unet_x": 4.0})
    with pytest.raises(ModelError, match="matches no layer"):
        ranks_and_alphas({"lora_unet_y": weights}, {}, "f", False)


@pytest.mark.parametrize(
    "key, says",
    [
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "SDXL / original-LDM names"),
        ("lora_unet_output_blocks_2_1_proj_in.lora_down.weight", "SDXL / original-LDM names"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight", "conv_dim / LoCon"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight", "conv_dim / LoCon"),
        ("lora_unet_time_embedding_linear_1.lora_down.weight", "never adapt"),
    ],
)
def test_a_key_for_no_layer_says_what_the_file_was_made_for(key, says):
    """The hint tells SDXL files, LoCon files and LyCORIS full-network files apart: each needs another fix."""
    from networks.lora_format import unknown_module_error

    assert says in str(unknown_module_error(key, "f.safetensors", has_te=True))


def test_metadata_names_the_most_common_plain_rank_and_records_only_3x3_convs_as_conv_args():
    """A1111 and sd-scripts read ss_network_dim / alpha as the file's rank and alpha, conv_dim / conv_alpha as its
    LoCon layers (1x1 convs are plain layers, as in sd-scripts) and ss_v2 to pick the SD version."""
    from types import SimpleNamespace

    from networks.lora_format import default_metadata

    def lora(rank: int, alpha: float, kernel: tuple[int, ...] | None) -> SimpleNamespace:
        return SimpleNamespace(rank=rank, alpha=torch.tensor(alpha), kernel_size=kernel)

    meta = default_metadata([lora(4, 2.0, None), lora(4, 2.0, None), lora(8, 2.0, None)], 16, 8.0, None)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["modelspec.title"]) == ("False", "sd_v1", "LoRA")
    plain = [lora(4, 2.0, None), lora(4, 2.0, (1, 1))]
    assert "ss_network_args" not in default_metadata(plain, 4, 2.0, None)
    assert default_metadata([lora(4, 2.0, None), *2 * [lora(8, 4.0, (1, 1))]], 4, 2.0, None)["ss_network_dim"] == "8"
    convs = [lora(3, 1.5, (3, 3)), lora(3, 1.5, (3, 3)), lora(3, 1.0, (3, 3))]  # one rank, alphas differ
    args = json.loads(default_metadata(plain + convs, 4, 2.0, None)["ss_network_args"])
    assert args == {"conv_dim": "3", "conv_alpha": "1.5", "variable_rank": True}


def test_source_date_epoch_pins_the_files_date(monkeypatch):
    """SOURCE_DATE_EPOCH makes two seeded runs write bit-identical files; the date is naive ISO, as sd-scripts'."""
    from networks.lora_format import creation_date

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert creation_date() == "1970-01-02T00:00:00"


# ------------------------------------------------------------------------------------------ network_args / targets


@pytest.mark.parametrize(("value", "applied"), [("1", False), ("yes", False), (1, False), ("no", True), ("0", True),
                                                (0, True)])
def test_train_unet_only_reads_sd_scripts_spellings_and_ints(value, applied):
    """--network_args delivers 1 / yes / no as strings and Python callers pass ints: each means what it says."""
    assert parse_network_kwargs({"train_unet_only": value}) == (applied, None)


def test_either_text_encoder_switch_alone_leaves_the_text_encoder_out():
    """train_unet_only=true wins over apply_text_encoder=true, and apply_text_encoder=false over a false unet-only."""
    assert parse_network_kwargs({"train_unet_only": "true", "apply_text_encoder": "true"})[0] is False
    assert parse_network_kwargs({"train_unet_only": "false", "apply_text_encoder": "false"})[0] is False


def test_dropout_reads_sd_scripts_name_none_and_zero_and_refuses_one():
    """neuron_dropout is sd-scripts' spelling; "None" and 0 are no dropout; p = 1 would zero every LoRA output."""
    assert parse_network_kwargs({"neuron_dropout": "0.25"}) == (True, 0.25)
    assert parse_network_kwargs({"dropout": "None"}) == (True, None)
    assert parse_network_kwargs({"dropout": "0"}) == (True, None)
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\)"):
        parse_network_kwargs({"dropout": "1"})


def test_conv_alpha_defaults_to_one_and_must_be_finite_and_positive():
    """As sd-scripts: conv_dim alone has alpha 1 (not the rank), "None" is no LoCon; alpha 0 or inf is refused."""
    assert parse_conv_args({"conv_dim": "3"}) == (3, 1.0)
    assert parse_conv_args({"conv_dim": "None"}) == (None, None)
    for alpha in ("0", "inf"):
        with pytest.raises(ConfigError, match="conv_alpha positive"):
            parse_conv_args({"conv_dim": "3", "conv_alpha": alpha})


def test_two_text_encoders_are_refused_as_sdxl():
    """sd-scripts passes a list; two encoders mean SDXL, whose layers this SD v1.x LoRA would misname."""
    te = torch.nn.Linear(1, 1)
    assert single_text_encoder([te]) is te
    with pytest.raises(ModelError, match="SDXL"):
        single_text_encoder([te, te])


def test_an_applied_networks_own_layers_are_never_targets(models):
    """Loading a second LoRA into adapted models must not list (or adapt) the first LoRA's down/up layers."""
    te, unet = models
    before = layers_by_name(te, unet)
    create_network(1.0, RANK, ALPHA, None, te, unet, **CONV).apply_to(te, unet)
    assert layers_by_name(te, unet).keys() == before.keys()


def test_a_compiled_model_inside_ddp_has_the_inner_models_targets(models):
    """accelerate wraps the UNet (DDP .module, torch.compile ._orig_mod): the LoRA names are the inner model's."""
    _, unet = models
    compiled, ddp = torch.nn.Module(), torch.nn.Module()
    compiled._orig_mod = unet
    ddp.module = compiled
    assert find_target_layers(ddp, "unet").keys() == find_target_layers(unet, "unet").keys()


def test_grouped_and_dilated_convs_are_no_lora_targets():
    """A LoRA's down/up product cannot be merged into a grouped or dilated conv's weight: such convs are skipped."""
    resnet = torch.nn.ModuleDict({"plain": torch.nn.Conv2d(4, 4, 3), "grouped": torch.nn.Conv2d(4, 4, 3, groups=2),
                                  "dilated": torch.nn.Conv2d(4, 4, 3, dilation=2)})
    unet = torch.nn.Module()
    unet.down_blocks = torch.nn.ModuleList([torch.nn.Module()])
    unet.down_blocks[0].resnets = torch.nn.ModuleList([resnet])
    targets = find_target_layers(unet, "unet", conv=True)
    assert [path for path, _ in targets.values()] == ["down_blocks.0.resnets.0.plain"]
