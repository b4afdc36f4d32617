"""Checks a training run passes before it computes anything: its output folders, its lock, what it would replace
(a finished LoRA, another run's files, an unfinished run's states) and the LoRA it continues.

Each refusal is one :class:`~library.errors.UserError` line naming the flag or folder and what to do, raised
before the latents are encoded or a step is taken, so no hour of training is lost at the final save and no
finished LoRA is silently replaced. Whether a state to resume belongs to the run is :mod:`library.train.resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from library.data.lineage import UNRECORDED, splits_seen
from library.errors import ConfigError, warn
from library.outputs import OutputLock, check_not_locked, check_output_dir
from library.train import resume, retention
from library.train.checkpoint import read_summary
from library.train.config import TrainConfig
from library.train.data import latent_cache_dir

if TYPE_CHECKING:
    from library.train.trainer import Trainer

SAMPLE_FOLDER = "sample"  # <output_dir>/sample: the training-time sample grids


def check_output_folders(config: TrainConfig, create: bool = True) -> None:
    """``--output_dir``, ``--logging_dir`` and the latent cache folder are writable folders (created unless
    ``--dry_run``, which writes nothing, or ``create`` is False): a file there, or no permission, is one line now,
    not a lost run."""
    create = create and not config.dry_run
    check_output_dir(config.output_dir, "--output_dir", create=create)
    if config.logging_dir:
        check_output_dir(config.logging_dir, "--logging_dir", create=create)
    cache = latent_cache_dir(config)
    if cache is not None:
        check_output_dir(cache, "--latent_cache_dir" if config.latent_cache_dir else "--output_dir (its latent_cache)",
                         create=create)


@contextlib.contextmanager
def run_lock(trainer: Trainer) -> Iterator[None]:
    """The output folder's lock for the whole run, held by the main process (a dry run writes nothing).

    Every process learns whether the main one got it: a refused multi-process run then ends on every rank at once
    with the same line, instead of the other ranks waiting at their first collective for the distributed timeout
    (under a launcher that does not stop the other ranks when one exits, as torchrun does).
    """
    if trainer.config.dry_run:
        yield
        return
    with contextlib.ExitStack() as held:
        def take_lock() -> None:  # held until the run ends; the broadcast carries only whether the main one got it
            held.enter_context(OutputLock(trainer.output_dir, "--output_dir", owned=[SAMPLE_FOLDER]))

        trainer.collectives.on_main(take_lock)
        yield


def check_output_not_locked(trainer: Trainer) -> None:
    """Before minutes of work that precede the run's lock (DreamBooth's class images): a run that the lock would
    refuse, since another run holds its ``--output_dir``, stops now, on every rank (the lock still decides)."""
    trainer.collectives.on_main(lambda: check_not_locked(trainer.output_dir, "--output_dir"))


def check_run(trainer: Trainer) -> None:
    """Every check of a run that holds its folder's lock, in order; nothing in the folder changes before a refusal."""
    resume.resolve_latest_state(trainer)
    check_other_runs(trainer)
    check_overwrite(trainer)
    check_parent_lora(trainer)
    if trainer.config.resume:
        resume.check_resume(trainer)
    warn_finished_run_continued(trainer)
    unmark_replaced_run(trainer)


def check_overwrite(trainer: Trainer) -> None:
    """Refuse to replace a finished run's LoRA, or an unfinished run's states, unless ``--overwrite``, or this run
    resumes that run's own state (sd-scripts users continue a run with ``--resume <output_dir>/<name>-state`` into
    the same folder; ``--resume latest`` finds the newest)."""
    config = trainer.config
    final = trainer.output_dir / f"{trainer.output_name}.safetensors"
    if config.overwrite:
        return  # the replaced run is unmarked after every other check (unmark_replaced_run)
    if _resumes_own_state(trainer):
        return  # warn_finished_run_continued says what it replaces, once the state is known to resume
    state = retention.latest_state(trainer.output_dir, trainer.output_name)
    if not final.exists():
        if state is None:  # nothing to lose
            return
        # A new run, or one resuming a state from another folder, would write its states under the same names (and
        # prune them) and so replace the interrupted run's progress.
        advice = (f" that this run, resuming {config.resume}, would write its states over; pass --resume {state} to "
                  "continue that run instead, --overwrite to replace it" if config.resume else
                  "; pass --resume latest to continue it, --overwrite to start a new run in its place")
        raise ConfigError(f"--output_dir {trainer.output_dir} holds an unfinished run of {trainer.output_name} (its "
                          f"newest state: {state.name}){advice}, or choose another --output_dir or --output_name")
    resume = f", or --resume {state} (its newest state) to continue it" if state is not None else ""
    record = final.with_suffix(".json")
    what = "the finished run" if record.is_file() else "a run's LoRA without its run record (killed while saving?):"
    raise ConfigError(f"--output_dir {trainer.output_dir} already holds {what} {final.name}; pass --overwrite to "
                      f"replace it, or choose another --output_dir or --output_name{resume}")


