"""What a run writes: the LoRA file and its metadata, the attacker file, the run record and resumable states.

Every function takes the :class:`~library.train.trainer.Trainer` whose run it records; only the main process
writes, and every process takes part in the collectives (the barrier, the rank sync check).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.config import config_to_dict
from library.errors import TrainingError
from library.fileio import atomic_write_text, json_safe, write_safetensors
from library.runtime import SAVE_DTYPES, machine, provenance
from library.train import checkpoint, resume, retention
from networks.lora_format import user_metadata

if TYPE_CHECKING:
    from library.train.config import TrainConfig
    from library.train.trainer import Trainer


@dataclass
class TrainResult:
    weights_path: Path  # the weights file: a LoRA, or a full fine-tune's SD single file
    attacker_path: Path | None
    record_path: Path
    global_step: int
    final_logs: dict[str, float]


def conditioning_metadata(cfg: TrainConfig) -> dict[str, str]:
    """What conditions the UNet at training time, in sd-scripts' keys and value formats (``str()`` of the value:
    ``ss_max_token_length`` is "None" for the default 75 tokens): an evaluation must condition the same way."""
    return {
        "ss_clip_skip": str(cfg.clip_skip),
        "ss_max_token_length": str(cfg.max_token_length),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "ss_v_parameterization": "False",  # SD v1.x epsilon prediction only (library.sd.loading refuses others)
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_min_timestep": str(cfg.min_timestep),
        "ss_max_timestep": str(cfg.max_timestep),
    }


def training_metadata(trainer: Trainer, cadence: retention.Cadence | None = None) -> dict[str, str]:
    """The saved weights' metadata (a LoRA file's, a full fine-tune's): kohya's ``ss_*`` training keys and this
    project's ``smp_lora.*`` (no data paths). ``cadence``: the checkpoint's (None for the final or last-good file)."""
    cfg = trainer.config
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    meta = {
        "ss_output_name": trainer.output_name,
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_unet_lr": str(cfg.effective_unet_lr),
        "ss_text_encoder_lr": str(cfg.effective_text_encoder_lr),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}(weight_decay={cfg.weight_decay})",
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_batch_size_per_device": str(cfg.train_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_total_batch_size": str(cfg.train_batch_size * cfg.gradient_accumulation_steps * trainer.world_size),
        "ss_max_train_steps": str(trainer.total_steps),
        "ss_steps": str(trainer.global_step),
        "ss_seed": str(cfg.seed),
        "ss_mixed_precision": cfg.mixed_precision,
        **conditioning_metadata(cfg),
        "smp_lora.method": trainer.method_name,
        "smp_lora.seed": str(cfg.seed),
        "smp_lora.latent_mode": cfg.latent_mode,  # what the members' latents were: their posterior mean or one draw
    }
    if trainer.data.manifest_sha256:
        meta["smp_lora.manifest_sha256"] = trainer.data.manifest_sha256
        meta["smp_lora.split_sha256"] = trainer.data.split_sha256 or ""  # what evaluate_mia.py checks
    if trainer.bundle.loaded_fingerprint:  # evaluate_mia.py refuses the file on another base model
        meta["smp_lora.base_fingerprint"] = trainer.bundle.loaded_fingerprint
    meta.update(trainer.trained.lineage)  # the splits the starting weights saw (a resumed run: the state's record)
    meta.update(trainer.method.metadata())
    # the author's own words last: --metadata_title replaces the default title (the file's name)
    meta.update(user_metadata(cfg))
    if cadence == "epoch":
        # An epoch checkpoint's name gives its epoch, and its step count with it the batches per epoch: the
        # member-set size up to the batch size, which the metadata keeps out (ss_num_batches_per_epoch). sd-scripts
        # writes ss_steps in every file; a step checkpoint (its name is its step) keeps it, at an epoch's end too.
        del meta["ss_steps"]
    return meta


def save_weights(trainer: Trainer, name: str, dtype: torch.dtype | None = None,
                 cadence: retention.Cadence | None = None) -> Path:
    """The trained weights as ``<output_dir>/<name>.safetensors`` (a LoRA file, or a full fine-tune's single file
    with its diffusers folders beside it: :mod:`library.train.parametrization`), in ``--save_precision`` unless
    ``dtype`` is given; ``cadence``: that of the checkpoint it is (:func:`training_metadata`)."""
    return trainer.trained.save(trainer.output_dir, name, dtype or SAVE_DTYPES[trainer.config.save_precision],
                                training_metadata(trainer, cadence))


def save_attacker(trainer: Trainer, path: Path) -> None:
    """The proxy attacker h_w in a file of its own (it never goes into the LoRA file)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in trainer.method.attacker.state_dict().items()}
    write_safetensors(path, tensors, {"smp_lora.method": trainer.method_name})


