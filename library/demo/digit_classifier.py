"""A small digit classifier whose penultimate layer serves as a *proxy* FID feature space (offline demo).

Real FID needs InceptionV3 weights, which cannot be downloaded on an offline box. For the digits demo we
train our own feature extractor instead: a three-block CNN classifying the 10 digits, trained only on the
split's ``pretrain`` images (disjoint from every member / non-member image). Its 64-d penultimate features
give a **learned-feature Fréchet distance / KID ("proxy FID", "proxy KID")** between generated and real
digits. Those numbers are comparable only with each other (same network file, same image count), never
with published FID values: always label them as proxy metrics.

Network (input (N, 3, 32, 32) in [-1, 1], the layout every smp-lora image loader produces):
``[conv3x3 -> ReLU -> maxpool2] x 3`` with 16 / 32 / 64 channels (32 -> 16 -> 8 -> 4 px), then
``Linear(64*4*4 -> 64)`` — the **feature layer** — then ReLU, dropout and ``Linear(64 -> 10)``.
:meth:`DigitFeatureNet.features` returns the feature layer's output *before* the ReLU: the classifier
sees a function of it, so it carries the same information, and unlike post-ReLU activations it has no
dead (always-zero) dimensions that would make the feature covariance singular. They are standardised per
dimension with the training images' mean and std (stored in the file), so KID's cubic kernel sees O(1)
values and the proxy FD is in units of feature standard deviations.

Training augments with random shifts of up to 2 px (generated digits are not centred exactly like the
data) and holds out a seeded fraction of the images to report accuracy. The weights are stored as
safetensors with the architecture and the held-out accuracy in the metadata.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from library.demo.digits import DIGIT_NAMES
from library.errors import ConfigError, DataError, ModelError
from library.runtime import echo, torch_threads

FORMAT_NAME = "smp-lora-digit-features"
FORMAT_VERSION = "1"
IMAGE_SIZE = 32
NUM_CLASSES = 10
FEATURE_DIM = 64


DEFAULT_EPOCHS = 15
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 2e-3
DEFAULT_HOLDOUT = 0.15
_MAX_SHIFT = 2  # pixels of random translation used as augmentation


# ------------------------------------------------------------------------------------------ captions


_WORD = re.compile(r"[a-z]+|[0-9]+")


def digit_label(caption: str) -> int:
    """The digit a caption names: ``"a handwritten digit seven"`` -> 7 (also accepts a numeral, "digit 7").

    Exactly one digit must be named (repeats of the same digit are fine). A caption naming none, or two
    different digits, raises :class:`DataError`.
    """
    found = set()
    for word in _WORD.findall(str(caption).lower()):
        if word in DIGIT_NAMES:
            found.add(DIGIT_NAMES.index(word))
        elif word.isdigit() and len(word) == 1:
            found.add(int(word))
    if len(found) == 1:
        return found.pop()
    if not found:
        raise DataError(
            f"caption {caption!r} names no digit; digit captions must contain one of "
            f"{', '.join(DIGIT_NAMES)} (e.g. 'a handwritten digit seven')"
        )
    raise DataError(f"caption {caption!r} names several digits ({sorted(found)}); a digit caption must name one")


def load_digit_images(records: Sequence[Any], resolution: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (N, 3, R, R) in [-1, 1] and labels (N,) of records with ``.path`` and a digit ``.caption``."""
    from library.data.dataset import load_image

    if not records:
        raise DataError("no digit images given: the image set is empty")
    labels = torch.tensor([digit_label(r.caption) for r in records], dtype=torch.long)
    return torch.stack([load_image(r.path, resolution) for r in records]), labels


# ------------------------------------------------------------------------------------------ network


