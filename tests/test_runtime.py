"""library.runtime: what a record says produced it, and what a cache keys on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library import runtime

REPO = Path(runtime.__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="not run from a git checkout")
def test_provenance_names_the_command_and_the_checkouts_commit():
    record = runtime.provenance()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True)
    assert record["command"] == sys.argv and record["git_commit"] == head.stdout.strip()
    assert record["git_dirty"] is bool(status.stdout.strip())


def test_an_installed_copy_records_no_commit_of_a_folder_around_it(tmp_path, monkeypatch):
    # site-packages inside some user's repository must not record that repository's commit
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    package = tmp_path / "site-packages" / "library"
    package.mkdir(parents=True)
    monkeypatch.setattr(runtime, "__file__", str(package / "runtime.py"))
    runtime._git_commit.cache_clear()
    try:
        assert "git_commit" not in runtime.provenance()
    finally:
        runtime._git_commit.cache_clear()


def test_the_kernel_signature_names_what_moves_a_results_last_bits():
    """Caches key on it (docs/determinism.md): the thread count and the batch size each give another signature,
    the same set-up the same one."""
    cpu = torch.device("cpu")
    with runtime.torch_threads(1):
        one = runtime.kernel_signature(cpu, 8)
        assert runtime.kernel_signature(cpu, 8) == one and runtime.kernel_signature(cpu, 4) != one
    with runtime.torch_threads(2):
        assert runtime.kernel_signature(cpu, 8) != one
    assert torch.__version__ in one and torch.backends.cpu.get_cpu_capability() in one
