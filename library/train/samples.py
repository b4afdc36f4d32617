"""The sample grids of a training run (``--sample_prompts`` every ``--sample_every_n_epochs``), as sd-scripts
draws them: at the end of every due epoch, at the end of a run that ``--max_train_steps`` stops inside a due
epoch, and before the first step with ``--sample_at_first``. Sampling draws nothing from the random streams
training goes on with, so a run with samples trains the very weights of one without."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from library.runtime import cuda_devices, eval_mode
from library.sd.sampling import build_pipeline, generate, read_prompt_file, save_grid
from library.train import preflight

if TYPE_CHECKING:
    from library.train.trainer import Trainer


def partial_epoch_due(trainer: Trainer) -> int | None:
    """The epoch (counted from 1) the run stopped inside, when it is due a sample grid; None otherwise, and None
    when an epoch ended at the last step (a step that ran on into the next epoch by gradient accumulation: those
    weights were sampled at that epoch's end)."""
    cfg, sampler = trainer.config, trainer.sampler
    epoch = sampler.epoch + 1  # the epoch in progress
    partial = sampler.position > 0 and trainer.completed_epochs() < epoch
    ended_here = bool(trainer.epoch_logs) and trainer.epoch_logs[-1].get("step") == trainer.global_step
    due = bool(cfg.sample_prompts and cfg.sample_every_n_epochs) and epoch % (cfg.sample_every_n_epochs or 1) == 0
    return epoch if partial and due and not ended_here else None


def sample_before_training(trainer: Trainer) -> None:
    """``--sample_at_first``: the prompts before this process's first step, as sd-scripts does. A new run's grid
    shows the base model (the LoRA starts at zero) as epoch 0; a resumed run's shows the state's weights, named by
    its step as sd-scripts names step samples, so that it never replaces an epoch's grid with other weights."""
    cfg = trainer.config
    if cfg.sample_at_first and cfg.sample_prompts:
        suffix = "e000000" if trainer.global_step == 0 else f"{trainer.global_step:06d}"
        sample_images(trainer, f"{trainer.output_name}_{suffix}")


def sample_images(trainer: Trainer, name: str) -> None:
    """Sample the --sample_prompts with the current weights into <output_dir>/sample/<name>.png (main process)."""
    if not trainer.accelerator.is_main_process:
        return
    cfg = trainer.config
    specs = read_prompt_file(cfg.sample_prompts)
    # As the proxy monitor: no LoRA dropout in a sample, and no draw from the RNG that training goes on with.
    with torch.random.fork_rng(devices=cuda_devices(trainer.device)), \
            eval_mode(trainer.bundle.unet, trainer.bundle.text_encoder, getattr(trainer.trained, "network", None)):
        images = generate(build_pipeline(trainer.bundle), specs, resolution=cfg.resolution, steps=cfg.sample_steps,
                          seed=cfg.seed, clip_skip=cfg.clip_skip, max_token_length=cfg.max_token_length,
                          autocast=trainer.autocast)
    save_grid(images, trainer.output_dir / preflight.SAMPLE_FOLDER / f"{name}.png")


__all__ = ["partial_epoch_due", "sample_before_training", "sample_images"]
