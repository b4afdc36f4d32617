"""library.workers: results in order, the serial path in-process with the workers' torch set-up, a worker's
UserError unchanged."""

from __future__ import annotations

import os

import pytest
import torch

from library.errors import ConfigError, DataError
from library.runtime import torch_setup
from library.workers import WorkerPool


def job(x: int) -> tuple[int, int, int]:
    """(x squared, the process id, its torch threads)."""
    if x < 0:
        raise DataError(f"image {x}: negative")
    return x * x, os.getpid(), torch.get_num_threads()


def setup(_: int) -> dict[str, object]:
    return torch_setup()


def deterministic(_: int) -> tuple[bool, bool, str | None]:
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_deterministic_workers_turn_on_the_deterministic_kernels():
    """What --full_determinism asks of evaluate_mia.py's workers (spawned: torch's switches are per process)."""
    assert not torch.are_deterministic_algorithms_enabled()
    for wanted in (True, False):
        with WorkerPool(2, threads_per_job=1, deterministic=wanted) as pool:
            results = pool.map(deterministic, [0, 1])
        assert all(r[:2] == (wanted, wanted) for r in results)
        assert all(r[2] is not None for r in results) or not wanted  # cuBLAS' deterministic workspace
    assert not torch.are_deterministic_algorithms_enabled()  # this process untouched


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


def test_serial_pool_runs_its_jobs_on_threads_per_job_then_restores():
    assert torch.get_num_threads() == 1  # tests/conftest.py
    with WorkerPool(1, threads_per_job=2) as pool:
        assert {r[2] for r in pool.map(job, [1, 2])} == {2}
    assert torch.get_num_threads() == 1
    with WorkerPool(1) as pool:  # no count: the caller's setting
        assert {r[2] for r in pool.map(job, [1])} == {1}


def test_in_process_blocks_get_the_workers_threads_then_restore():
    with WorkerPool(1, threads_per_job=2) as pool, pool.in_process():
        assert torch.get_num_threads() == 2  # a caller running its jobs here itself (the eval's feature engine)
    assert torch.get_num_threads() == 1


def test_a_worker_sets_torch_up_as_the_serial_path_does():
    """Everything that can move a float (threads, denormal flushing, oneDNN, deterministic algorithms, matmul
    precision, OMP/MKL environment...) is the same in a spawned worker and in this process: docs/determinism.md."""
    torch.set_num_threads(2)  # a parent left at another count must not leak into the serial path
    try:
        with WorkerPool(1, threads_per_job=1) as pool:
            here = pool.map(setup, [0])[0]
        with WorkerPool(2, threads_per_job=1) as pool:
            there = pool.map(setup, [0, 1])
    finally:
        torch.set_num_threads(1)
    assert here["threads"] == 1
    assert there == [here, here]


def test_a_worker_error_reaches_the_caller_unchanged():
    with pytest.raises(DataError, match="image -1: negative"):
        with WorkerPool(2) as pool:
            pool.map(job, [1, -1, 2])


def test_jobs_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 1"):
        WorkerPool(0)
    with pytest.raises(ConfigError, match="at least 1"):
        WorkerPool(2, threads_per_job=0)


def test_sigterm_stops_the_worker_processes_too(tmp_path):
    """``kill <pid>`` reaches the main process only (Ctrl-C reaches the whole process group): it must stop the
    workers, not leave them computing (they used to run on, then print ConnectionRefusedError tracebacks)."""
    import subprocess
    import sys
    import textwrap
    import time
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from library.cli import run_cli
        from library.workers import WorkerPool

        def main(argv):
            with WorkerPool(2, 1) as pool:
                def kill():
                    print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
                    os.kill(os.getpid(), signal.SIGTERM)
                threading.Timer(3.0, kill).start()
                pool.map(time.sleep, [120, 120, 120])

        if __name__ == "__main__":
            sys.exit(run_cli(main))
    """))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100)
    assert done.returncode == 143 and "terminated" in done.stderr, done.stderr
    assert time.monotonic() - started < 60  # not after the workers' two minutes
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


PARENT_KILLED_MID_JOB = """
import os, signal, threading, time
from library.workers import WorkerPool

with WorkerPool(2) as pool:
    def kill_self():
        while len(pool._executor._processes or {}) < 2:
            time.sleep(0.1)
        print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill_self, daemon=True).start()
    pool.map(time.sleep, [300, 300])
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """kill -9 of an evaluation left its workers waiting for jobs for good (each holding its models' memory)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    # into files, not pipes: orphaned workers would hold a pipe open and the run would wait for them
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        # PYTHONPATH: this checkout's library.workers, not whichever copy is installed (the run's cwd is tmp_path)
        done = subprocess.run([sys.executable, "-c", PARENT_KILLED_MID_JOB], stdout=out, stderr=err, timeout=120,
                              cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                 "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == -9, (tmp_path / "err").read_text()[-2000:]
    workers = [int(pid) for pid in (tmp_path / "out").read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 120  # spawn start-up (torch imports: slow on a loaded box) plus the 1 s watch
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    still = [pid for pid in workers if _running(pid)]
    for pid in still:  # never leave them behind, whatever the outcome
        os.kill(pid, 9)
    assert not still, f"workers {still} outlived their killed parent"


def test_a_single_job_runs_in_this_process_even_with_workers():
    """One job alone (one training, one model) is not worth a worker's start-up and its own copy of the models."""
    with WorkerPool(2, threads_per_job=1) as pool:
        results = pool.map(job, [3])
    assert results[0][:2] == (9, os.getpid())


@pytest.mark.parametrize("threads_per_job, wanted", [(None, 1), (2, 2)])
def test_workers_run_on_threads_per_job_one_by_default(threads_per_job, wanted):
    """A worker's thread count moves its floats (docs/determinism.md): exactly --threads, one when not given."""
    with WorkerPool(2, threads_per_job=threads_per_job) as pool:
        results = pool.map(job, [1, 2])
    assert {r[2] for r in results} == {wanted} and os.getpid() not in {r[1] for r in results}


def _record(path: str) -> None:
    """A job that leaves a file, so the test sees which jobs ran; slow enough that queued ones are still queued."""
    import time

    time.sleep(0.5)
    open(path, "w").close()


def test_a_worker_error_drops_the_queued_jobs(tmp_path):
    """After a job fails the caller gets the error without the rest of a long queue (trainings) running first."""
    items = [str(tmp_path / "missing" / "x")] + [str(tmp_path / f"{i}") for i in range(12)]
    with pytest.raises(FileNotFoundError):
        with WorkerPool(2, threads_per_job=1) as pool:
            pool.map(_record, items)
    assert len(list(tmp_path.glob("[0-9]*"))) < 12
