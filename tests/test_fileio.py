"""Atomic folder replacement: one interruption never loses both the old folder and the new one."""

from __future__ import annotations

import errno
import os
import tempfile
import types
from pathlib import Path

import pytest

from library.errors import OutputError
from library.fileio import (
    atomic_write_text,
    replace_dir,
    storage_errors_named,
    temporary_dir,
    write_safetensors,
)
from library.outputs import check_output_dir, remove_stale_temporaries


def _folder(path, text):
    path.mkdir(parents=True, exist_ok=True)
    (path / "state.pt").write_text(text)
    return path


def test_replace_dir_swaps_the_folder_and_leaves_nothing_behind(tmp_path):
    target = _folder(tmp_path / "run-state", "old")
    staging = _folder(temporary_dir(target), "new")
    replace_dir(staging, target)
    assert (target / "state.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = _folder(tmp_path / "run-state", "old")
    staging = _folder(temporary_dir(target), "new")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new folder's rename into place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(staging, target)
    assert (target / "state.pt").read_text() == "old"
    assert not list(tmp_path.glob(".run-state.old.*"))


def test_a_swap_killed_between_its_renames_is_undone_at_the_next_start(tmp_path):
    # What a SIGKILL after the first rename leaves: the old folder moved aside, the new one still staged.
    aside = tmp_path / ".run-state.old.k1ll3d.tmp"
    _folder(aside / "run-state", "old")
    _folder(tmp_path / ".run-state.abc123.tmp", "new")
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "run-state" / "state.pt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]


def test_resuming_a_state_moved_aside_by_a_killed_swap_says_where_it_is(tmp_path):
    """Until a run into its folder puts it back, --resume of that state names where it lies (not "no folder")."""
    from library.errors import TrainingError
    from library.train.checkpoint import read_summary

    _folder(tmp_path / ".run-state.old.k1ll3d.tmp" / "run-state", "old")
    with pytest.raises(TrainingError, match=r"moved aside by a save that was killed; it is intact at .*"
                                            r"\.run-state\.old\.k1ll3d\.tmp/run-state"):
        read_summary(tmp_path / "run-state")
    with pytest.raises(TrainingError, match="is not a folder"):
        read_summary(tmp_path / "other-state")


def test_a_swapped_out_folder_is_not_restored_over_its_replacement(tmp_path):
    _folder(tmp_path / ".run-state.old.x9.tmp" / "run-state", "old")
    _folder(tmp_path / "run-state", "new")  # the swap finished; only the clean-up was cut short
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "run-state" / "state.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]


def test_a_full_disk_is_one_line_naming_the_file_and_the_older_file_survives(tmp_path, monkeypatch):
    import torch

    target = tmp_path / "lora.safetensors"
    write_safetensors(target, {"w": torch.ones(2)})
    before = target.read_bytes()

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OutputError, match=r"cannot write .*notes\.txt: No space left on device.*run again"):
        atomic_write_text(tmp_path / "notes.txt", "x")
    monkeypatch.setattr("library.fileio.open", lambda *a, **k: full(None), raising=False)  # fileio's open only
    with pytest.raises(OutputError, match=r"lora\.safetensors: No space left on device"):
        write_safetensors(target, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_a_file_size_limit_in_torch_and_safetensors_writers_is_one_line(tmp_path):
    """torch's zip writer and safetensors' Rust writer do not raise OSError: the real writers, under a real limit
    (RLIMIT_FSIZE, as `ulimit -f`; Python ignores SIGXFSZ, so a write past it fails with EFBIG)."""
    import resource

    import torch
    from safetensors.torch import save_file

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OutputError, match=r"cannot write .*state: File too large; nothing was replaced"):
            with storage_errors_named(tmp_path / "state"), open(tmp_path / "state.pt", "wb") as handle:
                torch.save({"w": torch.zeros(10_000)}, handle)
        with pytest.raises(OutputError, match=r"cannot write .*model: File too large"):
            with storage_errors_named(tmp_path / "model"):
                save_file({"w": torch.zeros(10_000)}, str(tmp_path / "w.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(RuntimeError, match="not a storage error"), storage_errors_named(tmp_path / "x"):
        raise RuntimeError("not a storage error")


def test_other_os_errors_are_not_relabelled(tmp_path, monkeypatch):
    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(PermissionError):
        atomic_write_text(tmp_path / "notes.txt", "x")


def test_an_unpickling_refusal_names_the_object_and_never_advises_the_unsafe_load(tmp_path):
    import pickle

    import torch

    from library.fileio import unpickling_failure

    class RunsCode:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"x": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError) as info:
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert "weights_only" in str(info.value) and "\x1b[" in str(info.value)  # what torch says ...
    reason = unpickling_failure(info.value)  # ... and what we say
    assert reason == "it holds Python objects (print) besides tensors, which are not unpickled"
    assert unpickling_failure(RuntimeError("PytorchStreamReader failed\nmore")) == "RuntimeError: PytorchStreamReader failed"


def test_a_safetensors_header_is_canonical_so_seeded_runs_write_identical_bytes(tmp_path):
    """safetensors orders the metadata by a per-process hash map: the header is re-encoded with sorted keys (and
    the format's 8-byte padding), so the same weights give the same sha256 in every process."""
    import json

    import torch
    from safetensors import safe_open

    metadata = {f"ss_key{i}": str(i) for i in (3, 1, 4, 15, 9, 2, 6)}
    write_safetensors(tmp_path / "w.safetensors", {"b": torch.ones(2), "a": torch.zeros(3)}, metadata)
    raw = (tmp_path / "w.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length]
    assert length % 8 == 0
    assert header.rstrip(b" ") == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()
    with safe_open(tmp_path / "w.safetensors", "pt") as handle:
        assert handle.metadata() == metadata and torch.equal(handle.get_tensor("b"), torch.ones(2))


def test_a_killed_save_of_a_name_with_old_in_it_is_not_mistaken_for_a_swapped_out_folder(tmp_path):
    """Only ``.<name>.old.<random>.tmp/<name>`` is a moved-aside folder: the staging folder of a run named
    ``v1.old.2-state`` holds the new content's files, which must not be put beside the outputs at the next start."""
    staging = _folder(temporary_dir(tmp_path / "v1.old.2-state"), "half-written")
    remove_stale_temporaries(tmp_path)
    assert not (tmp_path / "state.pt").exists() and not staging.exists()


def test_atomic_files_and_staged_folders_get_the_permissions_a_plain_write_would(tmp_path):
    """mkstemp and mkdtemp make private files: a LoRA, record or state written through them must still be
    readable by whoever the user's umask lets read a file they write."""
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "notes.txt", "x")
        staging = temporary_dir(tmp_path / "run-state")
    finally:
        os.umask(umask)
    assert (tmp_path / "notes.txt").stat().st_mode & 0o777 == 0o644
    assert staging.stat().st_mode & 0o777 == 0o755


def test_json_safe_turns_numpy_paths_and_non_finite_floats_into_strict_json():
    """Run records are strict JSON: numpy scalars and paths must become JSON values, NaN/inf null, finite floats stay."""
    import json

    import numpy as np

    from library.fileio import json_safe

    value = {"step": np.int64(3), "loss": np.float32(0.5), "bad": float("nan"), "path": Path("a/b"), "xs": (1.5,)}
    assert json.dumps(json_safe(value), allow_nan=False) == \
        '{"step": 3, "loss": 0.5, "bad": null, "path": "a/b", "xs": [1.5]}'


def test_a_safetensors_error_other_than_a_full_storage_is_not_relabelled(tmp_path):
    """safetensors' Rust writer names its errno only in words: a denied write is not "free space and run again"."""
    class SafetensorError(Exception):  # the name safetensors' writer raises under
        pass

    with pytest.raises(SafetensorError), storage_errors_named(tmp_path / "w.safetensors"):
        raise SafetensorError("Error while serializing: IoError(Os { code: 13 }) (os error 13)")


def test_an_unreadable_state_is_named_without_terminal_colour_codes():
    """torch colours some messages: the one-line refusal printed to a log must carry only the words."""
    from library.fileio import unpickling_failure

    assert unpickling_failure(RuntimeError("\x1b[1mPytorchStreamReader failed\x1b[0m")) == \
        "RuntimeError: PytorchStreamReader failed"


def test_an_atomic_write_creates_the_folders_it_writes_into(tmp_path):
    """Reports and records go to folders that may not exist yet (a new --output_dir): the write makes them."""
    atomic_write_text(tmp_path / "new" / "sub" / "notes.txt", "x")
    assert (tmp_path / "new" / "sub" / "notes.txt").read_text() == "x"


def test_a_write_probe_swept_by_the_main_ranks_lock_is_no_refusal(tmp_path, monkeypatch):
    """On two ranks, the main one's lock sweeps the folder's hidden temporaries (OutputLock) while the other rank may
    still be checking that folder: its write probe, swept right after it was made, is no "cannot write there" (a
    two-process CI run failed so on Python 3.11). The sweep here runs as soon as the probe exists."""
    import library.outputs as outputs

    def swept_after(make):
        def make_then_sweep(*args, **kwargs):
            made = make(*args, **kwargs)
            remove_stale_temporaries(kwargs["dir"])
            return made
        return make_then_sweep

    monkeypatch.setattr(outputs, "tempfile", types.SimpleNamespace(
        mkstemp=swept_after(tempfile.mkstemp), NamedTemporaryFile=swept_after(tempfile.NamedTemporaryFile)))
    assert check_output_dir(tmp_path / "out", "--output_dir") == tmp_path / "out"
    assert list((tmp_path / "out").iterdir()) == []  # the probe leaves nothing behind


def test_a_waiting_lock_waits_for_the_run_that_holds_it_instead_of_refusing(tmp_path):
    """``wait=True`` (the demo's shared preparation) must queue behind the holder, not fail like a second run."""
    import threading

    from library.errors import ConfigError
    from library.outputs import OutputLock

    entered, refusals = threading.Event(), []

    def second_run() -> None:
        try:
            with OutputLock(tmp_path, wait=True):
                entered.set()
        except ConfigError as exc:
            refusals.append(exc)

    with OutputLock(tmp_path):
        waiter = threading.Thread(target=second_run, daemon=True)
        waiter.start()
        waiter.join(0.3)
        assert not entered.is_set() and not refusals  # still waiting while the first run holds the folder
    waiter.join(10)
    assert entered.is_set() and not refusals


def test_a_waiting_lock_says_it_waits_and_a_free_one_says_nothing(tmp_path, capfd):
    """A queued run that prints nothing looks hung; one that did not have to wait has nothing to say."""
    import threading

    from library.outputs import OutputLock

    with OutputLock(tmp_path, wait=True):
        pass
    assert capfd.readouterr().err == ""

    def second_run() -> None:
        with OutputLock(tmp_path, "--workdir", wait=True):
            pass

    with OutputLock(tmp_path, "--workdir"):
        waiter = threading.Thread(target=second_run, daemon=True)
        waiter.start()
        waiter.join(0.3)
    waiter.join(10)
    assert not waiter.is_alive()
    assert capfd.readouterr().err.strip() == f"--workdir {tmp_path} is in use by another run (it holds " \
                                              ".smp-lora.lock); waiting for it"


def test_checking_a_lock_refuses_a_held_folder_and_takes_nothing_from_a_free_one(tmp_path):
    """check_not_locked: the held folder is the lock's own refusal; a free one stays free (a run then takes it) and
    a folder never locked gets no lock file (a check writes nothing)."""
    from library.errors import ConfigError
    from library.outputs import OutputLock, check_not_locked

    check_not_locked(tmp_path / "never", "--output_dir")
    assert not (tmp_path / "never").exists()
    with OutputLock(tmp_path / "out"):
        with pytest.raises(ConfigError, match=f"^--output_dir {tmp_path / 'out'} is in use by another run"):
            check_not_locked(tmp_path / "out", "--output_dir")
    check_not_locked(tmp_path / "out", "--output_dir")
    with OutputLock(tmp_path / "out"):  # the check released what it took
        pass


def test_the_locks_sweep_removes_only_hidden_temporaries_not_a_users_tmp_files(tmp_path):
    """The toolkit's temporaries are hidden; a user's own ``notes.tmp`` in the output folder is theirs to keep."""
    (tmp_path / "notes.tmp").write_text("mine")
    (tmp_path / ".lora.safetensors.k1ll3d.tmp").write_bytes(b"half a file")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".lora.safetensors.k1ll3d.tmp"]
    assert (tmp_path / "notes.tmp").read_text() == "mine"


