"""Utility of the evaluated models: held-out denoising loss (always) and sample quality (``--quality``).

**Held-out loss** (no weights needed, no extra UNet pass): the mean per-sample denoising loss (Eq. 1, the MSE of
the noise prediction) that the feature engine already computed for the attacks, over the evaluation
``--timesteps`` x ``--num_noise_draws`` (the same noise for every model), averaged over D^m_te
(``loss_member_test``) and D^nm_te (``loss_nonmember_test``). ``loss_gap`` = non-member minus member: a LoRA
that memorises its training set widens it. These are losses at the small evaluation timesteps, not the
training loss over uniform t, so compare them between models of one report only.

**Sample quality** (``--quality``): every model (``base`` and each LoRA, applied exactly as for the attacks)
generates ``--quality_num_images`` images from the D_te captions (member_test then nonmember_test, cycled;
image ``i`` uses seed ``quality_seed + i`` for every model, so models are compared on identical prompts and
initial noise). The first :data:`GRID_MAX_IMAGES` are tiled into ``samples_<model>.png``. The generated set is
compared with the REAL images of ``--quality_reference`` (default ``members`` = D_tr, the LoRA's training
images, as the paper compares with "the training images"; ``nonmembers`` or ``test`` = D_te are the
alternatives), loaded exactly as for training (resize short side + centre crop to ``--resolution``):

* ``digits`` (``--digit_feature_weights``): features of the small digit classifier of
  :mod:`library.demo.digit_classifier`; reported as ``proxy_fd_digits`` / ``proxy_kid_digits``, a *learned-feature
  Fréchet distance*, never to be called or compared with FID.
* ``inception`` (``--inception_weights``): the FID Inception-v3 (TF 2015-12-05 graph weights, 1008 classes) in
  pytorch-fid's conventions (bilinear resize to 299, no antialiasing, inputs in [-1, 1]), defined below without
  torchvision. ``fid_2048`` / ``kid_2048`` are the standard pool3 FID / KID; ``fid_768`` (Mixed_6e pooled),
  ``fid_192`` and ``fid_64`` are pytorch-fid's ``--dims`` variants — the paper's 0.2-2.1 "FID" most likely used
  one of these (``docs/mia-anchors.md`` §6); their values are NOT comparable with FID-2048 or with each other.

The Inception definition was checked against torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` (same state
dict keys; identical 64/192/768/2048 features on 299 px inputs with shared random weights). torch-fidelity itself
cannot serve here: its package ``__init__`` imports torchvision, which would replace the CPU torch.

Fréchet distances use :func:`library.eval.metrics.frechet_distance_from_features` (exact, without ``sqrtm``). KID uses the largest subset size the sets allow (min(1000, n_real, n_generated)). Every
metric also gets a real-vs-real floor (the reference set split into two halves, KID subsets of half size), the
value "as good as it gets" at about this sample size: Fréchet distances on a few hundred images are strongly
biased upward, KID is not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from library.errors import ConfigError, ModelError
from library.eval import metrics
from library.runtime import PRECISION_DTYPES

if TYPE_CHECKING:
    from library.eval.config import EvalConfig
    from library.eval.features import ModelFeatures
    from library.eval.run import ModelSpec
    from library.workers import WorkerPool

QUALITY_FEATURES = ("digits", "inception")
QUALITY_REFERENCES = ("members", "nonmembers", "test")
REAL_CHUNK = 64  # reference images loaded at once
GRID_MAX_IMAGES = 16  # a 64-image grid of 512 px samples would be a 4096 px, ~20 MB PNG
INCEPTION_DIMS = ("2048", "768", "192", "64")
INCEPTION_SIZE = 299
INCEPTION_HINT = (
    "give the FID Inception-v3 weights as a local file: 'pt_inception-2015-12-05-6726825d.pth' (pytorch-fid) or "
    "'weights-inception-2015-12-05-6726825d.pth' (torch-fidelity), copied from a machine that can download them"
)
METRIC_NOTES = {
    "loss_member_test": "mean per-sample denoising loss on D^m_te at the evaluation timesteps (same noise for "
                        "every model)",
    "loss_nonmember_test": "the same on D^nm_te (held-out images the LoRA never saw)",
    "loss_gap": "loss_nonmember_test - loss_member_test (> 0: the model fits its members better)",
    "proxy_fd_digits": "PROXY: Fréchet distance of the demo's digit-classifier features (not FID)",
    "proxy_kid_digits": "PROXY: KID of the demo's digit-classifier features (not Inception KID)",
    "fid_2048": "FID, Inception-v3 pool3 (2048-d), pytorch-fid conventions",
    "kid_2048": "KID, Inception-v3 pool3 (2048-d), polynomial kernel of degree 3",
    "fid_768": "FID on Inception Mixed_6e pooled features (768-d, pytorch-fid --dims 768); not comparable with "
               "fid_2048",
    "kid_768": "KID on the 768-d Inception features",
    "fid_192": "FID on 192-d Inception features (pytorch-fid --dims 192)",
    "fid_64": "FID on 64-d Inception features (pytorch-fid --dims 64)",
}


# ================================================================================================ held-out loss


def heldout_losses(features: Mapping[str, "ModelFeatures"], splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: {loss_member_test, loss_nonmember_test, loss_gap}}`` from the attack features ``[N, K, M]``."""
    split_array = np.asarray(splits)
    out: dict[str, dict[str, Any]] = {}
    for name, feats in features.items():
        per_sample = feats.losses.double().mean(dim=(1, 2)).numpy()
        member = float(per_sample[split_array == "member_test"].mean())
        nonmember = float(per_sample[split_array == "nonmember_test"].mean())
        out[name] = {"loss_member_test": member, "loss_nonmember_test": nonmember, "loss_gap": nonmember - member}
    return out


