"""Tests for library.sd's loading (bundle, configs, ldm_keys, loading, single_file, bake_vae), library.demo.tiny and
the diffusion loss (library.sd.diffusion)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from library.demo.tiny import DIGIT_WORDS, build_tiny_stack, save_tiny_model  # noqa: E402
from library.errors import ModelError  # noqa: E402
from library.sd import configs, ldm_keys, single_file  # noqa: E402
from library.sd.bundle import (  # noqa: E402
    ModelBundle,
    cast_weights,
    fingerprint,
    make_noise_scheduler,
    vae_fingerprint,
)
from library.sd.loading import check_sd_model, load_sd_model  # noqa: E402
from library.sd.single_file import save_single_file  # noqa: E402


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelBundle, Path, Path]:
    """The in-memory tiny stack, and the same weights written as a diffusers folder and as one single file."""
    root = tmp_path_factory.mktemp("tiny_sd")
    folder, single = root / "folder", root / "tiny.safetensors"
    bundle = save_tiny_model(folder, seed=0, single_file=single)
    return bundle, folder, single


@pytest.fixture(scope="session")
def loaded(tiny_files: tuple[ModelBundle, Path, Path]) -> dict[str, ModelBundle]:
    bundle, folder, single = tiny_files
    return {"memory": bundle, "folder": load_sd_model(folder), "single": load_sd_model(single)}


def _outputs(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """UNet, VAE (encode mean + decode) and text-encoder outputs on fixed inputs."""
    gen = torch.Generator().manual_seed(123)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    ids = bundle.tokenizer(
        ["a handwritten digit seven", "zebra"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        text = bundle.text_encoder(ids).last_hidden_state
        eps = bundle.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=text).sample
        mean = bundle.vae.encode(images).latent_dist.mean
        decoded = bundle.vae.decode(latents).sample
    return {"text": text, "unet": eps, "vae_mean": mean, "vae_decode": decoded}


# ------------------------------------------------------------------------------------------------ tiny stack


def test_tiny_stack_shapes_and_classes(tiny_files: tuple[ModelBundle, Path, Path]) -> None:
    bundle = tiny_files[0]
    assert type(bundle.unet).__name__ == "UNet2DConditionModel"
    assert type(bundle.vae).__name__ == "AutoencoderKL"
    assert type(bundle.text_encoder).__name__ == "CLIPTextModel"
    assert type(bundle.tokenizer).__name__ == "CLIPTokenizer"
    assert bundle.tokenizer.model_max_length == 77
    assert bundle.vae.config.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        latents = bundle.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert bundle.base_model_version == "sd_v1"
    # every demo word is one token (plus BOS/EOS)
    for word in DIGIT_WORDS:
        assert len(bundle.tokenizer(word).input_ids) == 3, word


def test_tiny_stack_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = build_tiny_stack(seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert fingerprint(first) == fingerprint(build_tiny_stack(seed=0))
    assert fingerprint(first) != fingerprint(build_tiny_stack(seed=1))


def test_tiny_stack_has_the_documented_architecture_frozen_in_eval_mode(
    tiny_files: tuple[ModelBundle, Path, Path],
) -> None:
    """The pretrained demo base is built from these configs: a changed width, depth or activation silently gives
    another model (and another demo), and pipelines size their default images from the UNet's sample_size."""
    from library.data.digit_captions import DIGIT_NAMES

    bundle = tiny_files[0]
    text, vae, unet = bundle.text_encoder.config, bundle.vae.config, bundle.unet.config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.hidden_act, text.max_position_embeddings) == (32, 64, 2, 4, "quick_gelu", 77)
    assert (tuple(vae.block_out_channels), vae.layers_per_block, vae.latent_channels) == ((32, 64, 64), 1, 4)
    assert (tuple(unet.block_out_channels), unet.layers_per_block, unet.cross_attention_dim,
            unet.attention_head_dim) == ((32, 64), 1, 32, 8)
    assert unet.sample_size * 2 ** (len(vae.block_out_channels) - 1) == 32  # 32 px images by default
    assert bundle.source == "tiny:seed=0"
    for module in (bundle.text_encoder, bundle.vae, bundle.unet):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    for name in DIGIT_NAMES:  # each caption word one token, the digit names included
        assert len(bundle.tokenizer(f"a handwritten digit {name}").input_ids) == 6, name


