"""A small CNN classifier of 32 px images whose penultimate layer serves as a *learned feature space* for
Fréchet distance / KID, when the Inception weights of real FID are not at hand (an offline box).

The demo trains one on digit images (:mod:`library.demo.digit_classifier`) and evaluation reads it back with
``--digit_feature_weights``: the network, its file format and its loader live here, in evaluation, so that
evaluation (and its worker processes) can use any such file without importing the demo. The distances it gives
are comparable only with each other (same network file, same image count), never with published FID values:
they are always labelled as proxy metrics.

Network (input (N, 3, 32, 32) in [-1, 1], the layout every smp-lora image loader produces):
``[conv3x3 -> ReLU -> maxpool2] x 3`` with 16 / 32 / 64 channels (32 -> 16 -> 8 -> 4 px), then
``Linear(64*4*4 -> 64)`` — the **feature layer** — then ReLU, dropout and ``Linear(64 -> 10)``.
:meth:`SmallCNN.features` returns the feature layer's output *before* the ReLU: the classifier sees a function
of it, so it carries the same information, and unlike post-ReLU activations it has no dead (always-zero)
dimensions that would make the feature covariance singular. They are standardised per dimension with the
training images' mean and std (stored in the file), so KID's cubic kernel sees O(1) values and the proxy FD is
in units of feature standard deviations.

The weights are stored as safetensors with the format name, the architecture and what training recorded (e.g.
the held-out accuracy) in the metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from library.errors import DataError, ModelError
from library.runtime import eval_mode

FORMAT_NAME = "smp-lora-digit-features"  # the file format's name since its first (digit) use: files carry it
FORMAT_VERSION = "1"
IMAGE_SIZE = 32
NUM_CLASSES = 10
FEATURE_DIM = 64


class SmallCNN(nn.Module):
    """Small CNN classifier of 32 px images; :meth:`features` gives the learned features (see module docstring)."""

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
            raise DataError(f"small-CNN images must be shaped (N, 3, H, W) (or N, 1, H, W), "
                            f"got {tuple(images.shape)}")
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                                   align_corners=False)
        return images

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature layer's output before standardisation (what the statistics of :meth:`features` are of)."""
        x = self.prepare(images)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.feature(x.flatten(1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 32, 32) images in [-1, 1] -> (N, ``feature_dim``) penultimate features.

        The feature layer's pre-ReLU output, standardised per dimension with the training set's statistics
        (a fixed affine map: it changes the units of the proxy FD, not what it can tell apart).
        """
        return (self.raw_features(images) - self.feature_mean) / self.feature_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.classifier(self.dropout(F.relu(self.raw_features(images))))


@torch.no_grad()
def small_cnn_features(net: SmallCNN, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of many images in eval mode, batch by batch: (N, D) float32."""
    with eval_mode(net):
        parts = [net.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, net.num_features)


def save_small_cnn(net: SmallCNN, path: str | Path) -> Path:
    """Write the weights as safetensors; metadata holds the format, architecture and ``net.metadata``."""

    from library.fileio import write_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = dict(net.metadata)
    metadata.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": json.dumps(net.config)})
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    write_safetensors(path, tensors, metadata)
    return path


def load_small_cnn(path: str | Path) -> SmallCNN:
    """Load a network written by :func:`save_small_cnn` (eval mode, gradients off).

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
        net = SmallCNN(width=config["width"], feature_dim=config["feature_dim"],
                              num_classes=config["num_classes"])
        net.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"digit feature network {path} does not match its recorded architecture: {exc}") from None
    net.metadata = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "config")}
    net.eval()
    net.requires_grad_(False)
    return net


__all__ = [
    "FEATURE_DIM",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SmallCNN",
    "load_small_cnn",
    "save_small_cnn",
    "small_cnn_features",
]
