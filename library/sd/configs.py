"""SD v1.x reference configurations: the training noise schedule and the SD v1.5 architecture.

The noise scheduler is never read from disk: :func:`library.sd.bundle.make_noise_scheduler` always builds SD
v1.x's *training* schedule from :data:`SCHEDULER_SETTINGS` (scaled-linear betas 0.00085 -> 0.012, 1000 steps,
epsilon prediction), which is what kohya's trainer does too. The three ``SD15_*`` configs describe SD v1.5's
networks; :mod:`library.sd.single_file` reads checkpoints without smp-lora metadata with them, so nothing is
fetched from the Hub.

:func:`diffusers_config` and :func:`text_encoder_config` reduce a loaded network's config to the fields that
define it; fingerprints and single-file metadata are built from these reductions.
"""

from __future__ import annotations

from typing import Any

# SD v1.x training schedule (CompVis v1-inference.yaml: linear_start 0.00085, linear_end 0.012, 1000 steps).
SCHEDULER_SETTINGS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "prediction_type": "epsilon",
    # steps_offset=1 matches SD's released scheduler configs (and avoids a diffusers deprecation warning).
    "steps_offset": 1,
}

# Built-in SD v1.5 configs, used for single files that carry no configs in their metadata.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14 text tower as shipped in SD v1.5's text_encoder/config.json (bos 0 / eos 2 are the legacy ids
# of that config; they only select how the unused pooled output is computed).
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# The CLIPTextConfig fields that define the network. Configs are reduced to these for metadata and
# fingerprints, so bookkeeping fields that vary across transformers versions (dtype, version, name) don't matter.
TEXT_ENCODER_CONFIG_KEYS = tuple(SD15_TEXT_ENCODER_CONFIG)


def diffusers_config(model: Any) -> dict[str, Any]:
    """A diffusers model's config without bookkeeping keys (``_class_name``, ``_name_or_path``, ...)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def text_encoder_config(text_encoder: Any) -> dict[str, Any]:
    """A CLIPTextModel's config reduced to :data:`TEXT_ENCODER_CONFIG_KEYS`."""
    config = text_encoder.config
    return {key: getattr(config, key) for key in TEXT_ENCODER_CONFIG_KEYS if hasattr(config, key)}
