"""The MIA test world shared by the evaluation and attack tests: the tiny random-init SD stack on disk, 48
random-pixel images split 8/16/8/16, and a deliberately over-fitted LoCon LoRA (built once per session by the
``mia_world`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from library.data.dataset import ImageCaption
from library.data.latents import LatentCache
from library.data.manifest import manifest_sha256, write_manifest
from library.data.splits import make_split
from library.sd.bundle import vae_fingerprint
from library.sd.diffusion import denoising_errors, draw_noise, per_sample_loss
from library.sd.text import encode_prompts
from networks.lora import create_network

# Sizes: 24 members (8 aux + 16 test) and 24 non-members. Images are random pixels, so nothing about one image
# predicts another: a LoRA can only lower a member's loss by memorising it, and the base model has no signal.
SIZES = {"member_aux": 8, "member_test": 16, "nonmember_aux": 8, "nonmember_test": 16}
TRAIN_STEPS, TRAIN_LR, TRAIN_MAX_T = 150, 1e-2, 20
EVAL_TIMESTEPS = ["1", "2", "5", "10"]


def write_random_images(folder: Path, n: int, seed: int) -> list[ImageCaption]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
        (folder / f"{i:03d}.txt").write_text("a photo\n", encoding="utf-8")
        records.append(ImageCaption(path, "a photo", 1))
    return records


def overfit_lora(bundle, manifest, manifest_file: Path, out: Path, *, steps: int = TRAIN_STEPS,
                 lr: float = TRAIN_LR, max_t: int = TRAIN_MAX_T, text_encoder: bool = False) -> Path:
    """A rank-16 UNet LoRA, ResNet convs included (conv_dim), over-fitted on the members at t < ``max_t`` (full
    batch, high lr); with ``text_encoder`` a text-encoder LoRA too (kohya's default), which binds each caption to
    its image."""
    members = manifest.members()
    captions = [e.caption for e in members]
    cache = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32)
    latents = cache.get_many([manifest.abs_path(e) for e in members])
    with torch.no_grad():
        cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, captions)
    torch.manual_seed(0)  # the LoRA's init: the same over-fitted file whichever tests ran before
    network = create_network(1.0, 16, 16.0, None, bundle.text_encoder, bundle.unet,
                             train_unet_only=not text_encoder, conv_dim=16, conv_alpha=16)
    network.apply_to(bundle.text_encoder if text_encoder else None, bundle.unet, apply_text_encoder=text_encoder)
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        if text_encoder:  # the caption's encoding moves with the text-encoder LoRA
            cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, captions)
        draw = draw_noise(latents, generator, 0, max_t)
        loss = per_sample_loss(denoising_errors(bundle.unet, bundle.noise_scheduler, latents, cond, draw)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = out / "overfit.safetensors"
    network.save_weights(path, metadata={"smp_lora.manifest_sha256": manifest_sha256(manifest_file)})
    network.restore()
    return path


def build_world(root: Path) -> dict:
    """Everything under ``root``: model/, data/, split.json, overfit.safetensors."""
    from library.demo.tiny import save_tiny_model

    bundle = save_tiny_model(root / "model", seed=0)
    records = write_random_images(root / "data", sum(SIZES.values()), seed=0)
    manifest = make_split(records, sizes=SIZES, seed=0)
    manifest_file = root / "split.json"
    write_manifest(manifest, manifest_file)
    lora = overfit_lora(bundle, manifest, manifest_file, root)
    return {"root": root, "bundle": bundle, "manifest": manifest, "manifest_file": manifest_file, "lora": lora}


def base_args(world, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(world["root"] / "model"),
        "--split_manifest", str(world["manifest_file"]),
        "--output_dir", str(out),
        "--resolution", "32", "--timesteps", *EVAL_TIMESTEPS, "--num_noise_draws", "2",
        "--batch_size", "64", "--paper_epochs", "20", "--paper_batch_size", "4", "--n_bootstrap", "300",
        "--no-progress_bar", *extra,
    ]
