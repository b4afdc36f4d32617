"""Output folders: checked before any long computation, locked while a run writes, swept of stale temporaries.

Every writer in the toolkit stages its files as hidden ``.<name>.<random>.tmp`` siblings (files from
:func:`library.fileio.atomic_write_path`, folders from :func:`library.fileio.temporary_dir`) and renames them
into place. A run killed with ``kill -9`` can leave such temporaries behind; the next run that holds the
folder's lock knows no other writer is alive and removes them. A script that writes one file or folder into a
folder it does not lock (make_split.py, make_tiny_model.py) removes those of its own output's name instead
(:func:`remove_leftovers_of`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Callable, Sequence

from library.errors import ConfigError, warn
from library.fileio import OLD_MARK, restore_swapped_out

LOCK_FILE = ".smp-lora.lock"
TEMP_SUFFIX = ".tmp"


def check_output_dir(path: str | os.PathLike, flag: str, *, create: bool = True) -> Path:
    """``path`` as a folder this process can write to; created (with parents) unless ``create`` is False.

    A path that is a file, lies under a file, or cannot be written is a :class:`ConfigError` naming ``flag``,
    raised before anything is computed, so a long run is never lost at its final save. With ``create=False``
    (``--dry_run``) nothing is created: the nearest existing ancestor must be a writable folder.
    """
    target = Path(path)
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == target else f"lies under the file {existing}"
        raise ConfigError(f"{flag} {target} {where}; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {target}: cannot write to {existing} (permission denied); choose a writable folder")
    if not create:
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=target, prefix=".write-probe.", suffix=TEMP_SUFFIX)
        os.close(handle)
        # Gone already is fine: the lock's sweep (OutputLock) of a run's main process may remove it while another
        # rank of the same run checks the folder; creating it was the test.
        Path(probe).unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {target}: cannot write there ({exc.strerror or exc}); choose a writable folder") from None
    return target


def check_inside(folder: str | os.PathLike, name: str, flag: str) -> str:
    """``name`` as a plain file name inside ``folder``: no separators, no ``..``, not hidden, not empty."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ConfigError(f"{flag} {name!r} must be a plain file name without folders (it is written into {folder})")
    if name.startswith("."):
        raise ConfigError(f"{flag} {name!r} must not start with '.' (hidden names are the toolkit's temporaries)")
    return name


class OutputLock:
    """An exclusive lock on an output folder for the duration of a run.

    A second run into the same folder fails at once with one clear line instead of both finishing and the
    last one silently overwriting the other; with ``wait``, it waits for the first instead (work that the second
    then finds done). The lock is an ``flock`` on ``<folder>/.smp-lora.lock``: the kernel releases it when the
    process dies, so a killed run never leaves the folder locked. Its stale temporaries, and those of the
    ``owned`` subfolders (ones only this folder's run writes, as a training's ``sample/``), are removed once the
    lock is held.
    """

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir", *, wait: bool = False,
                 owned: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.flag = flag
        self.wait = wait
        self.owned = tuple(owned)
        self._handle: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl  # noqa: PLC0415 - POSIX only; elsewhere runs are not locked
        except ImportError:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not self.wait:
                os.close(handle)
                raise in_use(self.flag, self.folder) from None
            # A silent wait looks like a hang: say whose turn it is
            print(f"{_held_elsewhere(self.flag, self.folder)}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        self._handle = handle
        remove_stale_temporaries(self.folder)
        for name in self.owned:
            if (self.folder / name).is_dir():
                remove_stale_temporaries(self.folder / name)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor releases the flock
            self._handle = None


def _held_elsewhere(flag: str, folder: Path) -> str:
    return f"{flag} {folder} is in use by another run (it holds {LOCK_FILE})"


def in_use(flag: str, folder: Path) -> ConfigError:
    """The refusal of a folder another run holds locked."""
    return ConfigError(f"{_held_elsewhere(flag, folder)}; wait for it to finish or choose another folder")


def check_not_locked(folder: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Refuse (:func:`in_use`) a folder whose :class:`OutputLock` another run holds now, without taking it or writing
    anything: a check before minutes of work that would end at the lock anyway (the lock itself still decides)."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only; elsewhere runs are not locked
    except ImportError:
        return
    try:
        handle = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file (or none readable): no run holds it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise in_use(flag, Path(folder)) from None
    finally:
        os.close(handle)  # releases it, had this taken it


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.*.tmp`` files and folders directly in ``folder``; returns what was removed.

    A folder that a killed :func:`library.fileio.replace_dir` had moved aside (a resumable state, say) and not
    yet replaced is first put back where it was. Only call this while holding the folder's :class:`OutputLock`:
    then no live writer owns them.
    """
    return _remove_temporaries(Path(folder), lambda name: name.startswith(".") and name.endswith(TEMP_SUFFIX))


def remove_leftovers_of(target: str | os.PathLike) -> list[Path]:
    """Remove what a killed atomic write of ``target`` (a file or folder that a script replaces whole, outside any
    locked folder: a split manifest, a model folder) left beside it: its staging ``.<name>.<random>.tmp`` and a
    swap's ``.<name>.old.<random>.tmp``, whose older ``target`` is first put back if nothing took its place.
    Returns what was removed.

    Only the temporaries of ``target``'s own name: the others in its folder may be a live writer's. Call it at the
    start of the script that writes ``target``; a second run of it on the same ``target`` at the same time (a race
    for the one name anyway) may see its staging removed and fail; one complete ``target`` survives either way.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    # tempfile's random part has no dots, so ".a.b.x.tmp" (of a target "a.b") is no temporary of a target "a"
    aside = re.escape(OLD_MARK[:-1])
    own = re.compile(rf"\.{re.escape(target.name)}(?:{aside})?\.[a-z0-9_]+{re.escape(TEMP_SUFFIX)}")
    existed = target.exists()
    removed = _remove_temporaries(target.parent, lambda name: own.fullmatch(name) is not None)
    if removed:
        names = ", ".join(p.name for p in removed)
        back = f"; put back the older {target} it had moved aside" if target.exists() and not existed else ""
        warn(f"removed {len(removed)} leftover(s) of an interrupted write of {target} ({names}){back}")
    return removed


def _remove_temporaries(folder: Path, is_temporary: Callable[[str], bool]) -> list[Path]:
    """Remove the entries of ``folder`` whose name ``is_temporary`` (after putting back a folder a killed swap had
    moved into one); returns them."""
    removed = []
    for entry in sorted(folder.iterdir()):
        if not is_temporary(entry.name):
            continue
        restore_swapped_out(entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
