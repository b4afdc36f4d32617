"""The run on one line, printed before anything costly (``--dry_run`` stops after it).

What is trained, on what, for how long and into where: the facts sd-scripts prints as a block before its first
step ("num train images * repeats", "num batches per epoch", "total optimization steps"), plus the memory the
trained weights will hold, so a user sees a wrong budget or a wrong output path before minutes of latent encoding.
"""

from __future__ import annotations

from pathlib import Path

from library.train import prior
from library.train.config import TrainConfig
from library.train.data import LabelledSet, latent_cache_dir
from library.train.samplers import EpochCyclingSampler


def describe_run(config: TrainConfig, *, method_name: str, trained_kind: str, trained_parameters: int,
                 sampler: EpochCyclingSampler, total_steps: int, world_size: int, members: LabelledSet,
                 class_images_ready: bool, output: Path) -> str:
    """One line for the main process to print.

    ``trained_parameters`` counts what the optimiser updates (a group at learning rate 0 holds none);
    ``class_images_ready`` is False on a dry run, which reports how many DreamBooth class images are still to make;
    ``output`` is the file the run will write.
    """
    if config.max_train_epochs is not None:
        budget = f"set by max_train_epochs = {config.max_train_epochs}; max_train_steps is ignored"
    else:
        budget = f"set by max_train_steps = {config.max_train_steps}"
    # fp32 weights + gradients + AdamW's two moments (AdamW8bit: two bytes of moments), activations apart
    state_bytes = trained_parameters * (4 + 4 + (2 if config.optimizer_type == "AdamW8bit" else 8))
    epochs = total_steps * config.gradient_accumulation_steps / max(sampler.batches_per_epoch, 1)
    cache_dir = latent_cache_dir(config)
    return (f"method {method_name}: {trained_parameters:,} trained parameters ({trained_kind}; ~"
            f"{state_bytes / 2**30:.2f} GiB of weights, gradients and optimiser state), {_members(members)}, "
            f"batch {config.train_batch_size} x {world_size} process(es), "
            f"{sampler.batches_per_epoch} batches/epoch{_leftover(sampler)}, {total_steps} optimisation steps "
            f"(~{epochs:.1f} epochs; {budget}){_prior(config, class_images_ready)}, output {output}"
            + (f", latents cached in {cache_dir}" if cache_dir else ""))


def _leftover(sampler: EpochCyclingSampler) -> str:
    left = sampler.num_items % sampler.global_batch_size
    return f" (full batches only: each epoch's shuffle leaves {left} image(s) for a later epoch)" if left else ""


def _has_repeats(members: LabelledSet) -> bool:
    """Whether kohya repeats list some member more than once per epoch."""
    return len(set(members.keys)) != len(members)


def _members(members: LabelledSet) -> str:
    distinct = len(set(members.keys))
    repeats = f" ({len(members)} per epoch with their kohya repeats)" if _has_repeats(members) else ""
    return f"{distinct} member images{repeats}"


def members_sampler_name(members: LabelledSet) -> str:
    """How the too-small-for-a-batch error names D_tr: its count is per epoch, kohya repeats included, as the plan's."""
    repeats = " with their kohya repeats" if _has_repeats(members) else ""
    return f"D_tr, the members{repeats} (--train_batch_size)"


def _prior(config: TrainConfig, class_images_ready: bool) -> str:
    if not config.with_prior_preservation:
        return ""
    missing = 0 if class_images_ready else prior.missing_class_images(config)
    return (f", prior preservation on {config.num_class_images} class images x {config.prior_loss_weight}"
            + (f" ({missing} to generate with the base model)" if missing else ""))
