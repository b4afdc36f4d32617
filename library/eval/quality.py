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

from library.errors import ConfigError, warn
from library.eval import metrics
from library.eval.config import EvalConfig
from library.eval.extractors import (
    EXTRACTORS,
    FeatureExtractor,
    extract_features,
    weights_flags,
    with_weights,
)
from library.eval.generation import (
    generate_all,
    pil_to_tensor,
    quality_prompts,
    reference_entries,
)
from library.eval.records import BASE_NAME, ModelSpec

if TYPE_CHECKING:
    from library.eval.features import ModelFeatures
    from library.workers import WorkerPool

REAL_CHUNK = 64  # reference images loaded at once
GRID_PREFIX = "samples_"  # samples_<model>.png
GRID_MAX_IMAGES = 16  # a 64-image grid of 512 px samples would be a 4096 px, ~20 MB PNG
PER_T_PREFIX = "loss_nonmember_test_t"  # + the timestep: the held-out loss at that t alone


def heldout_losses(features: Mapping[str, ModelFeatures], splits: Sequence[str],
                   timesteps: Sequence[int] = ()) -> dict[str, dict[str, Any]]:
    """``{model: {loss_member_test, loss_nonmember_test, loss_gap, loss_nonmember_test_t<t>...}}`` from the attack
    features ``[N, K, M]``; ``timesteps`` names their K columns (one held-out loss per t, none when empty).

    Why per t: a defence can buy privacy by raising the denoising error at small t for members and non-members
    alike; that barely moves the mean, nor samples judged at a coarse scale, but it is a loss of fine detail."""
    split_array = np.asarray(splits)
    out: dict[str, dict[str, Any]] = {}
    for name, feats in features.items():
        per_sample_t = feats.losses.double().mean(dim=2).numpy()  # [N, K]
        if timesteps and len(timesteps) != per_sample_t.shape[1]:
            raise ValueError(f"{len(timesteps)} timesteps named for {per_sample_t.shape[1]} loss columns")
        per_sample = per_sample_t.mean(axis=1)
        member = float(per_sample[split_array == "member_test"].mean())
        nonmember = float(per_sample[split_array == "nonmember_test"].mean())
        row = {"loss_member_test": member, "loss_nonmember_test": nonmember, "loss_gap": nonmember - member}
        if timesteps:
            held_out = per_sample_t[split_array == "nonmember_test"].mean(axis=0)
            row.update({f"{PER_T_PREFIX}{t}": float(v) for t, v in zip(timesteps, held_out)})
        out[name] = row
    return out


#: A model whose held-out loss at some t exceeds the base model's by more than this is flagged in report.md: it
#: denoises that t worse than before adaptation (plain LoRAs on the demo stay within +-3 % of the base at t = 50).
WORSE_THAN_BASE = 0.10


