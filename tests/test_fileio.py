"""Atomic folder replacement: one interruption never loses both the old folder and the new one."""

from __future__ import annotations

import os

import pytest

from library.fileio import replace_dir, temporary_dir
from library.outputs import remove_stale_temporaries


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


def test_a_swapped_out_folder_is_not_restored_over_its_replacement(tmp_path):
    _folder(tmp_path / ".run-state.old.x9.tmp" / "run-state", "old")
    _folder(tmp_path / "run-state", "new")  # the swap finished; only the clean-up was cut short
    remove_stale_temporaries(tmp_path)
    assert (tmp_path / "run-state" / "state.pt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]
