"""A small digit classifier whose penultimate layer serves as a *proxy* FID feature space (offline demo).

Real FID needs InceptionV3 weights, which cannot be downloaded on an offline box. For the digits demo we
train our own feature extractor instead: a three-block CNN classifying the 10 digits, trained only on the
split's ``pretrain`` images (disjoint from every member / non-member image). Its 64-d penultimate features
give a **learned-feature Fréchet distance / KID ("proxy FID", "proxy KID")** between generated and real
digits. Those numbers are comparable only with each other (same network file, same image count), never
with published FID values: always label them as proxy metrics.

The network (:class:`~library.eval.small_cnn.SmallCNN`: three conv blocks, a 64-d feature layer, 10 classes),
its safetensors format and its loader live in :mod:`library.eval.small_cnn`, so that evaluation reads the file
without importing the demo; this module holds what is specific to digits: labels from captions, and training.
``DigitFeatureNet``, ``save_digit_feature_net``, ``load_digit_feature_net`` and ``extract_features`` are the
demo's names for that network and its functions.

Training augments with random shifts of up to 2 px (generated digits are not centred exactly like the
data) and holds out a seeded fraction of the images to report accuracy. The weights are stored as
safetensors with the architecture and the held-out accuracy in the metadata.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from library.data.digit_captions import DIGIT_NAMES, digit_label
from library.errors import ConfigError, DataError
from library.eval.small_cnn import (
    FEATURE_DIM,
    IMAGE_SIZE,
    NUM_CLASSES,
    SmallCNN,
    load_small_cnn,
    save_small_cnn,
    small_cnn_features,
)
from library.runtime import echo, eval_mode, torch_threads

# The demo's names for the network of library.eval.small_cnn, trained here on digits.
DigitFeatureNet = SmallCNN
save_digit_feature_net = save_small_cnn
load_digit_feature_net = load_small_cnn
extract_features = small_cnn_features

DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_HOLDOUT = 0.15
WARMUP_FRACTION = 0.2  # of the one-cycle schedule
_MAX_SHIFT = 2  # pixels of random translation used as augmentation


def load_digit_images(records: Sequence[Any], resolution: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, R, R) in [-1, 1] and labels (N,) of records with ``.path`` and a digit ``.caption``."""
    from library.data.images import load_image

    if not records:
        raise DataError("no digit images given: the image set is empty")
    labels = torch.tensor([digit_label(r.caption) for r in records], dtype=torch.long)
    return torch.stack([load_image(r.path, resolution) for r in records]), labels


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def accuracy(net: DigitFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` classified as ``labels`` (eval mode)."""
    if len(images) == 0:
        return float("nan")
    with eval_mode(net):
        correct = sum(
            int((net(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, len(images), batch_size)
        )
    return correct / len(images)


# ------------------------------------------------------------------------------------------ training


@dataclass
class DigitTrainResult:
    """A trained network and how well it does on the images it did not train on."""

    net: DigitFeatureNet
    heldout_accuracy: float
    train_accuracy: float
    num_train: int
    num_heldout: int
    seconds: float


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``_MAX_SHIFT`` px, filling with the background value -1 (black)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (_MAX_SHIFT,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * _MAX_SHIFT + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _as_pixels(images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return DigitFeatureNet.prepare(images)
    from library.data.images import load_image

    return torch.stack([load_image(p, IMAGE_SIZE) for p in images])


def _checked_inputs(images: torch.Tensor | Sequence[Any], labels: torch.Tensor | Sequence[int], epochs: int,
                    batch_size: int, holdout_fraction: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pixels, labels, number held out) after checking the data and the settings (one error line each)."""
    pixels = _as_pixels(images)
    targets = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
    if len(pixels) != len(targets):
        raise DataError(f"{len(pixels)} images but {len(targets)} labels")
    if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= NUM_CLASSES):
        raise DataError(f"digit labels must be 0..9, got values from {int(targets.min())} to {int(targets.max())}")
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    num_heldout = max(1, int(round(len(pixels) * holdout_fraction)))
    if len(pixels) - num_heldout < 10:
        raise DataError(f"{len(pixels)} images are too few to train a digit classifier: {len(pixels) - num_heldout} "
                        f"left after holding out {num_heldout} (need at least 10 to train on)")
    return pixels, targets, num_heldout


@torch.no_grad()
def _set_feature_statistics(net: DigitFeatureNet, x_train: torch.Tensor) -> None:
    """Store the per-dimension mean / std of the training images' raw features, which :meth:`features` removes."""
    raw = torch.cat([net.raw_features(x_train[i : i + 256]) for i in range(0, len(x_train), 256)])
    net.feature_mean.copy_(raw.mean(0))
    net.feature_std.copy_(raw.std(0).clamp_min(1e-6))


def train_digit_feature_net(
    images: torch.Tensor | Sequence[Any],
    labels: torch.Tensor | Sequence[int],
    *,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    out_path: str | Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    holdout_fraction: float = DEFAULT_HOLDOUT,
    threads: int | None = None,
    log: Callable[[str], object] = echo,
) -> DigitTrainResult:
    """Train a :class:`DigitFeatureNet` on ``images`` (tensor (N, 3, 32, 32) in [-1, 1], or image paths).

    A seeded ``holdout_fraction`` of the images is kept out of training and used to report accuracy. With
    ``out_path`` the weights are saved as safetensors (metadata: architecture, accuracy, sizes, seed).
    Deterministic for a given seed, data and thread count.
    """
    pixels, targets, num_heldout = _checked_inputs(images, labels, epochs, batch_size, holdout_fraction)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pixels), generator=generator)
    held, train = order[:num_heldout], order[num_heldout:]
    x_train, y_train = pixels[train], targets[train]
    started = time.perf_counter()
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights and dropout masks; fork_rng keeps the caller's RNG intact
        net = DigitFeatureNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        total_steps = epochs * math.ceil(len(x_train) / batch_size)
        # OneCycleLR divides by (pct_start * total_steps - 1): a warm-up of exactly one step (5 steps in all at
        # 0.2) would divide by zero, so that one case warms up over two steps.
        warmup = WARMUP_FRACTION if WARMUP_FRACTION * total_steps != 1 else 2 / total_steps
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=warmup)
        net.train()
        for epoch in range(epochs):
            perm = torch.randperm(len(x_train), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(perm), batch_size):
                index = perm[start : start + batch_size]
                logits = net(_random_shift(x_train[index], generator))
                loss = F.cross_entropy(logits, y_train[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(index)
                count += len(index)
            if (epoch + 1) % max(1, epochs // 5) == 0 or epoch + 1 == epochs:
                log(f"[digit-features] epoch {epoch + 1}/{epochs}  loss {total / count:.4f}  "
                    f"{time.perf_counter() - started:.0f}s")
        net.eval()
        net.requires_grad_(False)
        _set_feature_statistics(net, x_train)
        held_acc = accuracy(net, pixels[held], targets[held])
        train_acc = accuracy(net, x_train, y_train)
    seconds = time.perf_counter() - started
    result = DigitTrainResult(net, held_acc, train_acc, len(train), num_heldout, seconds)
    net.metadata = {
        "heldout_accuracy": f"{held_acc:.6f}",
        "train_accuracy": f"{train_acc:.6f}",
        "num_train": str(len(train)),
        "num_heldout": str(num_heldout),
        "seed": str(seed),
        "epochs": str(epochs),
    }
    log(f"[digit-features] held-out accuracy {held_acc:.4f} on {num_heldout} images "
        f"(train {train_acc:.4f} on {len(train)}), {seconds:.1f}s")
    if out_path is not None:
        save_digit_feature_net(net, out_path)
    return result


def train_digit_feature_net_on_records(
    records: Sequence[Any], *, out_path: str | Path | None = None, seed: int = 0, **kwargs: Any
) -> DigitTrainResult:
    """:func:`train_digit_feature_net` on captioned records (``.path``, digit ``.caption``), e.g. a split's
    ``pretrain`` list; labels come from the captions (:func:`digit_label`)."""
    pixels, labels = load_digit_images(records)
    return train_digit_feature_net(pixels, labels, seed=seed, out_path=out_path, **kwargs)


__all__ = [
    "DIGIT_NAMES",
    "FEATURE_DIM",
    "DigitFeatureNet",
    "DigitTrainResult",
    "accuracy",
    "digit_label",
    "extract_features",
    "load_digit_feature_net",
    "load_digit_images",
    "save_digit_feature_net",
    "train_digit_feature_net",
    "train_digit_feature_net_on_records",
]
