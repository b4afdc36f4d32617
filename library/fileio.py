"""Small file helpers: atomic writes and content hashes.

Every artefact the toolkit writes (LoRA files, states, manifests, reports) goes through
:func:`atomic_write_path` (or, for a folder, :func:`replace_dir`) so that an interrupted run never leaves a
half-written file behind. The new content is flushed to the disk (``fsync``) before the rename that publishes it,
and the rename itself after it: a kill leaves the old file or the new one, and so does a power cut or a crash of
the machine, which could otherwise leave a published name over a file whose data never reached the disk.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from library.errors import OutputError

_WINDOWS = os.name == "nt"
OLD_MARK = ".old."  # in the name of the folder replace_dir moves an older folder into while it swaps
#: errno values that mean "this storage takes no more writes": the user can fix them, so they are one line.
_STORAGE_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def storage_errors_named(target: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a full quota, a file-size limit or a read-only file system while writing ``target`` into
    one :class:`~library.errors.OutputError` line naming it (the atomic writers below leave the older file, if
    any, as it was). Writers in other languages report it in their own words: torch's zip writer (given a Python
    file) as a ``RuntimeError`` raised while the ``OSError`` is handled, safetensors' Rust writer as
    ``... (os error 28)``; both are recognised."""
    try:
        yield
    except Exception as exc:
        code = _storage_errno(exc)
        if code is None:
            raise
        raise OutputError(f"cannot write {target}: {os.strerror(code)}; nothing was replaced (an earlier file there "
                          "is intact): free space and run again") from None


def _storage_errno(exc: BaseException) -> int | None:
    """The storage errno behind ``exc`` (itself, or what it was raised while handling), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _STORAGE_FULL:
            return seen.errno
        found = re.search(r"\(os error (\d+)\)", str(seen)) if type(seen).__name__ == "SafetensorError" else None
        if found and int(found.group(1)) in _STORAGE_FULL:
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    The rename is atomic on POSIX file systems, so readers see either the old file or the new one.
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with storage_errors_named(target):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, target)
            fsync_path(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (the names renamed into it), to the disk.

    Windows cannot open a folder to flush it (NTFS journals the names itself) and flushes only a file opened for
    writing; a file system that cannot flush a folder (EINVAL) keeps its names as durable as it can.
    """
    folder = os.path.isdir(path)
    if folder and _WINDOWS:
        return
    fd = os.open(path, os.O_RDWR if _WINDOWS else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno == errno.EINVAL):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """:func:`fsync_path` every file and folder under ``root`` (files first, then their folders) and ``root``."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def temporary_dir(target: str | os.PathLike) -> Path:
    """A fresh hidden staging folder ``.<name>.<random>.tmp`` beside ``target``, with the user's umask.

    Build the folder's content there, then :func:`replace_dir` it into place; a run killed meanwhile leaves
    only a ``.tmp`` folder, which :func:`library.outputs.remove_stale_temporaries` recognises.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; the finished folder should not be
    return staging


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``staging`` to ``target``, replacing an older ``target`` if there is one.

    ``staging`` must be a sibling of ``target`` (same file system). The older folder is first renamed into a
    fresh private folder ``.<name>.old.<random>.tmp/<name>`` beside it, so a leftover from an earlier interrupted
    swap can never block this one, and then deleted: a reader sees the old folder or the new one, never a mix.
    Two renames are not one: if the second fails, the old folder is put back; if the process dies between them,
    :func:`library.outputs.remove_stale_temporaries` (or ``remove_leftovers_of``) puts it back at the next start.
    Either way one of the two folders survives.
    """
    staging, target = Path(staging), Path(target)
    fsync_tree(staging)  # its files may come from writers that never flush (torch.save, write_text)
    if not target.exists():
        os.replace(staging, target)
        fsync_path(target.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", suffix=".tmp", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old / target.name, target)
        old.rmdir()
        raise
    fsync_path(target.parent)
    shutil.rmtree(old)


def remove_dir(target: str | os.PathLike) -> None:
    """Delete the folder ``target`` so that it is gone whole or not at all: it is first renamed to a hidden
    ``.<name>.<random>.tmp`` beside it, then deleted. ``shutil.rmtree`` alone, killed halfway, would leave a
    visible half folder (a state without its summary: no state to resume, and none that a later prune sees);
    a kill now leaves only the temporary, which :func:`library.outputs.remove_stale_temporaries` removes."""
    target = Path(target)
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.replace(target, aside)  # a folder may be renamed over an empty one
    shutil.rmtree(aside)


def restore_swapped_out(entry: str | os.PathLike) -> bool:
    """Put back the folder a :func:`replace_dir` killed between its two renames had moved aside into ``entry``
    (``.<name>.old.<random>.tmp/<name>``) when nothing has taken its place; True when it did."""
    entry = Path(entry)
    for child in entry.iterdir() if entry.is_dir() and OLD_MARK in entry.name else ():
        target = entry.parent / child.name
        if entry.name.startswith(f".{child.name}{OLD_MARK}") and not target.exists():
            os.replace(child, target)
            return True
    return False


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` and ``metadata`` as a safetensors file, atomically and with a canonical header.

    safetensors keeps metadata in a hash map whose order changes from process to process, so the same
    weights would give files with different sha256s. Re-encoding the header with sorted keys makes the
    bytes a function of the content: seeded runs write bit-identical files. Offsets in the header are
    relative to the data region, which is written as it is.
    """
    from safetensors.torch import save  # noqa: PLC0415 - keeps this core module free of torch at import

    raw = memoryview(save(dict(tensors), metadata=dict(metadata) if metadata is not None else None))
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(bytes(raw[8 : 8 + header_len]))
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header with spaces to 8-byte alignment
    with atomic_write_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        handle.write(raw[8 + header_len :])


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can hold it: numpy scalars and arrays to Python, NaN/inf to None, paths to str."""
    import numpy as np  # noqa: PLC0415

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks (works for multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpickling_failure(exc: BaseException) -> str:
    """One line on why a ``torch.load(..., weights_only=True)`` failed, without torch's advice to unpickle in full
    (which can run code: the one thing a refused file must not get) or its terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds Python objects{what} besides tensors, which are not unpickled"
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"

