"""Independent jobs (one training, one model's features) in worker processes, one torch thread each.

Why processes and not threads: the tiny stack (and small batches in general) is dominated by per-op overhead,
and on a 2-core CPU box torch's second intra-op thread mostly spins. Measured on the demo: two threads made the
feature queries *slower* (300 -> 200 queries/s), while two processes at one thread each do twice the work.
On a GPU box keep ``jobs=1``: the models would be loaded once per process for no gain.

``jobs <= 1`` runs everything in the calling process, in order, so the serial path is the same code. With a
``threads_per_job`` count both paths run a job with exactly that many torch threads, set up by the one
:func:`library.runtime.configure_torch` (a job's floats depend on its thread count, so this is what keeps seeded
results independent of ``jobs``: docs/determinism.md).
Workers are ``spawn``-ed (safe with torch, the same on every OS); the job function must be importable at
module level and its arguments picklable. A worker's exception is re-raised in the caller unchanged, so a
:class:`~library.errors.UserError` stays one clear line.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, ContextManager, Iterable, TypeVar

from library.errors import ConfigError
from library.runtime import configure_torch, torch_threads, use_deterministic_kernels

T = TypeVar("T")
R = TypeVar("R")


def _init_worker(threads: int, deterministic: bool = False, parent: int | None = None) -> None:
    configure_torch(threads)
    if deterministic:
        use_deterministic_kernels()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="exit-with-parent").start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (``kill -9``, the OOM killer) is re-parented and would wait for jobs
    forever, holding its models' memory: it ends itself within a second instead."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


class WorkerPool:
    """``with WorkerPool(jobs) as pool: results = pool.map(fn, items)``; results keep the order of ``items``.

    ``threads_per_job``: torch threads of every job, in a worker process and in this process alike. ``None`` (the
    default) gives a worker one thread and leaves this process's setting alone, so a job's thread count, and with
    it its last bits, may then depend on ``jobs``: pass a count wherever results must not.
    """

    def __init__(self, jobs: int, threads_per_job: int | None = None, *, deterministic: bool = False) -> None:
        if jobs < 1 or (threads_per_job is not None and threads_per_job < 1):
            raise ConfigError(f"jobs and threads per job must be at least 1, got {jobs} and {threads_per_job}")
        self.jobs = int(jobs)
        self.threads_per_job = None if threads_per_job is None else int(threads_per_job)
        self.deterministic = deterministic  # a worker turns on deterministic kernels (use_deterministic_kernels)
        self._executor: ProcessPoolExecutor | None = None

    @property
    def parallel(self) -> bool:
        return self.jobs > 1

    def __enter__(self) -> "WorkerPool":
        if self.parallel:
            self._executor = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_init_worker,
                                                 initargs=(self.threads_per_job or 1, self.deterministic,
                                                           os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            if isinstance(exc[0], type) and issubclass(exc[0], KeyboardInterrupt):
                # Ctrl-C reaches the workers too (one process group); a SIGTERM sent to this process alone does
                # not (library.cli.Terminated): stop them instead of waiting for, or orphaning, their jobs.
                for process in list((getattr(self._executor, "_processes", None) or {}).values()):
                    process.terminate()
            # On an error, drop the queued jobs instead of running them to completion first.
            self._executor.shutdown(wait=True, cancel_futures=exc[0] is not None)
            self._executor = None

    def in_process(self) -> ContextManager[None]:
        """The workers' torch set-up for a block run in this process (None: as the caller left it): for a
        caller that runs its jobs here itself, e.g. to reuse an object it cannot send to a worker."""
        return torch_threads(self.threads_per_job)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        items = list(items)
        if self._executor is None or len(items) <= 1:
            with self.in_process():
                return [fn(item) for item in items]
        futures = [self._executor.submit(fn, item) for item in items]
        return [future.result() for future in futures]


__all__ = ["WorkerPool"]