# ================================================================================================ FID Inception-v3


class _ConvBN(nn.Module):
    """Convolution without bias, batch norm (TF's eps 1e-3), ReLU; submodule names match the FID weight files."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # The TF graph averages over the valid pixels only at the border (torchvision's blocks count the padding).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1 = _ConvBN(cin, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class _ReductionA(nn.Module):
    """35x35 -> 17x17 grid reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedB(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1x7 and a 7x1 convolution
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1 = _ConvBN(cin, mid, 1)
        self.branch7x7_2 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7_3 = _ConvBN(mid, 192, col[0], padding=col[1])
        self.branch7x7dbl_1 = _ConvBN(cin, mid, 1)
        self.branch7x7dbl_2 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_3 = _ConvBN(mid, mid, row[0], padding=row[1])
        self.branch7x7dbl_4 = _ConvBN(mid, mid, col[0], padding=col[1])
        self.branch7x7dbl_5 = _ConvBN(mid, 192, row[0], padding=row[1])
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for i in range(1, 6):
            double = getattr(self, f"branch7x7dbl_{i}")(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_avg3(x)),
        ], 1)


class _ReductionB(nn.Module):
    """17x17 -> 8x8 grid reduction."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBN(cin, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; the last one of the FID graph max-pools its pooled branch."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the TF graph FID was defined with (1008 classes); returns pooled features by width.

    ``forward(x)`` takes images in [-1, 1] of any size, resizes them to 299x299 (bilinear, pytorch-fid's
    convention) and returns ``{"64", "192", "768", "2048"}`` -> ``[N, d]`` float32 spatial means of the stem's
    two max-pool outputs, of Mixed_6e and of Mixed_7c (pool3).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReductionA(288)
        self.Mixed_6b = _MixedB(768, 128)
        self.Mixed_6c = _MixedB(768, 160)
        self.Mixed_6d = _MixedB(768, 160)
        self.Mixed_6e = _MixedB(768, 192)
        self.Mixed_7a = _ReductionB(768)
        self.Mixed_7b = _MixedC(1280, max_pool=False)
        self.Mixed_7c = _MixedC(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; kept so the weight files load strictly

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        out: dict[str, torch.Tensor] = {}
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        out["64"] = x.mean((2, 3))
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        out["192"] = x.mean((2, 3))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(self, name)(x)
        out["768"] = x.mean((2, 3))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        out["2048"] = x.mean((2, 3))
        return {k: v.float() for k, v in out.items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth (``weights_only``: no pickled code runs) or a .safetensors file."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise ModelError(f"--inception_weights {path}: not a readable weight file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); {INCEPTION_HINT}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"--inception_weights {path}: does not hold a state dict of tensors; {INCEPTION_HINT}")
    return state


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception-v3 with the weights of ``path``; a missing/corrupt/foreign file is one ModelError line."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--inception_weights {path}: file not found; {INCEPTION_HINT} (nothing is downloaded)")
    state = _read_state_dict(path)
    model = FIDInceptionV3()
    expected = model.state_dict()
    # BatchNorm's num_batches_tracked counters play no part in eval mode; files saved without them are fine.
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else
                  f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise ModelError(f"--inception_weights {path}: not the FID Inception-v3 weights ({detail}; torchvision's "
                         f"ImageNet Inception has 1000 classes and AuxLogits and is not the FID network); "
                         f"{INCEPTION_HINT}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False)


# ================================================================================================ extractors


@dataclass
class FeatureExtractor:
    """A named image -> features map; ``metrics`` maps each feature key to its (Fréchet name, KID name or None)."""

    name: str
    description: str
    extract: Callable[[torch.Tensor], dict[str, torch.Tensor]]  # images [N, 3, R, R] in [-1, 1] on device
    metrics: dict[str, tuple[str, str | None]]
    batch_size: int = 32


def _digits_extractor(path: str | Path, device: torch.device) -> FeatureExtractor:
    from library.demo.digit_classifier import load_digit_feature_net  # noqa: PLC0415 - only with digits features

    net = load_digit_feature_net(path).to(device)  # ModelError (one line) for a missing or foreign file
    return FeatureExtractor(
        "digits", f"PROXY metric: features of the demo's digit classifier ({path}); a learned-feature Fréchet "
        "distance / KID, not FID", lambda images: {"digits": net.features(images.float()).float()},  # resizes to 32
        {"digits": ("proxy_fd_digits", "proxy_kid_digits")}, batch_size=64)


def _inception_extractor(path: str | Path, device: torch.device) -> FeatureExtractor:
    model = load_fid_inception(path).to(device)
    return FeatureExtractor(
        "inception", f"FID Inception-v3 ({path}), pytorch-fid conventions: bilinear resize to 299, inputs in [-1, 1]",
        lambda images: model(images.float()),
        {"2048": ("fid_2048", "kid_2048"), "768": ("fid_768", "kid_768"), "192": ("fid_192", None),
         "64": ("fid_64", None)}, batch_size=16)


def load_extractors(config: "EvalConfig", device: torch.device) -> list[FeatureExtractor]:
    """The extractors ``--quality`` asked for; called before any long computation so bad weights fail fast."""
    names = list(config.quality_features) or [n for n, w in (("digits", config.digit_feature_weights),
                                                              ("inception", config.inception_weights)) if w]
    extractors = []
    for name in names:
        if name == "digits":
            assert config.digit_feature_weights is not None  # EvalConfig.validate
            extractors.append(_digits_extractor(config.digit_feature_weights, device))
        elif name == "inception":
            assert config.inception_weights is not None
            extractors.append(_inception_extractor(config.inception_weights, device))
    return extractors


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, device: torch.device) -> dict[str, np.ndarray]:
    """Features of images [N, 3, R, R] in [-1, 1], batched; float64 numpy arrays by feature key."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], extractor.batch_size):
        batch = extractor.extract(images[start:start + extractor.batch_size].to(device))
        for key, value in batch.items():
            parts.setdefault(key, []).append(value.detach().cpu().double())
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


