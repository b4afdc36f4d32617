"""Utility of the evaluated models: held-out denoising loss (always) and sample quality (``--quality``).

**Held-out loss** (no weights needed, no extra UNet pass): the mean per-sample denoising loss (Eq. 1, the MSE of
the noise prediction) that the feature engine already computed for the attacks, over the evaluation
``--timesteps`` x ``--num_noise_draws`` (the same noise for every model), averaged over D^m_te
(``loss_member_test``) and D^nm_te (``loss_nonmember_test``). ``loss_gap`` = non-member minus member: a LoRA
that memorises its training set widens it. These are losses at the small evaluation timesteps, not the
training loss over uniform t, so compare them between models of one report only.

**Sample quality** (``--quality``): every model generates images from the D_te captions
(:mod:`library.eval.generation`); the first :data:`GRID_MAX_IMAGES` are tiled into ``samples_<model>.png``. The
generated set is compared with the real reference images, loaded exactly as for training (resize short side +
centre crop to ``--resolution``), in the feature space of each extractor asked for
(:mod:`library.eval.extractors`: ``digits`` = PROXY learned-feature FD / KID, ``inception`` = FID / KID).

Fréchet distances use :func:`library.eval.metrics.frechet_distance_from_features` (exact, without ``sqrtm``).
KID uses the largest subset size the sets allow (min(1000, n_real, n_generated)). Every metric also gets a
real-vs-real floor (the reference set split into two halves, KID subsets of half size), the value "as good as it
gets" at about this sample size: Fréchet distances on a few hundred images are strongly biased upward, KID is not.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from library.eval import metrics
from library.eval.config import EvalConfig
from library.eval.extractors import FeatureExtractor, extract_features
from library.eval.generation import (
    generate_all,
    pil_to_tensor,
    quality_prompts,
    reference_entries,
)
from library.eval.records import ModelSpec

if TYPE_CHECKING:
    from library.eval.features import ModelFeatures
    from library.workers import WorkerPool

REAL_CHUNK = 64  # reference images loaded at once
GRID_MAX_IMAGES = 16  # a 64-image grid of 512 px samples would be a 4096 px, ~20 MB PNG


def heldout_losses(features: Mapping[str, ModelFeatures], splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{model: {loss_member_test, loss_nonmember_test, loss_gap}}`` from the attack features ``[N, K, M]``."""
    split_array = np.asarray(splits)
    out: dict[str, dict[str, Any]] = {}
    for name, feats in features.items():
        per_sample = feats.losses.double().mean(dim=(1, 2)).numpy()
        member = float(per_sample[split_array == "member_test"].mean())
        nonmember = float(per_sample[split_array == "nonmember_test"].mean())
        out[name] = {"loss_member_test": member, "loss_nonmember_test": nonmember, "loss_gap": nonmember - member}
    return out


def real_features(config: EvalConfig, manifest: Any, refs: Sequence[Any], extractors: Sequence[FeatureExtractor],
                  device: torch.device) -> dict[str, dict[str, np.ndarray]]:
    """``{extractor: {feature key: [n_ref, d]}}`` of the reference images, read in chunks (a few hundred 512 px
    images would otherwise take gigabytes at once)."""
    from library.data.images import load_image  # noqa: PLC0415

    parts: dict[str, list[dict[str, np.ndarray]]] = {ex.name: [] for ex in extractors}
    for start in range(0, len(refs) if extractors else 0, REAL_CHUNK):
        entries = refs[start:start + REAL_CHUNK]
        chunk = torch.stack([load_image(manifest.abs_path(e), config.resolution) for e in entries])
        for ex in extractors:
            parts[ex.name].append(extract_features(ex, chunk, device))
    return {name: {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} for name, chunks in parts.items()}


def run_quality(config: EvalConfig, specs: Sequence[ModelSpec], manifest: Any, device: torch.device,
                extractors: Sequence[FeatureExtractor], output_dir: Path, utility: dict[str, dict[str, Any]],
                pool: WorkerPool) -> dict[str, Any]:
    """Generate, tile and score every model's samples; adds metrics to ``utility[model]``, returns the settings."""
    from library.sd.sampling import save_grid  # noqa: PLC0415

    t0 = time.perf_counter()
    prompts = quality_prompts(manifest, config.quality_num_images)
    refs = reference_entries(manifest, config.quality_reference)
    generated = generate_all(config, specs, prompts, device, pool)
    real = real_features(config, manifest, refs, extractors, device)
    floors: dict[str, Any] = {}
    for ex in extractors:
        floors.update(metrics.real_vs_real_floor(ex.metrics, real[ex.name], config.quality_kid_subsets, config.seed))
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
            row.update(metrics.feature_metrics(ex.metrics, real[ex.name], fake, config.quality_kid_subsets,
                                               config.seed))
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


__all__ = ["GRID_MAX_IMAGES", "heldout_losses", "real_features", "run_quality"]
