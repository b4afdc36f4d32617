"""Which intermediate checkpoints a run keeps, and which state ``--resume latest`` continues from.

sd-scripts' retention flags, with their semantics:

* ``--save_last_n_epochs N``: of the ``<name>-NNNNNN`` files written every ``--save_every_n_epochs``, keep the
  newest N (older ones are deleted after each save);
* ``--save_last_n_steps N``: of the ``<name>-stepNNNNNNNN`` files, keep those written in the last N steps;
* ``--save_last_n_epochs_state`` / ``--save_last_n_steps_state``: the same for the ``-state`` folders (default:
  the file setting), so a long run can keep every LoRA but only its newest resumable state.

The final ``<name>.safetensors`` and ``<name>-state`` are never deleted; neither is anything whose name is not one
of this run's checkpoint names or whose own record names another run. ``--resume latest`` (as diffusers'
``--resume_from_checkpoint latest``) picks the state of ``<output_dir>/<output_name>`` written last, or starts a new
run when there is none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from library.fileio import remove_dir
from library.train.checkpoint import SUMMARY_FILE, read_summary

Cadence = Literal["epoch", "step"]
RemoveWeights = Callable[[Path, str], None]  # deletes what the parametrization's ``save`` wrote under a name
LATEST = "latest"  # the --resume value that picks the newest state


@dataclass(frozen=True)
class Checkpoint:
    """An intermediate checkpoint name, ``<output_name>-000050`` or ``<output_name>-step00001000``."""

    name: str
    cadence: Cadence
    number: int  # the epoch or the step it was written at


def checkpoint_name(output_name: str, cadence: Cadence, number: int) -> str:
    return f"{output_name}-{number:06d}" if cadence == "epoch" else f"{output_name}-step{number:08d}"


def _pattern(output_name: str) -> re.Pattern[str]:
    return re.compile(re.escape(output_name) + r"-(?:(?P<epoch>\d{6})|step(?P<step>\d{8}))")


def parse_checkpoint(output_name: str, name: str) -> Checkpoint | None:
    """The checkpoint ``name`` stands for (without suffix), or None when it is not one of this run's."""
    match = _pattern(output_name).fullmatch(name)
    if match is None:
        return None
    if match["epoch"] is not None:
        return Checkpoint(name, "epoch", int(match["epoch"]))
    return Checkpoint(name, "step", int(match["step"]))


def to_remove(numbers: Sequence[int], cadence: Cadence, current: int, keep: int | None) -> list[int]:
    """The checkpoint numbers (epochs or steps, all <= ``current``) that a retention of ``keep`` deletes.

    Epochs: all but the newest ``keep`` saves. Steps: those written more than ``keep`` steps before ``current``
    (sd-scripts' ``--save_last_n_steps`` is a distance in steps, not a count). None keeps everything; numbers
    above ``current`` (a later run's leftovers) are never touched."""
    if keep is None:
        return []
    past = sorted(n for n in numbers if n <= current)
    if cadence == "epoch":
        return past[:-keep] if keep < len(past) else []
    return [n for n in past if n < current - keep]


@dataclass(frozen=True)
class Retention:
    """How many checkpoint files and states one cadence keeps (None: all)."""

    files: int | None
    states: int | None


def _file_run_name(path: Path) -> str | None:
    """The run a weights file was written by (its ``ss_output_name``), or None when it does not say."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("ss_output_name")
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return None


def _summary(state: Path) -> dict:
    """A state's summary, or ``{}`` when it cannot be read (then nothing proves the state is this run's)."""
    try:
        return read_summary(state) or {}
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        return {}


def _state_run_name(summary: dict) -> str | None:
    """The run a state was written by (its summary's ``output_name``), or None when it does not say."""
    name = summary.get("output_name")
    return name if isinstance(name, str) else None


def existing(output_dir: Path, output_name: str, cadence: Cadence) -> tuple[list[int], list[int]]:
    """(numbers of the checkpoint files, numbers of the checkpoint states) of this cadence in ``output_dir``,
    written by this run: a checkpoint name is also another run's possible ``--output_name`` (``lora-000001``), so
    each file's and state's own record of its run decides, not its name alone."""
    files, states = [], []
    if not output_dir.is_dir():
        return files, states
    for entry in output_dir.iterdir():
        if entry.name.endswith(".safetensors") and entry.is_file():
            found = parse_checkpoint(output_name, entry.name[: -len(".safetensors")])
            if found is not None and found.cadence == cadence and _file_run_name(entry) == output_name:
                files.append(found.number)
        elif entry.name.endswith("-state") and (entry / SUMMARY_FILE).is_file():
            found = parse_checkpoint(output_name, entry.name[: -len("-state")])
            if found is not None and found.cadence == cadence and _state_run_name(_summary(entry)) == output_name:
                states.append(found.number)
    return files, states


def prune(output_dir: Path, output_name: str, cadence: Cadence, current: int, retention: Retention,
          remove_weights: RemoveWeights) -> list[str]:
    """Delete what ``retention`` no longer keeps after the checkpoint at ``current``; the names deleted."""
    files, states = existing(output_dir, output_name, cadence)
    removed = []
    for number in to_remove(files, cadence, current, retention.files):
        name = checkpoint_name(output_name, cadence, number)
        for extra in (f"{name}.json", f"{name}-attacker.safetensors"):
            (output_dir / extra).unlink(missing_ok=True)
        # last: the weights file is what makes it a checkpoint here (existing), so a prune killed before it is
        # finished by the next one, never leaving a record or proxy file that no later prune sees
        remove_weights(output_dir, name)
        removed.append(name)
    for number in to_remove(states, cadence, current, retention.states):
        name = checkpoint_name(output_name, cadence, number)
        remove_dir(output_dir / f"{name}-state")  # whole or not at all: a kill midway leaves no half state
        removed.append(f"{name}-state")
    return removed


def latest_state(output_dir: Path, output_name: str) -> Path | None:
    """The state of ``<output_dir>/<output_name>`` (final or intermediate) written last: the newest progress of
    whichever run last trained under that name (an ``--overwrite`` retrain killed at step 12 continues from there,
    not from the replaced run's final state at step 60). States of other runs are skipped by their summary's
    ``output_name``; one too old to record it counts by its name."""
    if not output_dir.is_dir():
        return None
    best: tuple[int, int, Path] | None = None
    for entry in output_dir.iterdir():
        summary_file = entry / SUMMARY_FILE
        if not entry.name.endswith("-state") or not summary_file.is_file():
            continue
        stem = entry.name[: -len("-state")]
        if stem != output_name and parse_checkpoint(output_name, stem) is None:
            continue
        summary = _summary(entry)
        recorded = _state_run_name(summary)
        if recorded is not None and recorded != output_name:
            continue
        step = summary.get("global_step", -1)
        key = (summary_file.stat().st_mtime_ns, step if isinstance(step, int) else -1, entry)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


__all__ = ["Checkpoint", "LATEST", "Retention", "checkpoint_name", "existing", "latest_state", "parse_checkpoint",
           "prune", "to_remove"]