# ================================================================================================ metrics


def _kid_or_none(real: np.ndarray, fake: np.ndarray, n_subsets: int, seed: int) -> tuple[float | None, float | None]:
    if min(real.shape[0], fake.shape[0]) < 2:
        return None, None
    return metrics.kid(real, fake, n_subsets=n_subsets, seed=seed)


def feature_metrics(extractor: FeatureExtractor, real: Mapping[str, np.ndarray], fake: Mapping[str, np.ndarray],
                    n_subsets: int = 100, seed: int = 0) -> dict[str, float | None]:
    """Fréchet distance and KID (mean, ``_std``) of generated vs real features, under the extractor's names."""
    out: dict[str, float | None] = {}
    for key, (fd_name, kid_name) in extractor.metrics.items():
        out[fd_name] = metrics.frechet_distance_from_features(real[key], fake[key])
        if kid_name is not None:
            out[kid_name], out[f"{kid_name}_std"] = _kid_or_none(real[key], fake[key], n_subsets, seed)
    return out


def real_vs_real_floor(extractor: FeatureExtractor, real: Mapping[str, np.ndarray], n_subsets: int = 100,
                       seed: int = 0) -> dict[str, float | None]:
    """The same metrics between two halves of the reference set (a fixed permutation): the small-sample floor."""
    n = next(iter(real.values())).shape[0]
    if n < 4:
        return {}
    order = np.random.default_rng(seed).permutation(n)
    first, second = order[: n // 2], order[n // 2:]
    return feature_metrics(extractor, {k: v[first] for k, v in real.items()},
                           {k: v[second] for k, v in real.items()}, n_subsets, seed)


# ================================================================================================ generation


def quality_prompts(manifest: Any, n: int) -> list[str]:
    """``n`` D_te captions: member_test then nonmember_test, cycled (deterministic)."""
    captions = [e.caption for e in manifest.member_test + manifest.nonmember_test]
    return [captions[i % len(captions)] for i in range(n)]


def reference_entries(manifest: Any, reference: str) -> list[Any]:
    """The real images the samples are compared with: D_tr (``members``), ``nonmembers`` or D_te (``test``)."""
    if reference == "members":
        return manifest.members()
    if reference == "nonmembers":
        return manifest.nonmembers()
    if reference == "test":
        return manifest.test()
    raise ConfigError(f"'quality_reference' must be one of {list(QUALITY_REFERENCES)}, got {reference!r}")


def pil_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL RGB images -> [N, 3, H, W] float32 in [-1, 1] (the convention of :func:`library.data.dataset.load_image`)."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


def generate_samples(config: "EvalConfig", bundle: Any, spec: "ModelSpec", prompts: Sequence[str],
                     device: torch.device, dtype: torch.dtype) -> list[Any]:
    """PIL images of one model: the base bundle with ``spec``'s LoRA applied as for the attacks."""
    from library.eval.features import applied_lora  # noqa: PLC0415
    from library.sd.sampling import PromptSpec, build_pipeline, generate  # noqa: PLC0415

    with applied_lora(bundle, spec.lora_path, config.network_multiplier, device, dtype):
        pipe = build_pipeline(bundle, config.quality_sampler)
        return generate(pipe, [PromptSpec(p) for p in prompts], resolution=config.resolution,
                        steps=config.quality_steps, guidance_scale=config.quality_guidance_scale,
                        seed=config.quality_seed)


@dataclass
class SampleJob:
    """One model's quality images, generated in a worker process (with that process's base model)."""

    config: "EvalConfig"
    spec: "ModelSpec"
    prompts: list[str]
    device: torch.device


def generate_samples_job(job: SampleJob) -> tuple[list[Any], float]:
    """(images, seconds) of one model, in a worker process."""
    from library.eval.run import process_bundle  # noqa: PLC0415

    t0 = time.perf_counter()
    bundle = process_bundle(job.config, job.device)
    images = generate_samples(job.config, bundle, job.spec, job.prompts, job.device, PRECISION_DTYPES[job.config.mixed_precision])
    return images, time.perf_counter() - t0


def run_quality(config: "EvalConfig", specs: Sequence["ModelSpec"], manifest: Any, device: torch.device,
                extractors: Sequence[FeatureExtractor], output_dir: Path, utility: dict[str, dict[str, Any]],
                pool: "WorkerPool") -> dict[str, Any]:
    """Generate, tile and score every model's samples; adds metrics to ``utility[model]``, returns the settings.

    Generation runs ``pool.jobs`` models at once; in the serial case this process loads its own copy of the base
    model (the feature engine's has been released by then).
    """
    from library.data.dataset import load_image  # noqa: PLC0415
    from library.eval.run import load_bundle  # noqa: PLC0415
    from library.sd.sampling import save_grid  # noqa: PLC0415

    t0 = time.perf_counter()
    prompts = quality_prompts(manifest, config.quality_num_images)
    refs = reference_entries(manifest, config.quality_reference)
    if pool.parallel:
        generated = pool.map(generate_samples_job, [SampleJob(config, spec, prompts, device) for spec in specs])
    else:
        bundle = load_bundle(config, device)
        generated = []
        for spec in specs:
            t1 = time.perf_counter()
            images = generate_samples(config, bundle, spec, prompts, device, PRECISION_DTYPES[config.mixed_precision])
            generated.append((images, time.perf_counter() - t1))
        del bundle
    # Chunks of real images: a few hundred 512 px reference images would otherwise take gigabytes at once.
    parts: dict[str, list[dict[str, np.ndarray]]] = {ex.name: [] for ex in extractors}
    for start in range(0, len(refs) if extractors else 0, REAL_CHUNK):
        entries = refs[start:start + REAL_CHUNK]
        chunk = torch.stack([load_image(manifest.abs_path(e), config.resolution) for e in entries])
        for ex in extractors:
            parts[ex.name].append(extract_features(ex, chunk, device))
    real = {name: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} for name, chunks in parts.items()}
    floors: dict[str, Any] = {}
    for ex in extractors:
        floors.update(real_vs_real_floor(ex, real[ex.name], config.quality_kid_subsets, config.seed))
    output_dir.mkdir(parents=True, exist_ok=True)
    grids: dict[str, str] = {}
    timing: dict[str, float] = {}
    for spec, (images, seconds) in zip(specs, generated):
        t1 = time.perf_counter()
        grid = save_grid(images[:GRID_MAX_IMAGES], output_dir / f"samples_{spec.name}.png")
        grids[spec.name] = grid.name
        fake_images = pil_to_tensor(images)
        row = utility.setdefault(spec.name, {})
        for ex in extractors:
            fake = extract_features(ex, fake_images, device)
            row.update(feature_metrics(ex, real[ex.name], fake, config.quality_kid_subsets, config.seed))
        timing[spec.name] = seconds + time.perf_counter() - t1
    return {
        "num_images": len(prompts),
        "prompts": "D_te captions (member_test then nonmember_test), cycled; image i uses seed quality_seed + i "
                   "for every model",
        "sampler": config.quality_sampler, "steps": config.quality_steps,
        "guidance_scale": config.quality_guidance_scale, "seed": config.quality_seed,
        "resolution": config.resolution,
        "reference": config.quality_reference, "n_reference": len(refs),
        "features": {ex.name: ex.description for ex in extractors},
        "kid_subset_size": min(1000, len(refs), len(prompts)), "kid_subsets": config.quality_kid_subsets,
        "real_vs_real_floor": floors,
        "grids": grids, "grid_images": min(GRID_MAX_IMAGES, len(prompts)),
        "timing_s": {"total": time.perf_counter() - t0, **timing},
    }


__all__ = ["FIDInceptionV3", "FeatureExtractor", "METRIC_NOTES", "QUALITY_FEATURES", "QUALITY_REFERENCES",
           "extract_features", "feature_metrics", "heldout_losses", "load_extractors", "load_fid_inception",
           "quality_prompts", "real_vs_real_floor", "reference_entries", "run_quality"]
