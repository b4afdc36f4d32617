"""Process-level knobs shared by every layer: dtype names, torch thread control, hashed seeds, progress output."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import torch

from library.errors import ConfigError

#: ``--mixed_precision`` name -> the dtype the frozen models run in.
PRECISION_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--save_precision`` name -> the dtype a LoRA file is written in.
SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hashed_seed(*parts: object) -> int:
    """A 63-bit generator seed from ``parts`` joined with ``|``.

    Seeds derived this way depend only on what names the draw (a purpose, the run seed, a sample's key or
    hash, a slot), never on batch composition, order or process layout, which keeps seeded runs bit-identical.
    """
    text = "|".join(str(part) for part in parts)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) & ((1 << 63) - 1)


#: Environment variables read by the OpenMP, MKL and oneDNN runtimes under torch (thread counts, kernel choice).
_THREADING_ENV = ("OMP_", "MKL_", "KMP_", "ONEDNN_", "DNNL_")


def configure_torch(threads: int) -> None:
    """Set this process up to run a job with ``threads`` torch intra-op threads.

    The one set-up shared by a :class:`~library.workers.WorkerPool` worker (its initializer) and the in-process
    path (:func:`torch_threads`), so a job computes the same bits in either. The thread count is the only
    knob that differs between the two: a ``spawn``-ed worker starts from torch's defaults, and every other setting
    that can move a float (:func:`torch_setup`) was checked to be the same in both. It must be the same whatever the
    process layout, because it changes results: one and two threads give LoRA files that differ in the last bits
    (see docs/determinism.md).
    """
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(int(threads))


def torch_setup() -> dict[str, object]:
    """This process's torch settings that can change a float result; equal in a worker and in its parent."""
    tiny = torch.tensor([1e-39])  # a float32 denormal: 0 after a multiply when denormals are flushed
    return {
        "threads": torch.get_num_threads(),
        "flush_denormal": bool((tiny * 1.0).item() == 0.0),
        "mkldnn": torch.backends.mkldnn.enabled,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "default_dtype": str(torch.get_default_dtype()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_THREADING_ENV)},
    }


def seed_torch(seed: int, full_determinism: bool = False) -> None:
    """``torch.manual_seed(seed)``; with ``full_determinism`` also the switches that make a GPU repeat its bits.

    A GPU's fastest kernels are not all deterministic (atomic adds in backward passes, cuDNN's autotuner
    choosing another algorithm, cuBLAS' split-K workspaces), so two seeded GPU runs can differ in the last bits
    and drift apart. This turns on torch's deterministic algorithms (``warn_only``: an op without a
    deterministic kernel warns instead of stopping a run), cuDNN's deterministic mode without autotuning, and
    the cuBLAS workspace setting torch asks for (it must precede the first cuBLAS call, so call this before
    any model runs). CPU kernels are deterministic at a fixed thread count already (docs/determinism.md).
    """
    if full_determinism:
        use_deterministic_kernels()
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """The switches of ``seed_torch(..., full_determinism=True)`` (process-wide; a spawned worker sets them again)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (:func:`configure_torch`), then restore the previous setting.

    Tiny models are dominated by per-op overhead; on a busy 2-core box one thread per process is often
    faster than two (threads spin waiting for each other), so the caller chooses. ``None`` keeps the setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        configure_torch(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def kernel_signature(device: torch.device, batch_size: int) -> str:
    """What picks the kernels of a forward pass on ``device``, besides its inputs' values: torch's version, the
    device (on the CPU its instruction set and this process's intra-op thread count, on a GPU its model) and the
    batch size. Each of these can move the last bits of a result (docs/determinism.md), so a cache keyed on it
    never serves a value that this process would have computed otherwise. Read it where the work runs (inside
    :func:`torch_threads`), not before."""
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type}:{torch.backends.cpu.get_cpu_capability()}:threads={torch.get_num_threads()}"
    return f"torch={torch.__version__}|{where}|batch={int(batch_size)}"


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Run the block with ``modules`` in eval mode (no dropout), then give every submodule its own mode back."""
    modes = [(m, m.training) for module in modules if module is not None for m in module.modules()]
    for module in modules:
        if module is not None:
            module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def cuda_devices(device: torch.device) -> list[int]:
    """The CUDA device indices whose random state belongs to a process on ``device`` (none on the CPU), for
    :func:`torch.random.fork_rng`."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def echo(message: str) -> None:
    """Default progress sink: print and flush, so lines appear promptly when stdout is a file or a pipe."""
    print(message, flush=True)


def machine() -> dict[str, object]:
    """What a measurement ran on, for its record: the CPU model (seeded runs can end in other files on another
    one, docs/results.md §23), cores, the GPU if any, and the software versions."""
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def provenance() -> dict[str, object]:
    """What produced a record, so that it can be produced again: the command line, the package version and, when
    the package runs from a git checkout, its commit (``dirty`` when tracked files differ from it)."""
    from library import __version__

    return {"command": list(sys.argv), "smp_lora": __version__, **_git_commit()}


@functools.lru_cache(maxsize=1)
def _git_commit() -> dict[str, object]:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # an installed copy: no checkout of its own (and never a parent folder's)
        return {}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):  # git not installed, or not a repository after all
        return {}