def warn_finished_run_continued(trainer: Trainer) -> None:
    """A resume of a finished run's own state (without ``--overwrite``) replaces its LoRA and run record when it ends:
    kohya does so in silence; say so, nothing else is lost. After the state's checks: a refused resume replaces
    nothing, and must not say it will."""
    config = trainer.config
    final = trainer.output_dir / f"{trainer.output_name}.safetensors"
    if config.overwrite or not _resumes_own_state(trainer) or not trainer.accelerator.is_main_process:
        return
    step = (read_summary(config.resume) or {}).get("global_step")
    if final.with_suffix(".json").is_file() and step is not None and step < trainer.total_steps:
        print(f"warning: this continues the finished run {final.name} from step {step} to {trainer.total_steps}; "
              f"its LoRA and run record are replaced when it ends: copy {final.name} now to keep them", flush=True)


def unmark_replaced_run(trainer: Trainer) -> None:
    """``--overwrite``, once nothing refuses the run: the record marks a run finished, and the replaced run's goes
    now, so a retrain killed before its end is an unfinished run (``--resume latest`` and a launcher's rerun
    continue it), not the old run, finished. Not before: a refused retrain leaves the old run as it was."""
    config = trainer.config
    final = trainer.output_dir / f"{trainer.output_name}.safetensors"
    if config.overwrite and final.exists() and not config.dry_run and trainer.accelerator.is_main_process:
        final.with_suffix(".json").unlink(missing_ok=True)


def _names_written(trainer: Trainer) -> list[str]:
    """The file stems this run may write: ``<name>``, its checkpoints at the saving cadences, their proxy files
    (MP/SMP) and the last-good LoRA of a diverged run."""
    cfg, name = trainer.config, trainer.output_name
    steps = trainer.total_steps
    epochs = math.ceil(steps * cfg.gradient_accumulation_steps / max(trainer.sampler.batches_per_epoch, 1))
    names = [name]
    if cfg.save_every_n_epochs:
        # not the last epoch: it ends with the final step (or the run ends inside it), where the final file is saved
        names += [retention.checkpoint_name(name, "epoch", e) for e in range(cfg.save_every_n_epochs, epochs,
                                                                              cfg.save_every_n_epochs)]
    if cfg.save_every_n_steps:
        names += [retention.checkpoint_name(name, "step", s) for s in range(cfg.save_every_n_steps, steps,
                                                                            cfg.save_every_n_steps)]
    attackers = [f"{n}-attacker" for n in names] if trainer.method_class.has_attacker else []
    return names + attackers + [f"{name}-last-good"]


def check_other_runs(trainer: Trainer) -> None:
    """Refuse a run whose checkpoints, proxy-attacker or last-good file would take the name of another run's
    outputs in the same folder (a run called ``lora-000001`` beside ``lora``'s epoch files): each run's record
    ``<name>.json`` says whose file is whose. ``--overwrite`` replaces this run's outputs only."""
    name = trainer.output_name
    for stem in _names_written(trainer):
        record = trainer.output_dir / f"{stem}.json"
        if not record.is_file():
            continue
        try:
            doc = json.loads(record.read_text(encoding="utf-8"))
            owner = doc["config"]["output_name"] or doc["method"]  # unset: the method's name (Trainer.output_name)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run record of this project
        if owner != name:
            raise ConfigError(f"--output_dir {trainer.output_dir} holds the run {owner!r} ({record.name}), whose "
                              f"{stem}.safetensors this run ({name!r}) would write over; choose another "
                              "--output_name or --output_dir")


def check_parent_lora(trainer: Trainer) -> None:
    """A LoRA continued with ``--network_weights`` brings what it was trained on: another split's members may be this
    split's non-members (evaluate_mia.py refuses the result against this split, :mod:`library.data.lineage`), another
    base model's adaptation means something else on this one, and the method may refuse it (DP-SGD's accountant
    cannot count it). Said before training, where it can still change."""
    parent, config = trainer.trained.parent_metadata, trainer.config
    if parent is None:
        return
    split = trainer.data.split_sha256
    trainer.method_class.check_parent(config, splits_seen(parent), split)  # on every rank: a refusal stops them all
    if not trainer.accelerator.is_main_process:
        return
    other = [s for s in splits_seen(parent) if s != split]
    if split and other == [UNRECORDED]:
        warn(f"--network_weights {config.network_weights} records no split (a LoRA from elsewhere, or trained on a "
             f"whole folder): a membership evaluation of this run against {config.split_manifest} assumes that LoRA "
             "never saw its images (evaluate_mia.py says so)")
    elif split and other:
        warn(f"--network_weights {config.network_weights} was trained (or continues a LoRA trained) on another "
             f"split: its weights may have seen this split's non-members, so a membership evaluation of this run "
             f"against {config.split_manifest} is not valid (evaluate_mia.py refuses it)")
    recorded, loaded = parent.get("smp_lora.base_fingerprint"), trainer.bundle.loaded_fingerprint
    if recorded and loaded and recorded != loaded:
        warn(f"--network_weights {config.network_weights} was trained on another base model (fingerprint "
             f"{recorded[:12]}...) than {config.pretrained_model_name_or_path} ({loaded[:12]}...): its weights "
             "adapted other numbers; continue it on the base it was trained on")


def _resumes_own_state(trainer: Trainer) -> bool:
    if not trainer.config.resume:
        return False
    state = Path(trainer.config.resume)
    if state.resolve().parent != trainer.output_dir.resolve():
        return False
    summary = read_summary(state)
    recorded = summary.get("output_name") if summary else None
    if recorded is not None:
        return recorded == trainer.output_name
    return state.name.startswith(f"{trainer.output_name}-")  # a state written before output_name was recorded