def test_save_tiny_model_overwrites_its_own_folder_only_when_asked(tmp_path: Path) -> None:
    """An existing model is kept unless --overwrite (a user folder never is: test_existing_folder_is_not_clobbered);
    the weights are written as safetensors, through a staging folder that does not stay behind."""
    model = tmp_path / "model"
    save_tiny_model(model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    seed_0 = weights.read_bytes()
    with pytest.raises(ModelError, match="already exists"):
        save_tiny_model(model, seed=1)
    assert weights.read_bytes() == seed_0
    save_tiny_model(model, seed=1, overwrite=True)
    assert weights.read_bytes() != seed_0
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_loading_leaves_the_global_rng_alone(tiny_files: tuple[ModelBundle, Path, Path], kind: str) -> None:
    """A seeded run draws its LoRA's initialisation after the model loads: either format leaves it the same."""
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_sd_model(tiny_files[1] if kind == "folder" else tiny_files[2])
    assert torch.equal(torch.rand(3), expected)


def test_noise_scheduler_is_sd_training_schedule() -> None:
    config = make_noise_scheduler().config
    assert config.num_train_timesteps == 1000
    assert config.beta_schedule == "scaled_linear"
    assert (config.beta_start, config.beta_end) == (0.00085, 0.012)
    assert config.clip_sample is False
    assert config.prediction_type == "epsilon"


# CompVis' configs/stable-diffusion/v1-inference.yaml (the parts diffusers' single-file converters read): an
# independent statement of SD v1.5's UNet and VAE that the built-in configs must agree with.
V1_INFERENCE_YAML = {"model": {"params": {
    "scale_factor": 0.18215,
    "unet_config": {"params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}},
}}}


def _init_defaults(cls: type) -> dict[str, object]:
    import inspect

    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}


def test_sd15_unet_and_vae_configs_are_what_diffusers_derives_from_compvis_yaml() -> None:
    """A wrong constant in the built-in configs would silently build another network for every SD v1.5 file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    # image_size 512: SD v1.5's native resolution (64-px latents); the argument is deprecated, hence the warning
    with pytest.warns(FutureWarning):
        unet = create_unet_diffusers_config_from_ldm(V1_INFERENCE_YAML, {}, image_size=512)
        vae = create_vae_diffusers_config_from_ldm(V1_INFERENCE_YAML, {}, image_size=512)
    for derived, ours, cls in ((unet, configs.SD15_UNET_CONFIG, UNet2DConditionModel),
                               (vae, configs.SD15_VAE_CONFIG, AutoencoderKL)):
        assert {k: ours[k] for k in derived if k in ours} == {k: v for k, v in derived.items() if k in ours}
        # the fields the yaml leaves out are diffusers' defaults in SD v1.5's released configs
        defaults = _init_defaults(cls)
        rest = {k: v for k, v in ours.items() if k not in derived}
        assert rest and rest == {k: defaults[k] for k in rest}


def test_sd15_networks_have_sd15s_parameter_counts() -> None:
    """The configs build networks of exactly v1-5-pruned.safetensors' size (UNet 859.5M, VAE 83.7M, CLIP 123.1M)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        networks = {"unet": UNet2DConditionModel.from_config(configs.SD15_UNET_CONFIG),
                    "vae": AutoencoderKL.from_config(configs.SD15_VAE_CONFIG),
                    "text": CLIPTextModel(CLIPTextConfig(**configs.SD15_TEXT_ENCODER_CONFIG))}
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in networks.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}
    text = configs.SD15_TEXT_ENCODER_CONFIG
    assert text["hidden_size"] // text["num_attention_heads"] == 64  # CLIP ViT-L/14's text heads are 64 wide
    # the rest are OpenAI CLIP's values, which transformers' defaults carry (bos/eos: SD's legacy ids, see configs)
    defaults = CLIPTextConfig().to_dict()
    for key in ("hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range", "initializer_factor",
                "pad_token_id", "max_position_embeddings", "vocab_size"):
        assert text[key] == defaults[key], key
    assert (text["bos_token_id"], text["eos_token_id"]) == (0, 2)


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_loaded_models_match_in_memory_stack(loaded: dict[str, ModelBundle], kind: str) -> None:
    reference, other = _outputs(loaded["memory"]), _outputs(loaded[kind])
    for name, tensor in reference.items():
        torch.testing.assert_close(other[name], tensor, atol=1e-6, rtol=0, msg=f"{kind}: {name}")
    for part in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded["memory"], part).state_dict(), getattr(loaded[kind], part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part


@pytest.mark.parametrize("kind", ["folder", "single"])
def test_loaded_models_are_frozen_eval_and_tokenizer_round_trips(
    loaded: dict[str, ModelBundle], kind: str
) -> None:
    bundle = loaded[kind]
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    text = "a handwritten digit seven, and an unknown word: zebra!"
    assert bundle.tokenizer(text).input_ids == loaded["memory"].tokenizer(text).input_ids
    assert bundle.tokenizer.get_vocab() == loaded["memory"].tokenizer.get_vocab()
    assert bundle.tokenizer.model_max_length == 77
    assert dict(bundle.noise_scheduler.config) == dict(make_noise_scheduler().config)


def test_fingerprints_equal_for_same_weights(loaded: dict[str, ModelBundle]) -> None:
    ids = {kind: fingerprint(bundle) for kind, bundle in loaded.items()}
    assert len(set(ids.values())) == 1, ids
    assert len(ids["memory"]) == 64 and int(ids["memory"], 16) >= 0
    assert loaded["memory"].fingerprint() == ids["memory"]
    assert len({vae_fingerprint(bundle.vae) for bundle in loaded.values()}) == 1


def test_fingerprint_changes_with_one_weight_or_config() -> None:
    bundle = build_tiny_stack(seed=0)
    base, base_vae = fingerprint(bundle), vae_fingerprint(bundle.vae)
    with torch.no_grad():
        bundle.unet.conv_in.weight[0, 0, 0, 0] += 1e-6
    assert fingerprint(bundle) != base
    assert vae_fingerprint(bundle.vae) == base_vae  # the VAE did not change

    other = build_tiny_stack(seed=0)
    with torch.no_grad():
        other.vae.decoder.conv_out.bias[1] += 1e-3
    assert vae_fingerprint(other.vae) != base_vae and fingerprint(other) != base

    config_changed = build_tiny_stack(seed=0)
    config_changed.vae.register_to_config(scaling_factor=0.5)
    assert vae_fingerprint(config_changed.vae) != base_vae

    half = build_tiny_stack(seed=0)
    half.vae.to(torch.float16)
    assert vae_fingerprint(half.vae) != base_vae


def test_fingerprint_changes_with_the_text_encoders_config_alone() -> None:
    """Same weights under another activation encode prompts differently: it is another base model."""
    bundle = build_tiny_stack(seed=0)
    base = fingerprint(bundle)
    bundle.text_encoder.config.hidden_act = "gelu"
    assert fingerprint(bundle) != base


def test_load_in_half_precision(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    bundle, _, single = tiny_files
    loaded = load_sd_model(single, dtype=torch.float16)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in loaded.text_encoder.parameters()} == {torch.float16}
    # a file saved in fp16 loads back (and up-casts) to the fp16-rounded weights
    half_file = save_single_file(bundle, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half_file.stat().st_size < single.stat().st_size * 0.6
    back = load_sd_model(half_file)
    weight = bundle.unet.conv_in.weight
    assert back.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(back.unet.conv_in.weight, weight.half().float())


def test_cast_weights_casts_without_diffusers_empty_fp32_warning(capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    unet = build_tiny_stack().unet
    assert not unet._keep_in_fp32_modules  # SD's UNet names no module to keep in float32
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    # diffusers' own handler writes to the stderr of import time (pytest's, not capfd's): listen on the logger
    records: list[str] = []
    heard = logging.Handler()
    heard.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(heard)
    try:
        cast_weights(unet, torch.bfloat16)
    finally:
        logger.removeHandler(heard)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert not [r for r in records if "kept in float32" in r]
    assert "kept in float32" not in capfd.readouterr().err
    assert logger.level == level  # restored


# ---------------------------------------------------------------------------------------- single-file layout


def test_single_file_uses_ldm_layout(tiny_files: tuple[ModelBundle, Path, Path]) -> None:
    single = tiny_files[2]
    with safe_open(str(single), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
        q_weight = handle.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_out.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # UpBlock2D's upsampler (no attention)
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.2.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ):
        assert key in keys, key
    assert q_weight.shape == (64, 64, 1, 1)  # LDM keeps VAE attention as 1x1 convs
    assert json.loads(metadata[single_file.META_CONFIGS]).keys() == {"unet", "vae", "text_encoder"}
    assert "vocab" in json.loads(metadata[single_file.META_TOKENIZER])


def test_ldm_mapping_inverts_diffusers_converters_for_sd15() -> None:
    """Our diffusers->LDM names, fed to diffusers' LDM->diffusers converters, give every tensor back in place.

    Runs on the real SD v1.5 architecture (meta tensors, no weights) with one distinct value per tensor, and
    checks a few names known from v1-5-pruned.safetensors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs.SD15_UNET_CONFIG)
        vae = AutoencoderKL.from_config(configs.SD15_VAE_CONFIG)
    unet_keys = list(unet.state_dict())
    unet_ldm = {
        ldm_keys.LDM_UNET_PREFIX + ldm_keys._unet_key_to_ldm(k, dict(unet.config)): torch.tensor([float(i)])
        for i, k in enumerate(unet_keys)
    }
    assert len(unet_ldm) == len(unet_keys) == 686
    back = convert_ldm_unet_checkpoint(unet_ldm, dict(unet.config))
    assert {k: int(v.item()) for k, v in back.items()} == {k: i for i, k in enumerate(unet_keys)}

    vae_state = vae.state_dict()
    vae_ldm = {}
    for i, key in enumerate(vae_state):
        ldm = ldm_keys.LDM_VAE_PREFIX + ldm_keys._vae_key_to_ldm(key, dict(vae.config))
        shape = (1, 1, 1, 1) if ".attn_1." in ldm and ldm.endswith("weight") else (1,)
        vae_ldm[ldm] = torch.full(shape, float(i))
    back = convert_ldm_vae_checkpoint(vae_ldm, dict(vae.config))
    assert {k: int(v.flatten()[0].item()) for k, v in back.items()} == {k: i for i, k in enumerate(vae_state)}
    assert len(vae_ldm) == 248

    for key in (
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    ):
        assert key in unet_ldm, key
    for key in (
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.decoder.mid.block_2.conv2.bias",
    ):
        assert key in vae_ldm, key


def test_vae_encoder_shortcuts_get_their_ldm_name() -> None:
    """A1111 and ComfyUI load the encoder's shortcut convs as nin_shortcut; diffusers' converter reads conv_shortcut
    back as well, so the round trip above cannot see a file they would fail to load."""
    config = dict(configs.SD15_VAE_CONFIG)
    assert (ldm_keys._vae_key_to_ldm("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", config)
            == "encoder.down.1.block.0.nin_shortcut.weight")


# ------------------------------------------------------------------------------------------------ tokenizers


def _rewrite_metadata(src: Path, dst: Path, drop: tuple[str, ...]) -> None:
    with safe_open(str(src), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k not in drop}
    save_file(tensors, str(dst), metadata=metadata)


def test_single_file_tokenizer_sources(
    tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, folder, single = tiny_files
    bare = tmp_path / "no_tokenizer.safetensors"
    _rewrite_metadata(single, bare, drop=(single_file.META_TOKENIZER,))

    # no tokenizer anywhere -> one clear error pointing at --tokenizer_path
    monkeypatch.setattr(single_file.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match=r"no_tokenizer\.safetensors.*--tokenizer_path"):
        load_sd_model(bare)

    # a folder without a tokenizer (the model's root, its unet/, an empty one) is one line at the check, with the
    # likely fix; transformers would build a broken tokenizer from it that fails only after the model loaded
    (tmp_path / "empty").mkdir()
    for wrong, hint in ((folder, f"did you mean {folder / 'tokenizer'}"), (folder / "unet", "diffusers SD v1.5"),
                        (tmp_path / "empty", "diffusers SD v1.5")):
        for model in (bare, folder):
            with pytest.raises(ModelError, match=rf"tokenizer folder {re.escape(str(wrong))} holds no CLIP tokenizer.*"
                                                 rf"{re.escape(hint)}"):
                check_sd_model(model, tokenizer_path=wrong)

    # an explicit tokenizer folder wins
    loaded = load_sd_model(bare, tokenizer_path=folder / "tokenizer")
    assert loaded.tokenizer.get_vocab() == bundle.tokenizer.get_vocab()

    # an installed open_clip's BPE file is found without importing the package
    fake_pkg = tmp_path / "open_clip"
    fake_pkg.mkdir()
    merges = ["h a", "ha n", "han d</w>"]
    with gzip.open(fake_pkg / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(["#version: 0.2", *merges, ""]))
    spec = types.SimpleNamespace(submodule_search_locations=[str(fake_pkg)])
    monkeypatch.setattr(single_file.importlib.util, "find_spec", lambda name, *a: spec if name == "open_clip" else None)
    from_bpe = load_sd_model(bare).tokenizer
    vocab = from_bpe.get_vocab()
    assert len(vocab) == 512 + len(merges) + 2
    assert vocab["hand</w>"] == 512 + 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert from_bpe("hand").input_ids == [vocab["<|startoftext|>"], vocab["hand</w>"], vocab["<|endoftext|>"]]


def test_tokenizer_too_big_for_text_encoder(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    from library.sd.text import build_clip_tokenizer, small_clip_vocab

    big = build_clip_tokenizer(*small_clip_vocab([f"word{i}" for i in range(60)]))
    big.save_pretrained(str(tmp_path / "big_tokenizer"))
    with pytest.raises(ModelError, match="tokenizer has .* tokens"):
        load_sd_model(tiny_files[1], tokenizer_path=tmp_path / "big_tokenizer")


@pytest.mark.parametrize("unet_changes, says", [
    ({"use_linear_projection": True}, "SD 2.x / SDXL"),
    ({"addition_embed_type": "text_time"}, "SD 2.x / SDXL"),
    ({"cross_attention_dim": 1024}, "1024-dim text states"),
    ({"in_channels": 9}, "9 input channels"),
])
def test_components_that_do_not_form_an_sd_v1_stack_are_named(
    tiny_files: tuple[ModelBundle, Path, Path], unet_changes: dict, says: str
) -> None:
    """A folder assembled from SD 2.x / SDXL / inpainting parts loads part by part: the cross-checks refuse it."""
    from library.sd.loading import _check_stack

    bundle = tiny_files[0]
    _check_stack(bundle, Path("model"))  # the tiny SD v1.x stack itself passes
    unet = types.SimpleNamespace(config={**bundle.unet.config, **unet_changes})
    parts = types.SimpleNamespace(unet=unet, text_encoder=bundle.text_encoder, vae=bundle.vae,
                                  tokenizer=bundle.tokenizer)
    with pytest.raises(ModelError, match=rf"^model.*{re.escape(says)}"):
        _check_stack(parts, Path("model"))


@pytest.mark.parametrize("sample_size, vae_blocks, expected", [
    (64, [128, 256, 512, 512], 512), (32, [64], 32), (None, [64], None), ([64, 64], [64], None), (0, [64], None),
    (64, [], None),
])
def test_native_resolution_is_the_unets_sample_size_times_the_vaes_downscale(
    tmp_path: Path, sample_size: object, vae_blocks: list[int], expected: int | None
) -> None:
    """The default image size of a model, read from its configs: None, never a crash, when they do not give one."""
    from library.sd.loading import native_resolution, text_encoder_layers

    configs = {"unet": {"sample_size": sample_size}, "vae": {"block_out_channels": vae_blocks},
               "text_encoder": {"num_hidden_layers": 12, "num_attention_heads": 8}}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert native_resolution(tmp_path) == expected
    assert text_encoder_layers(tmp_path) == 12  # what --clip_skip counts


# ----------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nowhere.*does not exist"):
        load_sd_model(tmp_path / "nowhere")


def test_a_missing_tokenizer_folder_is_named_missing(tmp_path: Path) -> None:
    """--tokenizer_path with a typo must say the folder does not exist, not that it holds no tokenizer."""
    from library.sd.bundle import check_tokenizer_folder

    with pytest.raises(ModelError, match=r"tokenizer folder .*missing does not exist"):
        check_tokenizer_folder(tmp_path / "missing")


def test_a_loading_failure_is_named_by_its_type_and_first_line() -> None:
    """Loading errors are one line: the first of a multi-line message, which states the cause."""
    from library.sd.bundle import first_line

    assert first_line(OSError("no file named config.json\nsee the docs\n")) == "OSError: no file named config.json"
    assert first_line(ValueError("")) == "ValueError: "


def test_folder_missing_unet(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "no_unet"
    shutil.copytree(tiny_files[1], broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelError, match=r"no_unet.*'unet/' is missing"):
        load_sd_model(broken)


def test_folder_with_corrupt_weights(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "corrupt_vae"
    shutil.copytree(tiny_files[1], broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"corrupt_vae/vae"):
        load_sd_model(broken)


def test_a_folder_without_weights_is_named_before_any_load(
    tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path
) -> None:
    """An interrupted download leaves vae/ with its config only: the dry run must say so, not the load minutes later."""
    broken = tmp_path / "no_vae_weights"
    shutil.copytree(tiny_files[1], broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no_vae_weights/vae holds no weights \(no \.safetensors file\)"):
        check_sd_model(broken)


def test_folder_of_fp16_variant_weights_loads(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    """A download of SD v1.5's fp16 files only: ``diffusion_pytorch_model.fp16.safetensors`` / ``model.fp16.safetensors``."""
    variant = tmp_path / "fp16_only"
    shutil.copytree(tiny_files[1], variant)
    for sub in ("unet", "vae", "text_encoder"):
        weights = next((variant / sub).glob("*.safetensors"))
        weights.rename(weights.with_suffix(".fp16.safetensors"))
    check_sd_model(variant)
    ours, theirs = _outputs(load_sd_model(variant)), _outputs(tiny_files[0])
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_a_folder_with_several_weight_variants_loads_the_plain_weights_then_fp16(tmp_path: Path) -> None:
    """Hub downloads often hold fp16 beside other variants (ema, non_ema): the plain file wins, else fp16."""
    from library.sd.loading import _weights_variant

    for name in ("diffusion_pytorch_model.ema.safetensors", "diffusion_pytorch_model.fp16.safetensors", "config.json"):
        (tmp_path / name).write_bytes(b"")
    assert _weights_variant(tmp_path) == "fp16"
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert _weights_variant(tmp_path) is None


def test_a_folder_without_its_tokenizer_needs_tokenizer_path_only(
    tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path
) -> None:
    """Some uploads leave tokenizer/ out; --tokenizer_path supplies it, and then the folder needs none."""
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_files[1], folder, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ModelError, match=r"no_tokenizer is not a diffusers .*'tokenizer/' is missing"):
        check_sd_model(folder)
    check_sd_model(folder, tokenizer_path=tiny_files[1] / "tokenizer")


def test_folder_with_v_prediction_scheduler(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    broken = tmp_path / "vpred"
    shutil.copytree(tiny_files[1], broken)
    config_file = broken / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"scheduler_config\.json.*v_prediction"):
        load_sd_model(broken)


def test_a_scheduler_config_without_prediction_type_loads_and_other_schedules_are_only_logged(
    tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Older SD v1.x folders omit prediction_type (diffusers' default: epsilon); another schedule is only logged."""
    folder = tmp_path / "old_scheduler"
    shutil.copytree(tiny_files[1], folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    with caplog.at_level("WARNING", logger="library.sd.loading"):
        check_sd_model(folder)  # SD v1.x's own training schedule: nothing to say
    assert caplog.records == []
    del config["prediction_type"]
    config["num_train_timesteps"] = 500
    config_file.write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="library.sd.loading"):
        check_sd_model(folder)
    assert [r.getMessage() for r in caplog.records] == [
        f"{config_file} has num_train_timesteps=500; training uses SD v1.x's 1000 regardless"]


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_single_file(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path, cut: str) -> None:
    data = tiny_files[2].read_bytes()
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(data[: len(data) // 2] if cut == "half" else data[:100])
    with pytest.raises(ModelError, match=r"truncated\.safetensors.*(truncated|corrupt)"):
        load_sd_model(broken)


def test_garbage_single_file(tmp_path: Path) -> None:
    broken = tmp_path / "garbage.safetensors"
    broken.write_bytes(b"this is not a safetensors file at all" * 10)
    with pytest.raises(ModelError, match=r"garbage\.safetensors"):
        load_sd_model(broken)


def test_non_sd_safetensors(tmp_path: Path) -> None:
    other = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}, str(other))
    with pytest.raises(ModelError, match=r"classifier\.safetensors does not look like an SD v1\.x checkpoint"):
        load_sd_model(other)


def test_lora_file_is_recognised(tmp_path: Path) -> None:
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(ModelError, match=r"my_lora\.safetensors looks like a LoRA file"):
        load_sd_model(lora)


def test_wrong_architecture_names_the_shape(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    """Without smp-lora metadata a file is read as SD v1.5; the tiny weights then fail the shape check."""
    bare = tmp_path / "model.safetensors"
    _rewrite_metadata(tiny_files[2], bare, drop=(single_file.META_CONFIGS, single_file.META_TOKENIZER))
    with pytest.raises(ModelError) as info:  # the tokenizer is checked first (before any tensor): pass one
        load_sd_model(bare, tokenizer_path=tiny_files[1] / "tokenizer")
    message = str(info.value)
    assert "model.safetensors does not look like an SD v1.x checkpoint" in message
    assert "unet conv_in.weight expects shape (320, 4, 3, 3), file has (32, 4, 3, 3)" in message


def _rewrite_tensors(src: Path, dst: Path, edit) -> None:
    """``src`` with its tensors passed through ``edit(dict) -> dict`` (metadata kept)."""
    with safe_open(str(src), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata() or {}
    save_file(edit(tensors), str(dst), metadata=metadata)


def _unet_output(bundle: ModelBundle) -> torch.Tensor:
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, bundle.text_encoder.config.hidden_size)
    with torch.no_grad():
        return bundle.unet(latents, 10, encoder_hidden_states=context).sample


def test_ema_weights_are_named_and_the_non_ema_unet_is_read(
    tiny_files: tuple[ModelBundle, Path, Path], loaded: dict[str, ModelBundle], tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """v1-5-pruned.safetensors holds both UNets (EMA under flattened ``model_ema.diffusion_model*`` names): the
    non-EMA one is read, as kohya and A1111 read it, and a warning says so."""
    ema_file = tmp_path / "with-ema.safetensors"

    def add_ema(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v + 1.0
               for k, v in tensors.items() if k.startswith(ldm_keys.LDM_UNET_PREFIX)}
        return {**tensors, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1)}

    _rewrite_tensors(tiny_files[2], ema_file, add_ema)
    capfd.readouterr()
    with_ema = load_sd_model(ema_file)
    err = capfd.readouterr().err
    assert "also holds EMA weights (model_ema.*): its non-EMA UNet (model.diffusion_model.*) is used" in err
    assert fingerprint(with_ema) == fingerprint(loaded["single"])
    load_sd_model(tiny_files[2])
    assert "EMA" not in capfd.readouterr().err  # a file without EMA weights: no word


def test_a_checkpoint_with_the_text_encoders_position_ids_loads(
    tiny_files: tuple[ModelBundle, Path, Path], loaded: dict[str, ModelBundle], tmp_path: Path
) -> None:
    """v1-5-pruned.safetensors and most A1111 exports hold CLIP's ``position_ids`` buffer, which the model rebuilds:
    such a file loads as the same model (it is no "unexpected" tensor of another architecture)."""
    with_ids = tmp_path / "with-position-ids.safetensors"
    positions = loaded["single"].text_encoder.config.max_position_embeddings
    key = ldm_keys.LDM_TEXT_PREFIX + "text_model.embeddings.position_ids"
    _rewrite_tensors(tiny_files[2], with_ids, lambda t: {**t, key: torch.arange(positions)[None]})
    assert fingerprint(load_sd_model(with_ids)) == fingerprint(loaded["single"])


def test_inpainting_checkpoint_is_named(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    inpaint = tmp_path / "inpaint.safetensors"
    key = ldm_keys.LDM_UNET_PREFIX + "input_blocks.0.0.weight"

    def nine_channels(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors[key]
        return {**tensors, key: torch.cat([weight, weight, weight[:, :1]], dim=1)}

    _rewrite_tensors(tiny_files[2], inpaint, nine_channels)
    with pytest.raises(ModelError, match=r"inpaint\.safetensors looks like an inpainting checkpoint \(its UNet takes "
                                         r"9 input channels"):
        load_sd_model(inpaint)


def _without_vae(src: Path, dst: Path) -> None:
    _rewrite_tensors(src, dst, lambda t: {k: v for k, v in t.items() if not k.startswith(ldm_keys.LDM_VAE_PREFIX)})


def _vae_only(src: Path, dst: Path) -> None:
    """The LDM VAE file a VAE download is (``encoder.*``, ``decoder.*``, ``quant_conv.*``, no prefix)."""
    prefix = ldm_keys.LDM_VAE_PREFIX
    _rewrite_tensors(src, dst, lambda t: {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)})


def test_checkpoint_without_vae_and_vae_file_are_named(tiny_files: tuple[ModelBundle, Path, Path],
                                                       tmp_path: Path) -> None:
    no_vae, vae = tmp_path / "merge-novae.safetensors", tmp_path / "vae.safetensors"
    _without_vae(tiny_files[2], no_vae)
    _vae_only(tiny_files[2], vae)
    with pytest.raises(ModelError, match=r"merge-novae\.safetensors holds a UNet and a text encoder but no VAE .*"
                                         r"python scripts/bake_vae\.py --checkpoint .*merge-novae\.safetensors"):
        check_sd_model(no_vae)
    with pytest.raises(ModelError, match=r"vae\.safetensors looks like a VAE file, not a base model"):
        check_sd_model(vae)


def test_bake_vae_from_each_vae_layout(tiny_files: tuple[ModelBundle, Path, Path], loaded: dict[str, ModelBundle],
                                       tmp_path: Path) -> None:
    """A checkpoint saved without its VAE takes it back from an LDM file, a diffusers-keyed file or a diffusers
    folder, and is then the very base model it was (same fingerprint)."""
    from library.sd.bake_vae import bake_vae

    bundle, folder, single = tiny_files
    no_vae, ldm_vae = tmp_path / "novae.safetensors", tmp_path / "vae-ldm.safetensors"
    _without_vae(single, no_vae)
    _vae_only(single, ldm_vae)
    diffusers_file = tmp_path / "vae-diffusers.safetensors"
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", diffusers_file)
    old_names = tmp_path / "vae-diffusers-old-names.safetensors"  # diffusers' earlier mid-attention names
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def old(key: str) -> str:
        for new, previous in renames.items():
            key = key.replace(new, previous) if ".mid_block.attentions." in key else key
        return key

    _rewrite_tensors(diffusers_file, old_names, lambda t: {old(k): v for k, v in t.items()})
    assert any(".proj_attn." in k for k in load_file(str(old_names)))
    for index, vae in enumerate((ldm_vae, diffusers_file, folder / "vae", old_names)):
        output = bake_vae(no_vae, vae, tmp_path / f"baked{index}.safetensors")
        assert fingerprint(load_sd_model(output)) == fingerprint(loaded["single"]), vae


def test_bake_vae_takes_the_first_stage_model_of_a_whole_checkpoint(tiny_files: tuple[ModelBundle, Path, Path],
                                                                  loaded: dict[str, ModelBundle],
                                                                  tmp_path: Path) -> None:
    """A VAE under first_stage_model.* (another full checkpoint, an LDM VAE export) is the VAE, not 'no VAE'."""
    from library.sd.bake_vae import bake_vae

    single = tiny_files[2]
    no_vae = tmp_path / "novae.safetensors"
    _without_vae(single, no_vae)
    output = bake_vae(no_vae, single, tmp_path / "baked.safetensors")
    assert fingerprint(load_sd_model(output)) == fingerprint(loaded["single"])


def test_bake_vae_replaces_a_vae_and_refuses_a_misfit(tiny_files: tuple[ModelBundle, Path, Path],
                                                      tmp_path: Path) -> None:
    from library.sd.bake_vae import bake_vae

    single = tiny_files[2]
    other = tmp_path / "other-vae.safetensors"
    _vae_only(single, other)
    _rewrite_tensors(other, other, lambda t: {k: v + 0.5 if k == "decoder.conv_out.bias" else v for k, v in t.items()})
    baked = bake_vae(single, other, tmp_path / "baked.safetensors")
    new_bias = load_sd_model(baked).vae.decoder.conv_out.bias
    assert torch.allclose(new_bias, tiny_files[0].vae.decoder.conv_out.bias + 0.5)
    with pytest.raises(ModelError, match="exists; pass --overwrite"):
        bake_vae(single, other, baked)
    with pytest.raises(ModelError, match="another file"):
        bake_vae(single, other, single)
    with pytest.raises(ModelError, match=r"missing-vae\.safetensors does not exist"):
        bake_vae(single, tmp_path / "missing-vae.safetensors", tmp_path / "never.safetensors")
    misfit = tmp_path / "misfit.safetensors"
    _rewrite_tensors(other, misfit, lambda t: {k: v for k, v in t.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(ModelError, match=r"misfit\.safetensors .*1 tensors missing"):
        bake_vae(single, misfit, tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_pickle_checkpoint_refused(tmp_path: Path, suffix: str) -> None:
    """Every pickle suffix (in any case) is named as a pickle, with the flag that reads it, not as an unknown file."""
    ckpt = tmp_path / f"v1-5-pruned{suffix}"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelError, match=rf"v1-5-pruned\{suffix} is a pickle-based checkpoint.*--allow_pickle"):
        load_sd_model(ckpt)


def test_existing_folder_is_not_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not empty"):
        save_tiny_model(target)
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        save_tiny_model(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------- diffusers interop


def test_diffusers_pipeline_loads_tiny_folder(tiny_files: tuple[ModelBundle, Path, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_files[1]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a handwritten digit seven", "digit zero"],
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 32, 32)
    assert torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------ the diffusion loss


class _RecordingUNet:
    """Stands in for the UNet: records what it is given and predicts a known function of it."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, noisy, timesteps, encoder_hidden_states):
        self.calls.append((noisy, timesteps, encoder_hidden_states))
        shift = timesteps.float() / 1000.0 + encoder_hidden_states.mean((1, 2))
        return types.SimpleNamespace(sample=0.5 * noisy + shift.view(-1, 1, 1, 1))


def _hand_alphas_cumprod() -> torch.Tensor:
    # SD v1.x's "scaled_linear" schedule written out: betas linear in sqrt from 0.00085 to 0.012 over 1000 steps.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def test_denoising_errors_are_the_epsilon_loss_on_the_forward_process_by_hand() -> None:
    """Eq. 1's integrand: z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps goes into the UNet at t itself, and the error
    is (eps_hat - eps)^2: epsilon-prediction, SD v1.x's target (not x0, not v). Noising, target and timestep reach
    every training loss, attack feature and evaluation number, so each is checked against the formula by hand."""
    from library.sd.diffusion import NoiseDraw, denoising_errors

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    cond = torch.randn(3, 5, 6, generator=g)
    timesteps = torch.tensor([0, 421, 999])
    unet = _RecordingUNet()
    errors = denoising_errors(unet, make_noise_scheduler(), latents, cond, NoiseDraw(timesteps, noise))
    abar = _hand_alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
    noisy = (abar.sqrt() * latents.double() + (1 - abar).sqrt() * noise.double()).float()
    (seen_noisy, seen_t, seen_cond), = unet.calls
    torch.testing.assert_close(seen_noisy, noisy)
    assert torch.equal(seen_t, timesteps) and torch.equal(seen_cond, cond)
    prediction = 0.5 * noisy + timesteps.view(-1, 1, 1, 1) / 1000.0 + cond.mean((1, 2)).view(-1, 1, 1, 1)
    torch.testing.assert_close(errors, (prediction - noise) ** 2)


def test_per_sample_loss_is_the_mean_over_channels_and_pixels() -> None:
    """Eq. 1 per sample, as SD trainers take it: one number per row, the mean of its C*H*W squared errors."""
    from library.sd.diffusion import per_sample_loss

    errors = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    expected = torch.tensor([sum(range(12)) / 12, sum(range(12, 24)) / 12])
    torch.testing.assert_close(per_sample_loss(errors), expected)


@pytest.mark.parametrize("timesteps", [[100, 700, 300], [250, 50]])  # K = 2 as well: --sima_timesteps 0 20
def test_multi_timestep_rows_pair_each_sample_with_each_timestep(timesteps: list[int]) -> None:
    """Row i*K + k is sample i (its latents and its conditioning) noised at timesteps[k]: the multi-timestep attack
    features read the rows in that order, so a sample/timestep mix-up would hand them another sample's errors."""
    from library.sd.diffusion import denoising_errors, fixed_timestep_noise

    g = torch.Generator().manual_seed(1)
    latents, cond = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 5, 6, generator=g)
    draw = fixed_timestep_noise(latents, timesteps, torch.Generator().manual_seed(2))
    assert draw.timesteps.tolist() == timesteps * 2
    unet = _RecordingUNet()
    denoising_errors(unet, make_noise_scheduler(), latents, cond, draw)
    (seen_noisy, _, seen_cond), = unet.calls
    abar = _hand_alphas_cumprod()
    k_count = len(timesteps)
    for i in range(2):
        for k, t in enumerate(timesteps):
            row = i * k_count + k
            expected = abar[t].sqrt() * latents[i].double() + (1 - abar[t]).sqrt() * draw.noise[row].double()
            torch.testing.assert_close(seen_noisy[row], expected.float())
            assert torch.equal(seen_cond[row], cond[i])


def test_training_timesteps_cover_min_to_max_minus_one() -> None:
    """--min_timestep / --max_timestep as in sd-scripts: t ~ U{min, ..., max - 1}; both ends are drawn, nothing
    outside. An off-by-one would train (and attack) on a timestep the user excluded, or on t = 1000, past the
    schedule's end."""
    from library.sd.diffusion import draw_noise

    latents = torch.zeros(4000, 1, 1, 1)
    draw = draw_noise(latents, torch.Generator().manual_seed(0), 10, 13)
    assert set(draw.timesteps.tolist()) == {10, 11, 12}
    assert set(draw_noise(latents, torch.Generator().manual_seed(0)).timesteps.tolist()) <= set(range(1000))
    assert draw_noise(latents, torch.Generator().manual_seed(0)).timesteps.max() == 999


def test_the_default_timesteps_are_the_whole_schedule_from_zero() -> None:
    """Callers that pass no range (the demo's UNet pre-training) must draw t = 0 to 999: a default of 1 would
    never train the least noisy step."""
    from library.sd.diffusion import draw_noise

    draw = draw_noise(torch.zeros(20000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert set(draw.timesteps.tolist()) == set(range(1000))


def test_a_noise_draw_is_the_callers_seeded_stream_timesteps_first_then_gaussian_noise() -> None:
    """(t, eps) come from the caller's generator, timesteps first, eps ~ N(0, I) in the latents' dtype: that order
    and that stream are what make a seeded run, and its resume, repeat bit for bit across versions."""
    from library.sd.diffusion import draw_noise

    latents = torch.zeros(3, 4, 8, 8, dtype=torch.float16)
    draw = draw_noise(latents, torch.Generator().manual_seed(5), 10, 500)
    g = torch.Generator().manual_seed(5)
    assert torch.equal(draw.timesteps, torch.randint(10, 500, (3,), generator=g))
    assert draw.noise.dtype == torch.float16
    assert torch.equal(draw.noise, torch.randn(latents.shape, generator=g).half())


# ------------------------------------------------------------------------------------------- single-file contract


def test_a_single_file_is_written_only_under_a_safetensors_name(tiny_files: tuple[ModelBundle, Path, Path],
                                                                 tmp_path: Path) -> None:
    """A safetensors file named .ckpt would be unpickled (or refused) by every loader: refused, nothing written."""
    with pytest.raises(ModelError, match=r"must end in \.safetensors"):
        save_single_file(tiny_files[0], tmp_path / "model.ckpt")
    assert not (tmp_path / "model.ckpt").exists()


def test_single_file_header_names_sd_v1_and_keeps_its_own_entries_over_the_callers(
    tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path
) -> None:
    """A1111 / ComfyUI read modelspec.architecture to pick the model; a caller's metadata rides along but cannot
    override the entries loading relies on."""
    path = save_single_file(tiny_files[0], tmp_path / "ft.safetensors",
                            metadata={"ss_seed": "1", single_file.META_FORMAT: "9"})
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert (metadata["modelspec.architecture"], metadata["ss_base_model_version"]) == ("stable-diffusion-v1", "sd_v1")
    assert (metadata["ss_seed"], metadata[single_file.META_FORMAT]) == ("1", "1")


@pytest.mark.parametrize(
    "key, says",
    [
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "looks like an SDXL checkpoint"),
        ("cond_stage_model.model.positional_embedding", r"looks like an SD 2\.x checkpoint"),
        ("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight", "looks like a LoRA file"),
    ],
)
def test_a_checkpoint_of_another_kind_is_named_for_what_it_is(key: str, says: str, tmp_path: Path) -> None:
    """An SDXL / SD 2.x checkpoint or a PEFT LoRA passed as the base model gets a message saying so."""
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2), ldm_keys.LDM_UNET_PREFIX + "out.2.bias": torch.zeros(2)}, str(path))
    with pytest.raises(ModelError, match=rf"other\.safetensors {says}"):
        load_sd_model(path)


def test_a_tensor_the_model_lacks_is_one_error_naming_it(tiny_files: tuple[ModelBundle, Path, Path],
                                                         tmp_path: Path) -> None:
    """An extra tensor means another architecture: named by the shape check, not a load_state_dict traceback."""
    extra = tmp_path / "extra.safetensors"
    key = ldm_keys.LDM_TEXT_PREFIX + "text_model.extra.weight"
    _rewrite_tensors(tiny_files[2], extra, lambda tensors: {**tensors, key: torch.zeros(2)})
    with pytest.raises(ModelError, match=r"text_encoder: 0 tensors missing, 1 unexpected, e\.g\. unexpected "):
        load_sd_model(extra)


def test_an_explicit_tokenizer_folder_wins_over_the_files_own(tiny_files: tuple[ModelBundle, Path, Path],
                                                              tmp_path: Path) -> None:
    """--tokenizer_path is the user's choice: the tokenizer in the file's metadata must not replace it."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_files[1] / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    assert load_sd_model(tiny_files[2], tokenizer_path=folder).tokenizer.model_max_length == 64


def test_an_upper_case_safetensors_name_loads(tiny_files: tuple[ModelBundle, Path, Path], tmp_path: Path) -> None:
    """Windows users' MODEL.SAFETENSORS is a safetensors file, not a pickle needing --allow_pickle."""
    upper = tmp_path / "TINY.SAFETENSORS"
    shutil.copy(tiny_files[2], upper)
    assert torch.equal(load_sd_model(upper).unet.conv_in.weight, tiny_files[0].unet.conv_in.weight)
