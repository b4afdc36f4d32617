"""library.runtime: what a record says produced it, and what a cache keys on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from library import runtime
from library.errors import ConfigError

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


def test_hashed_seeds_stay_the_values_recorded_runs_were_drawn_with():
    """A seed derived differently (another separator, digest slice or mask) would silently change every seeded run."""
    assert runtime.hashed_seed("a", 1) == 6864898492260683752  # its top bit is masked off: 63 bits
    assert runtime.hashed_seed("noise", 3, "abc") == 8767218884238172253


def test_zero_torch_threads_is_one_config_error_line():
    """A thread count below 1 must be the one-line refusal, not torch's RuntimeError traceback mid-run."""
    with pytest.raises(ConfigError, match="threads must be at least 1, got 0"):
        runtime.configure_torch(0)


def test_torch_setup_says_whether_denormals_are_flushed():
    """The worker-vs-parent comparison is only as good as this flag: flushing denormals moves small floats to 0."""
    assert runtime.torch_setup()["flush_denormal"] is False  # torch's default
    if torch.set_flush_denormal(True):  # False where the CPU cannot flush
        try:
            assert runtime.torch_setup()["flush_denormal"] is True
        finally:
            torch.set_flush_denormal(False)


def test_deterministic_kernels_are_switched_on_only_when_asked_and_only_warn(torch_defaults_restored):
    """--full_determinism must not stop a run at an op without a deterministic kernel; without it, nothing changes."""
    runtime.seed_torch(0)
    assert not torch.are_deterministic_algorithms_enabled()
    runtime.seed_torch(0, full_determinism=True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark  # no autotuner's pick


def test_a_cpu_process_owns_no_cuda_random_state():
    """fork_rng on the CPU must not touch (or, without CUDA, fail on) a GPU's generator."""
    assert runtime.cuda_devices(torch.device("cpu")) == []


def test_eval_mode_gives_each_submodule_its_own_mode_back():
    """A frozen submodule left in eval mode must stay there after the block: else its dropout turns on in training."""
    frozen = torch.nn.Dropout(0.5).eval()
    model = torch.nn.Sequential(torch.nn.Linear(1, 1), frozen)
    with runtime.eval_mode(model, None):
        assert not model.training and not frozen.training
    assert model.training and not frozen.training
