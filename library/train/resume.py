"""Resuming a run: which state ``--resume latest`` means, and whether a state belongs to this run.

A state folder records the run's *identity* (:func:`run_identity`: the method, the LoRA's shape, the seed, the
training set, the optimizer's settings); :func:`check_resume` refuses a state whose identity or training settings
differ, because such a resume either crashes deep inside torch or, worse for a membership study, silently trains on
one split while the LoRA file names another. Each refusal is one :class:`~library.errors.UserError` line naming the
flag that differs, raised before any model work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from library.config import config_to_dict
from library.data.lineage import PARENT_SPLITS_KEY
from library.errors import ConfigError, TrainingError, UserError
from library.train import checkpoint, prior, retention
from library.train.checkpoint import read_summary
from library.train.config import TrainConfig
from library.train.config_scope import inert_settings
from library.train.parametrization import trains_text_encoder
from networks.lora_format import USER_METADATA_KEYS

if TYPE_CHECKING:
    from library.train.data import LabelledSet
    from library.train.trainer import Trainer

# Settings a resumed run may change: where, how often and how long it writes, logs and samples, and how it computes
# but not what (the latent cache on disk, gradient checkpointing, deterministic GPU kernels), plus paths whose
# content the identity checks (the manifest's splits, the members, the class images). Every other setting changes
# what is trained or what its files claim (the LoRA's metadata names this run's values): a resume must keep it.
RESUMABLE_CHANGES = frozenset({
    "pretrained_model_name_or_path", "tokenizer_path", "allow_pickle", "split_manifest", "train_data_dir",
    "cache_latents", "cache_latents_to_disk", "latent_cache_dir", "vae_batch_size", "full_determinism",
    "gradient_checkpointing", "max_train_epochs", "max_train_steps", "network_weights",
    "attacker_eval_every_n_epochs", "output_dir", "output_name", "overwrite", "save_precision", "save_every_n_epochs",
    "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps", "save_state", "save_last_n_epochs_state",
    "save_last_n_steps_state", "resume", "logging_dir", "log_every_n_steps", "sample_prompts", "sample_every_n_epochs",
    "sample_steps", "sample_at_first", "progress_bar", "dry_run",
    # what the saved file says of itself: the files written after the resume carry the resumed run's words
    *USER_METADATA_KEYS,
    # compared by the identity's groups, with their own messages (a rate that the others override is no change)
    "learning_rate", "unet_lr", "text_encoder_lr", "optimizer_type", "weight_decay", "train_text_encoder",
    "network_train_unet_only", "with_prior_preservation", "num_class_images", "network_args",
    "class_data_dir",  # its images by content (class_images_sha256); by path only for a state without that
})
SCHEDULES_OVER_THE_RUN = ("cosine", "linear")  # their rate at a step depends on the run's length

# identity key -> how the user changes it (for the refusal's "what to do")
IDENTITY_FLAGS = {
    "method": "the training script (train_<method>.py)",
    "network_dim": "--network_dim",
    "network_alpha": "--network_alpha",
    "network_args": "--network_args",
    "text_encoder_lora": "--network_train_unet_only / --text_encoder_lr (--train_text_encoder in full mode)",
    "train_mode": "--train_mode",
    "prior_images": "--with_prior_preservation / --num_class_images",
    "seed": "--seed",
    "split_sha256": "--split_manifest (its splits: which images, captions and repeats)",
    "parent_splits": "--network_weights: the LoRA the run started from, whose splits the saved files record; a resume "
                     "takes its weights from the state, so give that run's --network_weights or none",
    "manifest_sha256": "--split_manifest (its sha256)",
    "members_sha256": "the training images and captions",
    "class_images_sha256": "--class_data_dir (its first --num_class_images images and their captions)",
    # The state's optimizer, scheduler and gradient scaler carry these: a resume would silently keep the state's
    # values (or fail inside torch) while the saved LoRA's metadata names the new ones.
    "optimizer": "--optimizer_type / --learning_rate / --unet_lr / --text_encoder_lr / --weight_decay; to go on "
                 "at other rates, start a new run from the LoRA with --network_weights",
    "mixed_precision": "--mixed_precision",
    "total_batch": "--train_batch_size x the number of processes",
    "total_attacker_batch": "--attacker_batch_size x the number of processes",
    "base_fingerprint": "--pretrained_model_name_or_path (another base model's weights)",
    "attacker": "--attacker_features / --attacker_timesteps / --attacker_normalization / --attacker_lr / "
                "--attacker_weight_decay",
}


def resolve_latest_state(trainer: Trainer) -> None:
    """``--resume latest``: the newest state of ``<output_dir>/<output_name>``, or a new run when there is none
    (diffusers' ``--resume_from_checkpoint latest``; what the launchers pass, so a killed run goes on). With
    ``--overwrite``, a newest state that this run could not resume (another split, seed, ...) is the replaced
    run's: a new run starts in its place, as ``--overwrite`` asks, instead of a refusal."""
    config = trainer.config
    if config.resume != retention.LATEST:
        return
    state = retention.latest_state(trainer.output_dir, trainer.output_name)
    note = f"resuming from {state}" if state else "no state of this run yet, starting a new run"
    if state is not None and config.overwrite and (refusal := _refusal(trainer, state)):
        note = f"{state.name} is the replaced run's ({refusal}): --overwrite starts a new run"
        state = None
    config.resume = str(state) if state is not None else None
    if trainer.accelerator.is_main_process:
        print(f"--resume latest: {note}", flush=True)


def _refusal(trainer: Trainer, state: Path) -> str | None:
    """Why :func:`check_resume` refuses ``state`` for this run, in short; None if it resumes. Changes nothing."""
    lineage, resume = dict(trainer.trained.lineage), trainer.config.resume
    trainer.config.resume = str(state)
    try:
        check_resume(trainer)
    except UserError as exc:
        return str(exc).removeprefix(f"cannot resume from {state}: ").split("; ")[0]
    finally:
        trainer.trained.lineage, trainer.config.resume = lineage, resume
    return None


def members_sha256(members: LabelledSet) -> str:
    """sha256 of the training set as the LoRA sees it: each member's path (relative to the members' common
    folder, so a moved dataset still matches) and caption, in order, repeats included."""
    return _paths_and_captions_sha256(members.paths, members.captions)


def _paths_and_captions_sha256(paths: Sequence[str | Path], captions: Sequence[str]) -> str:
    parents = [str(Path(p).parent) for p in paths]
    root = os.path.commonpath(parents) if parents else ""
    lines = [f"{os.path.relpath(p, root)}\t{c}" for p, c in zip(paths, captions)]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def run_identity(trainer: Trainer) -> dict[str, Any]:
    """What a resumed run must share with the state it resumes (recorded in ``train_state.json``)."""
    config = trainer.config
    return {
        "method": trainer.method_name,
        "train_mode": config.train_mode,  # before the LoRA's own facts: the first mismatch is the one reported
        # the network's shape: the flags', or with --dim_from_weights the file's (a state of another shape does
        # not load: one line in load_state), which the flags do not describe; a full fine-tune has no network
        **({} if config.train_mode == "full" else {"dim_from_weights": True} if config.dim_from_weights else {
            "network_dim": config.network_dim,
            "network_alpha": float(config.network_alpha),
            "network_args": json.dumps(config.network_kwargs, sort_keys=True)}),
        # The batches over all processes (each takes its share): another process count may resume with the same
        # totals, never with other ones (which the per-process settings alone would not show)
        "total_batch": config.train_batch_size * trainer.world_size,
        **({"total_attacker_batch": config.attacker_batch_size * trainer.world_size}
           if trainer.method_class.has_attacker else {}),
        "text_encoder_lora": trains_text_encoder(config),
        "prior_images": config.num_class_images if config.with_prior_preservation else 0,
        "seed": config.seed,
        "split_sha256": trainer.data.split_sha256,
        # the splits behind the starting weights (--network_weights): a resume takes the weights from the state
        "parent_splits": trainer.trained.lineage.get(PARENT_SPLITS_KEY, ""),
        # The file's bytes: only compared with a state that predates split_sha256 (they change with dataset_root).
        "manifest_sha256": trainer.data.manifest_sha256,
        "members_sha256": members_sha256(trainer.data.members),
        **({"class_images_sha256": digest} if (digest := class_images_sha256(trainer)) else {}),
        "optimizer": _optimizer_settings(config),
        "mixed_precision": config.mixed_precision,
        **({"base_fingerprint": trainer.bundle.loaded_fingerprint} if trainer.bundle.loaded_fingerprint else {}),
        **({"attacker": _attacker_settings(config)} if trainer.method_class.has_attacker else {}),
        # compared on its own (check_resume): the length a cosine / linear schedule decays over
        "schedule_steps": trainer.total_steps if config.lr_scheduler in SCHEDULES_OVER_THE_RUN else 0,
    }


def class_images_sha256(trainer: Trainer) -> str | None:
    """DreamBooth's class images as :func:`members_sha256` sees members (relative paths and captions: a moved or
    copied ``--class_data_dir`` still matches); None without prior preservation, or while images are still to be
    generated (a dry run generates none)."""
    config = trainer.config
    if not config.with_prior_preservation or prior.missing_class_images(config):
        return None
    records = prior.class_images(config)  # what the trainer read (it generated the missing ones unless a dry run)
    return _paths_and_captions_sha256([r.path for r in records], [r.caption for r in records])


def _optimizer_settings(config: TrainConfig) -> str:
    """The optimizer's type and the rates it was built with, as the state's optimizer holds them."""
    return json.dumps({"type": config.optimizer_type, "weight_decay": config.weight_decay,
                       "unet_lr": config.effective_unet_lr, "text_encoder_lr": config.effective_text_encoder_lr},
                      sort_keys=True)


def _without_text_encoder_rate(identity: dict[str, Any]) -> dict[str, Any]:
    """``identity`` with its optimizer settings (:func:`_optimizer_settings`) less the text encoder's rate."""
    try:
        rates = json.loads(identity["optimizer"])
        rates.pop("text_encoder_lr", None)
    except (KeyError, TypeError, ValueError, AttributeError):  # an older state without (readable) settings
        return identity
    return {**identity, "optimizer": json.dumps(rates, sort_keys=True)}


def _attacker_settings(config: TrainConfig) -> str:
    """The proxy attacker's shape (its input features) and its optimizer's rates."""
    return json.dumps({"features": config.attacker_features, "timesteps": list(config.attacker_timesteps),
                       "normalization": config.attacker_normalization, "lr": config.attacker_lr,
                       "weight_decay": config.attacker_weight_decay}, sort_keys=True)


def _identity_of_older_state(summary: dict[str, Any]) -> dict[str, Any]:
    """The identity facts a state written before identities were recorded still carries (its config)."""
    config = summary.get("config") or {}
    known: dict[str, Any] = {"method": summary.get("method")}
    for key in ("network_dim", "seed"):
        if key in config:
            known[key] = config[key]
    if "network_alpha" in config:
        known["network_alpha"] = float(config["network_alpha"])
    return {k: v for k, v in known.items() if v is not None}


def check_resume(trainer: Trainer) -> None:
    """``--resume``: the state exists, belongs to this run (same identity and training settings) and is not past
    this run's budget; checked before the model work (latents, class images) that a bad state would waste. A run
    resumed without ``--network_weights`` takes the state's record of the LoRA its weights started from
    (``trainer.trained.lineage``), which its files then carry."""
    directory = Path(trainer.config.resume)
    summary = read_summary(directory)
    checkpoint.check_state_file(directory)
    if summary is None:  # state.pt alone carries no identity: it would resume any run, dropping its lineage record
        raise TrainingError(
            f"cannot resume from {directory}: it holds no {checkpoint.SUMMARY_FILE}, the record of the run that wrote "
            "the state (method, settings, split, the LoRA it started from) that says whether it belongs to this run; "
            "pass the whole folder --save_state wrote")
    saved = summary.get("identity") or _identity_of_older_state(summary)
    current = run_identity(trainer)
    if saved.get("parent_splits") and not current["parent_splits"]:
        # Resumed without --network_weights: the state's weights started from a LoRA, and its record of the splits
        # behind them goes on into what this run saves (else a resume would launder another split's weights)
        trainer.trained.lineage = {PARENT_SPLITS_KEY: saved["parent_splits"]}
        current["parent_splits"] = saved["parent_splits"]
    if not current["text_encoder_lora"]:  # its rate is no parameter group of the state: changing it changes nothing
        saved, current = _without_text_encoder_rate(saved), _without_text_encoder_rate(current)
    for key in current:  # in run_identity's order (the summary's keys are sorted): the most telling first
        if key == "manifest_sha256" and "split_sha256" in saved or key == "schedule_steps":
            continue  # a moved dataset's re-written manifest: same splits, other bytes; the schedule: below
        if key in saved and current[key] != saved[key]:
            name, was, now = _difference(key, saved[key], current[key])
            raise TrainingError(
                f"cannot resume from {directory}: it was trained with {name} = {was}, this run has {now} (set by "
                f"{IDENTITY_FLAGS.get(key, key)}); resume with the settings of that run, or start a new run "
                "without --resume")
    # A state from before class_images_sha256 was recorded: its class images are known by their folder alone
    by_path = set() if "class_images_sha256" in saved else {"class_data_dir"}
    # Per-process batches: compared as totals (the identity) where the state records them
    by_total = {name for name, key in (("train_batch_size", "total_batch"),
                                       ("attacker_batch_size", "total_attacker_batch")) if key in saved}
    inert = inert_settings(trainer.config, trainer.method_name)  # "ignored" by this run: no reason to refuse
    _check_settings(directory, summary.get("config"), trainer.config,
                    (RESUMABLE_CHANGES - by_path) | inert | by_total)
    length = saved.get("schedule_steps")
    if isinstance(length, int) and length and length != current["schedule_steps"]:
        raise TrainingError(
            f"cannot resume from {directory}: its lr_scheduler '{trainer.config.lr_scheduler}' decays over {length} "
            f"steps and this run asks for {trainer.total_steps} (--max_train_steps / --max_train_epochs): the rate "
            f"would jump at the resume; resume with {length} steps, or start a new run without --resume")
    step = summary.get("global_step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TrainingError(f"cannot resume: {directory / checkpoint.SUMMARY_FILE} records global_step {step!r}, "
                            "not a step; pass a directory written by --save_state")
    if step > trainer.total_steps:
        raise ConfigError(f"cannot resume from {directory}: the state is at step {step}, beyond this run's "
                          f"{trainer.total_steps} steps; ask for at least {step} (--max_train_steps, or "
                          "--max_train_epochs which overrides it)")


def _check_settings(directory: Path, saved: Any, config: TrainConfig, resumable: frozenset[str]) -> None:
    """Every setting outside ``resumable`` that the state's config records must be this run's (a state's config
    is JSON: compare JSON with JSON; a setting an older state does not record is not compared)."""
    if not isinstance(saved, dict):
        return
    current = json.loads(json.dumps(config_to_dict(config), default=str))
    same = {"max_token_length": lambda v: 75 if v is None else v}  # None means CLIP's 75 tokens
    for key in sorted(set(saved) & set(current) - resumable):
        normal = same.get(key, lambda v: v)
        if normal(saved[key]) != normal(current[key]):
            raise TrainingError(
                f"cannot resume from {directory}: it was trained with {key} = {_show(saved[key])}, this run has "
                f"{_show(current[key])} (set by --{key}); a resumed run keeps what it trains with, so resume with "
                "that value, or start a new run without --resume")


def interrupted_hint(trainer: Trainer) -> str:
    """What to do after Ctrl-C or a SIGTERM: nothing is saved at that moment, so name the newest state."""
    return f"nothing was saved at the interruption; {resume_hint(trainer)}"


def resume_hint(trainer: Trainer) -> str:
    """The newest state of this run and how to continue from it, or that there is none."""
    state = retention.latest_state(trainer.output_dir, trainer.output_name)
    if state is None:
        return ("this run wrote no state to resume from (--save_state with --save_every_n_epochs or "
                "--save_every_n_steps writes them)")
    return f"the newest state of this run is {state}: the same command with --resume latest continues from it"


def _difference(key: str, saved: Any, current: Any) -> tuple[str, str, str]:
    """(what differs, its saved value, this run's) for the refusal: the first differing entry of a group of
    settings (``optimizer.unet_lr``), else the identity key itself."""
    try:
        was, now = json.loads(saved), json.loads(current)
    except (TypeError, ValueError):
        was = now = None
    if isinstance(was, dict) and isinstance(now, dict):
        for entry in sorted(set(was) | set(now)):
            if was.get(entry) != now.get(entry):
                return f"{key}.{entry}", _show(was.get(entry)), _show(now.get(entry))
    return key, _show(saved), _show(current)


def _show(value: Any) -> str:
    # Long values (paths) keep both ends: two paths often differ only near the end.
    text = repr(value)
    return text if len(text) <= 120 else text[:50] + "..." + text[-60:]
