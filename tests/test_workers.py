"""library.workers: results in order, the serial path in-process, a worker's UserError unchanged."""

from __future__ import annotations

import os

import pytest
import torch

from library.errors import ConfigError, DataError
from library.workers import WorkerPool


def job(x: int) -> tuple[int, int, int]:
    """(x squared, the process id, its torch threads)."""
    if x < 0:
        raise DataError(f"image {x}: negative")
    return x * x, os.getpid(), torch.get_num_threads()


def test_serial_pool_runs_in_this_process_in_order():
    with WorkerPool(1) as pool:
        results = pool.map(job, [3, 1, 2])
    assert [r[0] for r in results] == [9, 1, 4]
    assert {r[1] for r in results} == {os.getpid()}


def test_parallel_pool_keeps_order_uses_workers_with_their_threads():
    with WorkerPool(2, threads_per_job=1) as pool:
        results = pool.map(job, list(range(6)))
    assert [r[0] for r in results] == [x * x for x in range(6)]
    assert os.getpid() not in {r[1] for r in results}
    assert {r[2] for r in results} == {1}


def test_a_worker_error_reaches_the_caller_unchanged():
    with pytest.raises(DataError, match="image -1: negative"):
        with WorkerPool(2) as pool:
            pool.map(job, [1, -1, 2])


def test_jobs_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 1"):
        WorkerPool(0)