def test_leftovers_of_a_target_are_its_own_not_those_of_a_name_ending_like_it(tmp_path):
    """``.x.s.json.<random>.tmp`` is the live staging of another target ``x.s.json``: sweeping ``s.json``'s keeps it."""
    from library.outputs import remove_leftovers_of

    for name in (".s.json.k1.tmp", ".x.s.json.k2.tmp"):
        (tmp_path / name).write_text("{half")
    assert [p.name for p in remove_leftovers_of(tmp_path / "s.json")] == [".s.json.k1.tmp"]
    assert (tmp_path / ".x.s.json.k2.tmp").exists()


def test_a_linked_temporary_is_unlinked_and_what_it_points_to_is_kept(tmp_path):
    """A hidden ``.*.tmp`` link into a user's folder goes at the sweep; the folder it points to must not."""
    kept = _folder(tmp_path / "elsewhere", "theirs")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".linked.k1.tmp").symlink_to(kept, target_is_directory=True)
    remove_stale_temporaries(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == [] and (kept / "state.pt").read_text() == "theirs"


def _record_durability(monkeypatch) -> list[tuple[str, str]]:
    """Record, in order, each fsync (of which path, by its inode) and each rename."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    paths: dict[int, str] = {}

    def opened(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        paths[fd] = os.fspath(path)
        return fd

    monkeypatch.setattr(os, "open", opened)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", paths.get(fd, "?"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", f"{a} -> {b}")), real_replace(a, b)))
    return events


def test_an_atomic_write_flushes_the_data_before_publishing_it_and_the_rename_after(tmp_path, monkeypatch):
    """A power cut must not leave a published name over data that never reached the disk: the temporary file is
    fsynced before the rename, the folder (the rename) after it."""
    events = _record_durability(monkeypatch)
    atomic_write_text(tmp_path / "a.json", "{}")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert Path(events[0][1]).name.startswith(".a.json.") and events[2][1] == str(tmp_path)


def test_a_folder_swap_flushes_every_staged_file_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "state"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = temporary_dir(target)
    (staging / "sub").mkdir()
    (staging / "state.pt").write_bytes(b"new")
    (staging / "sub" / "x.bin").write_bytes(b"x")
    events = _record_durability(monkeypatch)
    replace_dir(staging, target)
    first_swap = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
    flushed = {Path(p).relative_to(staging).as_posix() for kind, p in events[:first_swap] if kind == "fsync"}
    assert flushed == {".", "state.pt", "sub", "sub/x.bin"}
    assert events[-1] == ("fsync", str(tmp_path)) and (target / "state.pt").read_bytes() == b"new"


def test_fsync_on_windows_skips_folders_and_opens_files_for_writing(tmp_path, monkeypatch):
    """Windows can neither open a folder nor flush a read-only descriptor: folders are skipped, files opened
    read-write (a plain read-only open elsewhere)."""
    import library.fileio as fileio

    (tmp_path / "f.bin").write_bytes(b"x")
    flags: list[int] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, f, *a: (flags.append(f), real_open(path, f, *a))[1])
    fileio.fsync_path(tmp_path / "f.bin")
    fileio.fsync_path(tmp_path)
    assert flags == [os.O_RDONLY, os.O_RDONLY]
    monkeypatch.setattr(fileio, "_WINDOWS", True)
    flags.clear()
    fileio.fsync_path(tmp_path / "f.bin")
    fileio.fsync_path(tmp_path)
    assert flags == [os.O_RDWR]


def test_a_folder_the_file_system_cannot_flush_is_no_error_but_a_file_is(tmp_path, monkeypatch):
    import library.fileio as fileio

    (tmp_path / "f.bin").write_bytes(b"x")

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    fileio.fsync_path(tmp_path)
    with pytest.raises(OSError):
        fileio.fsync_path(tmp_path / "f.bin")