class DigitFeatureNet(nn.Module):
    """Small CNN digit classifier; :meth:`features` gives the proxy-FID features (see module docstring)."""

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.config = {"width": int(width), "feature_dim": int(feature_dim), "num_classes": int(num_classes),
                       "image_size": IMAGE_SIZE}
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.feature = nn.Linear(4 * width * (IMAGE_SIZE // 8) ** 2, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(feature_dim, num_classes)
        # Per-dimension mean / std of the training images' features, set after training: features are returned
        # standardised, so KID's polynomial kernel (x.y/d + 1)^3 sees O(1) values, as with Inception features.
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        # torchmetrics' FID/KID accept a custom ``feature=`` module that declares its output width.
        self.num_features = int(feature_dim)
        self.metadata: dict[str, str] = {}

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Check and adapt a batch: grey -> RGB, other sizes resized (bilinear, antialiased) to 32 px."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"digit images must be shaped (N, 3, H, W) (or N, 1, H, W), got {tuple(images.shape)}")
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images

    def _trunk(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.feature(x.flatten(1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) images in [-1, 1] -> (N, ``feature_dim``) penultimate features.

        The feature layer's pre-ReLU output, standardised per dimension with the training set's statistics
        (a fixed affine map: it changes the units of the proxy FD, not what it can tell apart).
        """
        return (self._trunk(images) - self.feature_mean) / self.feature_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.classifier(self.dropout(F.relu(self._trunk(images))))


@torch.no_grad()
def extract_features(net: DigitFeatureNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of many images in eval mode, batch by batch: (N, D) float32."""
    was_training = net.training
    net.eval()
    try:
        parts = [net.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, net.num_features)


@torch.no_grad()
def accuracy(net: DigitFeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Fraction of ``images`` classified as ``labels`` (eval mode)."""
    if len(images) == 0:
        return float("nan")
    was_training = net.training
    net.eval()
    try:
        correct = sum(
            int((net(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
            for i in range(0, len(images), batch_size)
        )
    finally:
        net.train(was_training)
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
    from library.data.dataset import load_image

    return torch.stack([load_image(p, IMAGE_SIZE) for p in images])


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
        raise DataError(f"{len(pixels)} images are too few to train a digit classifier (need at least 20)")

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pixels), generator=generator)
    held, train = order[:num_heldout], order[num_heldout:]
    x_train, y_train = pixels[train], targets[train]
    started = time.perf_counter()
    with torch_threads(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights and dropout masks; fork_rng keeps the caller's RNG intact
        net = DigitFeatureNet()
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
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
        with torch.no_grad():
            raw = torch.cat([net._trunk(x_train[i : i + 256]) for i in range(0, len(x_train), 256)])
            net.feature_mean.copy_(raw.mean(0))
            net.feature_std.copy_(raw.std(0).clamp_min(1e-6))
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


# ------------------------------------------------------------------------------------------ files


def save_digit_feature_net(net: DigitFeatureNet, path: str | Path) -> Path:
    """Write the weights as safetensors; metadata holds the format, architecture and ``net.metadata``."""
    from safetensors.torch import save_file

    from library.fileio import atomic_write_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(net.metadata)
    metadata.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": json.dumps(net.config)})
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_write_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_digit_feature_net(path: str | Path) -> DigitFeatureNet:
    """Load a network written by :func:`save_digit_feature_net` (eval mode, gradients off).

    ``net.metadata`` holds what was recorded at training time (e.g. ``heldout_accuracy``).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"digit feature network {path} does not exist: train it with scripts/train_digit_features.py"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise ModelError(f"cannot read digit feature network {path}: {exc}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ModelError(f"{path} is not a digit feature network (no format {FORMAT_NAME!r} in its metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} has digit-feature format version {metadata.get('format_version')!r}; this smp-lora reads "
            f"{FORMAT_VERSION}: re-train it with scripts/train_digit_features.py"
        )
    try:
        config = json.loads(metadata["config"])
        net = DigitFeatureNet(width=config["width"], feature_dim=config["feature_dim"],
                              num_classes=config["num_classes"])
        net.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"digit feature network {path} does not match its recorded architecture: {exc}") from None
    net.metadata = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "config")}
    net.eval()
    net.requires_grad_(False)
    return net


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
