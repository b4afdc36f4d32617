"""The feature extractors of the sample-quality metrics, registered by their ``--quality_features`` name.

An extractor maps images [N, 3, R, R] in [-1, 1] to one or more feature sets (by key), each reported as a
Fréchet distance and, optionally, a KID under the names the extractor gives. Registered here:

* ``digits`` (``--digit_feature_weights``): the learned features of a small CNN classifier
  (:mod:`library.eval.small_cnn`; the demo trains one on digits), reported as ``proxy_fd_digits`` /
  ``proxy_kid_digits``, a *learned-feature Fréchet distance*, never to be called or compared with FID.
* ``inception`` (``--inception_weights``): the FID Inception-v3 (:mod:`library.eval.fid_inception`).
  ``fid_2048`` / ``kid_2048`` are the standard pool3 FID / KID; ``fid_768`` (Mixed_6e pooled), ``fid_192`` and
  ``fid_64`` are pytorch-fid's ``--dims`` variants — the paper's 0.2-2.1 "FID" most likely used one of these
  (``docs/evaluation.md``, "Which FID the paper reports"); their values are NOT comparable with FID-2048 or with each other.

**Adding an extractor**: a loader ``(weights path, device) -> FeatureExtractor``, one :func:`register_extractor`
call below, and an :class:`~library.eval.config.EvalConfig` field for its weight file (``weights_option``).
Registration happens here, in evaluation, not in a caller: evaluation runs in spawned worker processes, which
import only this module, never a caller's. This module imports neither torch nor the networks at import time:
the config reads the registered names (for ``--help``), and a network is imported when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    import numpy as np
    import torch

    from library.eval.config import EvalConfig


@dataclass
class FeatureExtractor:
    """A named image -> features map; ``metrics`` maps each feature key to its (Fréchet name, KID name or None)."""

    name: str
    description: str
    extract: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # images [N, 3, R, R] in [-1, 1] on device
    metrics: dict[str, tuple[str, str | None]]
    batch_size: int = 32
    # A classifier among the extractors gives the conditional accuracy: the share of samples it reads as the class
    # their prompt names. ``classify``: images -> class indices [N]; ``label_of``: prompt -> its class, or None
    # for a prompt that names no single class (left out of the accuracy).
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None
    label_of: Callable[[str], int | None] | None = None


@dataclass(frozen=True)
class ExtractorEntry:
    """A registered extractor: its name, the config field of its weight file, its loader and its report labels."""

    name: str
    weights_option: str  # the EvalConfig field holding the weight file
    load: Callable[[str | Path, torch.device], FeatureExtractor]  # a missing or foreign file: one ModelError line
    notes: Mapping[str, str]  # metric name -> what it is, for the report (proxy metrics say so)


EXTRACTORS: dict[str, ExtractorEntry] = {}


def register_extractor(entry: ExtractorEntry) -> None:
    """Make ``entry`` available as ``--quality_features <entry.name>``."""
    if entry.name in EXTRACTORS:
        raise ValueError(f"feature extractor {entry.name!r} is registered twice")
    EXTRACTORS[entry.name] = entry


def with_weights(config: Any, entries: Iterable[ExtractorEntry]) -> list[ExtractorEntry]:
    """Those of ``entries`` whose weight file the (eval) ``config`` gives."""
    return [entry for entry in entries if getattr(config, entry.weights_option)]


def weights_flags(entries: Iterable[ExtractorEntry]) -> str:
    """How a message names the flags that give ``entries`` their weights: ``--x_weights (x) or ...``."""
    return " or ".join(f"--{entry.weights_option} ({entry.name})" for entry in entries)


def small_cnn_extractor(name: str, source: str, path: str | Path, device: torch.device,
                        label_of: Callable[[str], int | None] | None = None) -> FeatureExtractor:
    """The learned features of a :class:`~library.eval.small_cnn.SmallCNN` file: PROXY FD / KID named after ``name``."""
    from library.eval.small_cnn import load_small_cnn  # noqa: PLC0415 - torch only when used

    net = load_small_cnn(path).to(device)  # ModelError (one line) for a missing or foreign file
    return FeatureExtractor(
        name, f"PROXY metric: features of {source} ({path}); a learned-feature Fréchet distance / KID, not FID",
        lambda images: {name: net.features(images.float()).float()},  # resizes to 32
        {name: (f"proxy_fd_{name}", f"proxy_kid_{name}")}, batch_size=64,
        classify=lambda images: net(images.float()).argmax(1), label_of=label_of)


def digits_extractor(path: str | Path, device: torch.device) -> FeatureExtractor:
    """The demo's digit classifier: proxy FD / KID, and the conditional accuracy on digit prompts."""
    from library.data.digit_captions import digit_label_or_none  # noqa: PLC0415

    return small_cnn_extractor("digits", "the demo's digit classifier", path, device, label_of=digit_label_or_none)


