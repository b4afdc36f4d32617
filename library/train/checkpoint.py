"""Resumable training state: written atomically, read back safely.

A state directory holds one ``state.pt`` (tensors, numbers and plain containers only, loaded with
``torch.load(weights_only=True)`` so a tampered file cannot run code) and a human-readable
``train_state.json``. The directory is built under a temporary name and renamed into place, so an
interrupted save leaves the previous state intact.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from library.errors import TrainingError
from library.fileio import (
    OLD_MARK,
    replace_dir,
    storage_errors_named,
    temporary_dir,
    unpickling_failure,
)

STATE_FILE = "state.pt"
SUMMARY_FILE = "train_state.json"


def save_state(directory: str | os.PathLike, state: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory`` atomically (replacing an older state there)."""
    target = Path(directory)
    tmp = temporary_dir(target)
    try:
        with storage_errors_named(target):
            with open(tmp / STATE_FILE, "wb") as handle:  # a Python file: a full disk is an OSError, not a
                torch.save(state, handle)                   # bare RuntimeError of torch's C++ writer
            (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
            replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_summary(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The state's ``train_state.json`` (step, method, run identity, config), read before any model work;
    None when only ``state.pt`` is there. A missing state folder or an unreadable summary is a clear error."""
    directory = Path(directory)
    if not directory.is_dir():
        aside = sorted(directory.parent.glob(f".{glob.escape(directory.name)}{OLD_MARK}*.tmp/{glob.escape(directory.name)}"))
        if aside:  # a replace_dir killed between its two renames
            raise TrainingError(f"cannot resume: {directory} was moved aside by a save that was killed; it is intact at "
                                f"{aside[0]}: move it back to {directory} (a training into {directory.parent} does "
                                "that when it starts)")
        raise TrainingError(f"cannot resume: {directory} is not a folder (pass a directory written by --save_state)")
    path = directory / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TrainingError(f"cannot resume: {path} is unreadable ({exc}); pass a directory written by "
                            "--save_state") from None
    if not isinstance(summary, dict):
        raise TrainingError(f"cannot resume: {path} is not a training-state summary")
    return summary


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format


def check_state_file(directory: str | os.PathLike) -> None:
    """Before any model work: ``state.pt`` is there and looks like a torch archive (a truncated or foreign file
    is one line now, not after the latents are encoded). A run's output folder given instead of one of its
    states names the states inside it."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        inside = sorted(p.name for p in directory.iterdir() if (p / SUMMARY_FILE).is_file()) if directory.is_dir() else []
        hint = f"; the states in that folder: {', '.join(inside)}" if inside else ""
        raise TrainingError(f"cannot resume: {path} not found (pass a directory written by --save_state{hint})")
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            raise TrainingError(f"cannot resume: {path} is corrupt or not a training state (not a torch archive)")
    try:  # the archive's directory is at its end: a truncated copy has none
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise TrainingError(f"cannot resume: {path} is corrupt or not a training state (truncated? {exc})") from None
    if not any(name.endswith("/data.pkl") for name in names):
        raise TrainingError(f"cannot resume: {path} is corrupt or not a training state (a zip file, not a torch one)")


def load_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state`; a missing or corrupt one is a clear error."""
    check_state_file(directory)
    path = Path(directory) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise TrainingError(f"cannot resume: {path} is corrupt or not a training state "
                            f"({unpickling_failure(exc)})") from None
