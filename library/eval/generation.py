"""The images of the sample-quality metrics: what every model generates, and the real images it is compared with.

Every model (``base``, each LoRA and each fully fine-tuned UNet, applied exactly as for the attacks) generates
``--quality_num_images`` images from the D_te captions (member_test then nonmember_test, cycled; image ``i`` uses seed
``quality_seed + i`` for every model, so models are compared on identical prompts and initial noise), in worker
processes when ``--jobs`` > 1. The reference is the REAL images of ``--quality_reference``: ``members`` = D_tr,
the LoRA's training images (the paper compares with "the training images"), ``nonmembers`` or ``test`` = D_te.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from library.errors import ConfigError
from library.eval.config import EvalConfig
from library.eval.models import load_bundle, process_bundle
from library.eval.records import ModelSpec
from library.runtime import PRECISION_DTYPES

if TYPE_CHECKING:
    from library.workers import WorkerPool

QUALITY_REFERENCES = ("members", "nonmembers", "test")


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
    """PIL RGB images -> [N, 3, H, W] float32 in [-1, 1] (the convention of :func:`library.data.images.load_image`)."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


def generate_samples(config: EvalConfig, bundle: Any, spec: ModelSpec, prompts: Sequence[str],
                     device: torch.device, dtype: torch.dtype) -> list[Any]:
    """PIL images of one model: the base bundle with ``spec``'s LoRA applied (or its fully fine-tuned UNet swapped
    in) as for the attacks."""
    from library.eval.features import applied_lora  # noqa: PLC0415
    from library.sd.sampling import PromptSpec, build_pipeline, generate  # noqa: PLC0415

    with applied_lora(bundle, spec.lora, config.network_multiplier, device, dtype, unet=spec.unet):
        pipe = build_pipeline(bundle, config.quality_sampler)
        return generate(pipe, [PromptSpec(p) for p in prompts], resolution=config.resolution,
                        steps=config.quality_steps, guidance_scale=config.quality_guidance_scale,
                        seed=config.quality_seed, clip_skip=config.clip_skip or 1,
                        max_token_length=config.max_token_length)


@dataclass
class SampleJob:
    """One model's quality images, generated in a worker process (with that process's base model)."""

    config: EvalConfig
    spec: ModelSpec
    prompts: list[str]
    device: torch.device


def generate_samples_job(job: SampleJob) -> tuple[list[Any], float]:
    """(images, seconds) of one model, in a worker process."""
    t0 = time.perf_counter()
    bundle = process_bundle(job.config, job.device)
    images = generate_samples(job.config, bundle, job.spec, job.prompts, job.device,
                              PRECISION_DTYPES[job.config.mixed_precision])
    return images, time.perf_counter() - t0


def generate_all(config: EvalConfig, specs: Sequence[ModelSpec], prompts: list[str], device: torch.device,
                 pool: WorkerPool) -> list[tuple[list[Any], float]]:
    """(images, seconds) of every model, ``pool.jobs`` at once; in the serial case this process loads its own
    copy of the base model (the feature engine's has been released by then)."""
    if pool.parallel:
        return pool.map(generate_samples_job, [SampleJob(config, spec, prompts, device) for spec in specs])
    bundle = load_bundle(config, device)
    generated = []
    with pool.in_process():
        for spec in specs:
            t1 = time.perf_counter()
            images = generate_samples(config, bundle, spec, prompts, device, PRECISION_DTYPES[config.mixed_precision])
            generated.append((images, time.perf_counter() - t1))
    del bundle
    return generated


__all__ = ["QUALITY_REFERENCES", "SampleJob", "generate_all", "generate_samples", "generate_samples_job",
           "pil_to_tensor", "quality_prompts", "reference_entries"]