def save_outputs(trainer: Trainer, name: str, final_logs: dict[str, float] | None = None,
                 cadence: retention.Cadence | None = None) -> TrainResult:
    """``<name>.safetensors`` (+ ``-attacker.safetensors``), with ``--save_state`` the resumable state
    ``<name>-state``, and last the run record ``<name>.json`` that marks them complete. ``cadence``: an
    intermediate checkpoint's (its step number can fall on an epoch's end, so it is passed, not guessed)."""
    accelerator = trainer.accelerator
    accelerator.wait_for_everyone()
    weights_path = trainer.output_dir / f"{name}.safetensors"
    attacker_path = None
    record_path = trainer.output_dir / f"{name}.json"
    if accelerator.is_main_process:
        # The record is what marks a run finished: an old one (``--overwrite``) goes first, so a kill before the new
        # record leaves a LoRA without record (unfinished, as the overwrite refusal says), never a mixed set.
        record_path.unlink(missing_ok=True)
        save_weights(trainer, name, cadence=cadence)
        if trainer.method.has_attacker:
            attacker_path = trainer.output_dir / f"{name}-attacker.safetensors"
            save_attacker(trainer, attacker_path)
    in_sync = trainer.ranks_in_sync()
    if trainer.config.save_state:  # before the record: a run whose state could not be saved is not marked finished
        save_state(trainer, trainer.output_dir / f"{name}-state")
    if accelerator.is_main_process:
        record = {
            "method": trainer.method_name, "global_step": trainer.global_step, "total_steps": trainer.total_steps,
            "num_processes": accelerator.num_processes, "device": str(trainer.device), "ranks_in_sync": in_sync,
            "manifest_sha256": trainer.data.manifest_sha256, "split_sha256": trainer.data.split_sha256,
            "config": config_to_dict(trainer.config), "machine": machine(), "provenance": provenance(),
            "epochs": trainer.epoch_logs, "final": {**(final_logs or {}), **trainer.method.final_logs()},
        }
        # strict JSON (DP-SGD without noise has epsilon inf): non-finite numbers are null, as in report.json
        atomic_write_text(record_path, json.dumps(json_safe(record), indent=2, default=str, allow_nan=False))
    return TrainResult(weights_path, attacker_path, record_path, trainer.global_step, final_logs or {})


def save_checkpoint(trainer: Trainer, cadence: retention.Cadence, number: int) -> None:
    """An intermediate checkpoint (``<name>-NNNNNN`` at an epoch, ``<name>-stepNNNNNNNN`` at a step), then the
    older ones ``--save_last_n_*`` no longer keeps are deleted (:mod:`library.train.retention`)."""
    save_outputs(trainer, retention.checkpoint_name(trainer.output_name, cadence, number), cadence=cadence)
    cfg = trainer.config
    files = cfg.save_last_n_epochs if cadence == "epoch" else cfg.save_last_n_steps
    states = cfg.save_last_n_epochs_state if cadence == "epoch" else cfg.save_last_n_steps_state
    keep = retention.Retention(files=files, states=states if states is not None else files)
    if trainer.accelerator.is_main_process and (keep.files is not None or keep.states is not None):
        retention.prune(trainer.output_dir, trainer.output_name, cadence, number, keep, trainer.trained.remove)


def last_good_name(trainer: Trainer) -> str:
    return f"{trainer.output_name}-last-good"


def last_good_path(trainer: Trainer) -> Path:
    return trainer.output_dir / f"{last_good_name(trainer)}.safetensors"


def save_last_good(trainer: Trainer) -> None:
    """The LoRA as it was before the step that failed (kept for inspection when training diverges), in float32:
    weights that grew past fp16's range on their way to diverging are finite there, and inf in fp16."""
    if trainer.accelerator.is_main_process:
        save_weights(trainer, last_good_name(trainer), torch.float32)


def save_state(trainer: Trainer, directory: Path) -> None:
    """A state ``--resume`` continues exactly from (see :meth:`Trainer.state_dict`)."""
    rank_rng = trainer.gather_rng_states()  # on every process; the rest (a whole UNet in full fine-tuning) on one
    if trainer.accelerator.is_main_process:
        checkpoint.save_state(directory, trainer.state_dict(rank_rng), {
            "global_step": trainer.global_step, "method": trainer.method_name, "output_name": trainer.output_name,
            "epoch": trainer.completed_epochs(), "identity": resume.run_identity(trainer),
            "config": config_to_dict(trainer.config),
        })
    trainer.accelerator.wait_for_everyone()


def load_state(trainer: Trainer, directory: str) -> None:
    """Continue from a state; one that does not fit this run (a state written before run identities were
    recorded, see :func:`library.train.resume.check_resume`) is one line, not torch's multi-line error."""
    state = checkpoint.load_state(directory)
    try:
        trainer.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise TrainingError(f"cannot resume from {directory}: the state does not fit this run ({reason}); resume "
                            "with the settings of the run that wrote it") from None
