"""The training-loop pieces shared by the VAE and UNet pre-training of the demo's base model.

Seeded index batches (every image once per epoch), the warm-up + cosine learning-rate schedule, progress lines
and the first/last-10 % loss windows recorded in ``pretrain.json``; plus loading the images as one pixel tensor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from library.data.images import load_image
from library.errors import DataError

IMAGE_SIZE = 32  # the tiny stack's resolution: 32 px images <-> 4x8x8 latents


class Captioned(Protocol):
    """An image record: a ``path`` and its ``caption`` (e.g. :class:`library.data.dataset.ImageCaption`)."""

    path: Any
    caption: str


def load_pixels(records: Sequence[Captioned], resolution: int = IMAGE_SIZE) -> torch.Tensor:
    """All images of ``records`` as one float32 tensor (N, 3, R, R) in [-1, 1] (fits in memory at 32 px)."""
    if not records:
        raise DataError("no images to pre-train on: the pretrain set is empty")
    return torch.stack([load_image(r.path, resolution) for r in records])


def index_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn epoch by epoch from seeded permutations (every image once per epoch)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            # Top up with a fresh permutation; a short tail is carried over, never dropped.
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def warmup_cosine_lr(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``base``."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Progress:
    """Prints about ``lines`` progress lines with the running mean loss since the last line."""

    def __init__(self, name: str, total: int, log: Callable[[str], object], lines: int = 10) -> None:
        self.name, self.total, self.log = name, total, log
        self.every = max(1, total // lines)
        self.start = time.perf_counter()
        self._sum, self._count = 0.0, 0

    def update(self, step: int, loss: float) -> None:
        self._sum += loss
        self._count += 1
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            self.log(
                f"[pretrain {self.name}] step {step + 1}/{self.total}  loss {self._sum / self._count:.4f}  "
                f"{(step + 1) / max(elapsed, 1e-9):.1f} it/s  {elapsed:.0f}s"
            )
            self._sum, self._count = 0.0, 0


def window_means(losses: Sequence[float]) -> tuple[float, float]:
    """Mean loss over the first and the last 10% of steps (at least one step each)."""
    if not losses:
        return float("nan"), float("nan")
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


__all__ = ["IMAGE_SIZE", "Captioned", "Progress", "index_batches", "load_pixels", "warmup_cosine_lr", "window_means"]
