"""Pre-training the demo base model's UNet and text encoder (step 3 of :mod:`library.demo.pretrain`), and the
paired held-out denoising loss that shows what it learnt.

**UNet** (all parameters) **and text encoder**: standard SD epsilon-prediction loss on the VAE posterior means
(the same "mean" latents the LoRA trainer caches), t ~ U{0..999}, SD's DDPM schedule
(:func:`library.sd.bundle.make_noise_scheduler`). With probability ``caption_dropout`` a caption is replaced by
"" so the model also learns the unconditional prediction classifier-free guidance needs.

Why the text encoder is trained too (``train_text_encoder=True``, the default): with it frozen at its random
init, the ten digit captions differ by only ~5% of their states' norm, and within the CPU budget the UNet
learned to ignore them entirely — measured on held-out digits after 1,500 steps, the loss with the right
caption was 0.07990 vs 0.07992 with a wrong one, and generated samples were classified as the prompted
digit 10.5% of the time (chance). Trained jointly (same steps, ~10% more time), right 0.0783 vs wrong 0.0814
and 44% of samples at guidance 5 showed the prompted digit. The effect is fragile on this budget: runs of
1,300 steps (also with a 5-10x text-encoder learning rate) did not pick up the captions at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from library.demo.pretrain_common import Progress, index_batches, warmup_cosine_lr
from library.errors import ModelError
from library.runtime import echo
from library.sd.bundle import ModelBundle
from library.sd.diffusion import (
    NoiseDraw,
    denoising_errors,
    draw_noise,
    per_sample_loss,
)
from library.sd.text import encode_prompts


def _distinct_captions(captions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct captions (sorted) and each caption's row in them; row ``len(distinct)`` is ""."""
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    return distinct, torch.tensor([row[c] for c in captions], dtype=torch.long)


@torch.no_grad()
def caption_states(bundle: ModelBundle, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states of the distinct captions plus "" (last row), and each caption's row index.

    Demo captions repeat (ten digit names), so encoding each distinct caption once is far cheaper than
    running the text encoder per image.
    """
    distinct, rows = _distinct_captions(captions)
    return encode_prompts(bundle.tokenizer, bundle.text_encoder, distinct + [""]), rows


def train_unet(
    bundle: ModelBundle,
    latents: torch.Tensor,
    captions: Sequence[str],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    caption_dropout: float,
    generator: torch.Generator,
    train_text_encoder: bool = True,
    log: Callable[[str], object] = echo,
) -> list[float]:
    """Train every UNet parameter in place with SD's epsilon loss on scaled latents; return per-step losses.

    With ``train_text_encoder`` the text encoder is trained jointly (same learning rate): the distinct
    captions are re-encoded, with gradients, once per step.
    """
    losses: list[float] = []
    if steps <= 0:
        return losses
    distinct, rows = _distinct_captions(captions)
    empty_row = len(distinct)
    unet, text_encoder = bundle.unet, bundle.text_encoder
    params = list(unet.parameters())
    if train_text_encoder:
        text_encoder.requires_grad_(True)
        text_encoder.train()
        params += list(text_encoder.parameters())
        states = None
    else:
        states, _ = caption_states(bundle, distinct)
    unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    progress = Progress("unet", steps, log)
    for step, index in enumerate(index_batches(len(latents), batch_size, steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr)
        batch_rows = rows[index].clone()
        dropped = torch.rand(len(index), generator=generator) < caption_dropout
        batch_rows[dropped] = empty_row
        x = latents[index]
        draw = draw_noise(x, generator)
        step_states = (
            encode_prompts(bundle.tokenizer, text_encoder, distinct + [""]) if train_text_encoder else states
        )
        loss = per_sample_loss(denoising_errors(unet, bundle.noise_scheduler, x, step_states[batch_rows], draw)).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"UNet pre-training diverged at step {step + 1} (loss {value}); lower the UNet lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(value)
        progress.update(step, value)
    for module in (unet, text_encoder):
        module.eval()
        module.requires_grad_(False)
    return losses


@torch.no_grad()
def denoising_loss(
    bundle: ModelBundle,
    latents: torch.Tensor,
    captions: Sequence[str],
    *,
    seed: int = 1234,
    draws: int = 4,
    batch_size: int = 128,
) -> float:
    """Mean epsilon-MSE of the UNet on ``latents`` over ``draws`` seeded (t, noise) draws per latent.

    The draws depend only on ``seed`` and the latents' shape, so two UNets scored with the same seed see
    exactly the same noisy inputs (a paired comparison).
    """
    states, rows = caption_states(bundle, captions)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(draws):
        draw = draw_noise(latents, generator)
        for i in range(0, len(latents), batch_size):
            part = NoiseDraw(draw.timesteps[i : i + batch_size], draw.noise[i : i + batch_size])
            x = latents[i : i + batch_size]
            errors = denoising_errors(bundle.unet, bundle.noise_scheduler, x, states[rows[i : i + batch_size]], part)
            total += float(per_sample_loss(errors).sum())
            count += len(x)
    return total / count


__all__ = ["caption_states", "denoising_loss", "train_unet"]