def worse_than_base(utility: Mapping[str, Mapping[str, Any]], base: str = BASE_NAME,
                    tolerance: float = WORSE_THAN_BASE) -> dict[str, list[tuple[str, float, float]]]:
    """``{model: [(t, its held-out loss, the base's)]}`` for every t where a model is worse than ``base`` by more
    than ``tolerance`` (relative); models without such a t are left out."""
    reference = utility.get(base) or {}
    flagged: dict[str, list[tuple[str, float, float]]] = {}
    for model, row in utility.items():
        if model == base:
            continue
        worse = [(key.removeprefix(PER_T_PREFIX), value, reference[key]) for key, value in row.items()
                 if key.startswith(PER_T_PREFIX) and reference.get(key) and value > (1 + tolerance) * reference[key]]
        if worse:
            flagged[model] = worse
    return flagged


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
    reference = utility_reference(config, specs)  # checked before any model ran (check_utility_reference)
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
        grid = save_grid(images[:GRID_MAX_IMAGES], output_dir / f"{GRID_PREFIX}{spec.name}.png")
        grids[spec.name] = grid.name
        fake_images = pil_to_tensor(images)
        row = utility.setdefault(spec.name, {})
        for ex in extractors:
            fake = extract_features(ex, fake_images, device)
            row.update(metrics.feature_metrics(ex.metrics, real[ex.name], fake, config.quality_kid_subsets,
                                               config.seed))
            if ex.classify is not None and ex.label_of is not None:
                row.update(conditional_accuracy(ex, fake_images, prompts, device))
        timing[spec.name] = seconds + time.perf_counter() - t1
    add_utility_retained(utility, reference, "conditional_accuracy")
    return {
        "utility_reference": reference,
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


def conditional_accuracy(extractor: FeatureExtractor, images: torch.Tensor, prompts: Sequence[str],
                         device: torch.device) -> dict[str, Any]:
    """``conditional_accuracy``: the share of ``images`` the extractor's classifier reads as the class their prompt
    names (prompts naming no single class left out; None when none does), and ``conditional_accuracy_n``."""
    assert extractor.classify is not None and extractor.label_of is not None
    labels = [extractor.label_of(p) for p in prompts]
    keep = [i for i, label in enumerate(labels) if label is not None]
    if not keep:
        return {"conditional_accuracy": None, "conditional_accuracy_n": 0}
    with torch.no_grad():
        predicted = torch.cat([extractor.classify(images[keep[i:i + extractor.batch_size]].to(device)).cpu()
                               for i in range(0, len(keep), extractor.batch_size)])
    wanted = torch.tensor([labels[i] for i in keep])
    return {"conditional_accuracy": float((predicted == wanted).double().mean()), "conditional_accuracy_n": len(keep)}


def utility_reference(config: EvalConfig, specs: Sequence[ModelSpec]) -> str | None:
    """The model whose gain over the base is U's unit: ``--utility_reference``, else the one plain-LoRA file among
    ``specs`` (training metadata ``smp_lora.method = lora``), else None (no U)."""
    if config.utility_reference is not None:
        names = [s.name for s in specs]
        if config.utility_reference not in names:
            raise ConfigError(f"'utility_reference' {config.utility_reference!r} is not an evaluated model; choose "
                              f"one of {names}")
        return config.utility_reference
    plain = _plain_loras(specs)
    return plain[0] if len(plain) == 1 else None


def _plain_loras(specs: Sequence[ModelSpec]) -> list[str]:
    """The names of the plain-LoRA files among ``specs`` (training metadata ``smp_lora.method = lora``)."""
    return [s.name for s in specs if s.metadata.get("smp_lora.method") == "lora"]


def check_utility_reference(config: EvalConfig, specs: Sequence[ModelSpec]) -> None:
    """Before any model runs (and in ``--dry_run``): a ``--utility_reference`` that names no evaluated model is a
    ConfigError; several plain-LoRA files and no reference leave U out, which a ``warning:`` line says."""
    if utility_reference(config, specs) is not None:  # a wrong --utility_reference raises here
        return
    plain = _plain_loras(specs)
    if len(plain) > 1:
        warn(f"U (utility retained) is left out: {len(plain)} plain-LoRA files ({', '.join(plain)}) could be its "
             "reference; pass --utility_reference NAME to count U in units of one of them")


def warn_without_metric(config: EvalConfig) -> None:
    """``--quality`` with no feature weights draws the sample grids and computes no distance: say so before the run,
    rather than leave the user looking for an FID the report cannot have."""
    if config.quality and not with_weights(config, EXTRACTORS.values()):
        warn(f"--quality without {weights_flags(EXTRACTORS.values())}: only the sample grids samples_<model>.png are "
             "written, no Fréchet distance or KID; give a feature net's weights for those "
             "(docs/evaluation.md#sample-quality---quality)")


def add_utility_retained(utility: dict[str, dict[str, Any]], reference: str | None, metric: str,
                         base: str = BASE_NAME) -> None:
    """Utility gain retained, U = (m - m_base) / (m_ref - m_base) (issue 16), as ``utility_retained`` in every row
    holding ``metric``; left out when the reference or the base lacks the metric, and (with a ``warning:``) when the
    reference gains nothing over the base: a zero or negative gain is no unit (U's sign would flip)."""
    m_base = utility.get(base, {}).get(metric)
    m_ref = utility.get(reference, {}).get(metric) if reference is not None else None
    if m_base is None or m_ref is None:
        return
    if m_ref <= m_base:
        warn(f"utility retained U is left out: the reference {reference!r} has {metric} {m_ref:.4g}, no gain over the "
             f"base model's {m_base:.4g}, so there is no gain to count in its units")
        return
    for row in utility.values():
        if row.get(metric) is not None:
            row["utility_retained"] = (row[metric] - m_base) / (m_ref - m_base)


__all__ = ["GRID_MAX_IMAGES", "GRID_PREFIX", "PER_T_PREFIX", "WORSE_THAN_BASE", "add_utility_retained",
           "check_utility_reference", "conditional_accuracy", "heldout_losses", "real_features", "run_quality",
           "utility_reference", "worse_than_base"]
