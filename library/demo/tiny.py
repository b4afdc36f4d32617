"""A tiny Stable-Diffusion-shaped stack for tests and the CPU demo.

It uses the very classes of SD v1.5 (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``CLIPTokenizer``, ``DDPMScheduler``) with small widths, so every code path (LoRA injection, latent caching,
single-file conversion, diffusers pipelines) runs exactly as it would on SD v1.5, in well under a second:

* UNet: ``block_out_channels (32, 64)``, one layer per block, cross-attention width 32, 8x8 latents (~0.8 M params);
* VAE: three blocks (32, 64, 64), i.e. a scale factor of 4: 32 px images <-> 4x8x8 latents, SD's scaling factor;
* text encoder: CLIP with 2 layers of width 32 and SD's 77-token window;
* tokenizer: byte-level CLIP BPE with whole-word merges for the demo captions (about 560 tokens), built in
  memory because transformers 5 cannot build a usable CLIPTokenizer from ``vocab_file=`` paths.

Weights are random (seeded); the demo trains what it needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from library.errors import ModelError
from library.fileio import replace_dir, storage_errors_named, temporary_dir
from library.sd.bundle import ModelBundle, make_noise_scheduler
from library.sd.single_file import save_single_file
from library.sd.text import build_clip_tokenizer, small_clip_vocab

# Words of the demo captions ("a handwritten digit seven", "a photo of the number three", ...), each of which
# becomes a single token.
DIGIT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "photo", "picture", "image", "handwritten", "digit", "number",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip

TINY_IMAGE_SIZE = 32
TINY_VAE_SCALE_FACTOR = 4
TINY_LATENT_SIZE = TINY_IMAGE_SIZE // TINY_VAE_SCALE_FACTOR
SD_SCALING_FACTOR = 0.18215
CLIP_WINDOW = 77


def build_tiny_stack(seed: int = 0, words: Sequence[str] = DIGIT_WORDS) -> ModelBundle:
    """Build the tiny stack with seeded random weights (the same ``seed`` gives bit-identical weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, merges = small_clip_vocab(words)
    tokenizer = build_clip_tokenizer(vocab, merges, model_max_length=CLIP_WINDOW)

    # A private generator state: building the stack must not disturb (or depend on) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_WINDOW,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae_blocks = (32, 64, 64)  # 3 blocks -> 2 downsamplings -> scale factor 4
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(vae_blocks),
            up_block_types=("UpDecoderBlock2D",) * len(vae_blocks),
            block_out_channels=vae_blocks,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=SD_SCALING_FACTOR,
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
    for module in (text_encoder, vae, unet):
        module.eval()
        module.requires_grad_(False)
    return ModelBundle(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=make_noise_scheduler(),
        source=f"tiny:seed={seed}",
    )


def save_tiny_folder(bundle: ModelBundle, output_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``bundle`` as a diffusers folder (``StableDiffusionPipeline.save_pretrained`` layout).

    The folder is written next to ``output_dir`` first and renamed into place, so an interrupted run leaves
    no half-written model. An existing non-empty ``output_dir`` is replaced only with ``overwrite=True`` and only
    if it is itself a diffusers folder (has ``model_index.json``); nothing else is ever deleted.
    """
    from diffusers import StableDiffusionPipeline

    target = Path(output_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not overwrite:
            raise ModelError(
                f"{target} already exists and is not empty; choose another folder or overwrite it (--overwrite)"
            )
        if not (target / "model_index.json").is_file():
            raise ModelError(f"{target} is not a diffusers model folder; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoder,
        tokenizer=bundle.tokenizer,
        unet=bundle.unet,
        scheduler=bundle.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = temporary_dir(target)
    try:
        with storage_errors_named(target):
            pipeline.save_pretrained(str(staging), safe_serialization=True)
            replace_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def save_tiny_model(
    output_dir: str | os.PathLike,
    seed: int = 0,
    single_file: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> ModelBundle:
    """Build the tiny stack and write it as a diffusers folder, plus optionally one LDM-layout ``.safetensors``."""
    bundle = build_tiny_stack(seed)
    save_tiny_folder(bundle, output_dir, overwrite=overwrite)
    if single_file is not None:
        save_single_file(bundle, single_file)
    return bundle


__all__ = ["DIGIT_WORDS", "build_tiny_stack", "save_tiny_folder", "save_tiny_model"]