def inception_extractor(path: str | Path, device: torch.device) -> FeatureExtractor:
    """The FID Inception-v3 of ``path``: FID / KID at pool3 (2048-d) and pytorch-fid's smaller ``--dims``."""
    from library.eval.fid_inception import INCEPTION_DIMS, load_fid_inception  # noqa: PLC0415

    model = load_fid_inception(path).to(device)
    return FeatureExtractor(
        "inception", f"FID Inception-v3 ({path}), pytorch-fid conventions: bilinear resize to 299, inputs in [-1, 1]",
        lambda images: model(images.float()),
        {dims: (f"fid_{dims}", f"kid_{dims}" if dims in ("2048", "768") else None) for dims in INCEPTION_DIMS},
        batch_size=16)


register_extractor(ExtractorEntry(
    "digits", "digit_feature_weights", digits_extractor,
    {"proxy_fd_digits": "PROXY: Fréchet distance of the demo's digit-classifier features (not FID)",
     "proxy_kid_digits": "PROXY: KID of the demo's digit-classifier features (not Inception KID)",
     "conditional_accuracy": "share of the samples the digit classifier reads as the digit their prompt names "
                             "(prompts naming one digit only)",
     "utility_retained": "U = (m - m_base) / (m_ref - m_base) with m the conditional accuracy and ref the plain "
                         "fine-tune (--utility_reference): 1 = all of the plain fine-tune's gain kept, 0 = none"}))
register_extractor(ExtractorEntry(
    "inception", "inception_weights", inception_extractor,
    {"fid_2048": "FID, Inception-v3 pool3 (2048-d), pytorch-fid conventions",
     "kid_2048": "KID, Inception-v3 pool3 (2048-d), polynomial kernel of degree 3",
     "fid_768": "FID on Inception Mixed_6e pooled features (768-d, pytorch-fid --dims 768); not comparable with "
                "fid_2048",
     "kid_768": "KID on the 768-d Inception features",
     "fid_192": "FID on 192-d Inception features (pytorch-fid --dims 192)",
     "fid_64": "FID on 64-d Inception features (pytorch-fid --dims 64)"}))


def extractor_notes() -> dict[str, str]:
    """The report label of every metric of every registered extractor, in registration order."""
    return {metric: note for entry in EXTRACTORS.values() for metric, note in entry.notes.items()}


def load_extractors(config: EvalConfig, device: torch.device) -> list[FeatureExtractor]:
    """The extractors ``--quality`` asked for (default: every one whose weights are given), loaded; called
    before any long computation so that bad weights fail fast."""
    names = list(config.quality_features) or [entry.name for entry in with_weights(config, EXTRACTORS.values())]
    extractors = []
    for name in names:
        entry = EXTRACTORS[name]
        weights = getattr(config, entry.weights_option)
        assert weights is not None  # EvalConfig.validate
        extractors.append(entry.load(weights, device))
    return extractors


def extract_features(extractor: FeatureExtractor, images: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """Features of images [N, 3, R, R] in [-1, 1], batched; float64 numpy arrays by feature key."""
    import torch  # noqa: PLC0415 - see the module docstring

    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, images.shape[0], extractor.batch_size):
            batch = extractor.extract(images[start:start + extractor.batch_size].to(device))
            for key, value in batch.items():
                parts.setdefault(key, []).append(value.detach().cpu().double())
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


__all__ = ["EXTRACTORS", "ExtractorEntry", "FeatureExtractor", "extract_features", "extractor_notes",
           "digits_extractor", "inception_extractor", "load_extractors", "register_extractor", "small_cnn_extractor",
           "weights_flags", "with_weights"]
