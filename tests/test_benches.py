"""The benches run (bench/*.py are documented commands; their timings are never asserted): each prints its table
with one row per method it was asked for. real_scale runs on the tiny stack with bf16 autocast, the code path a
GPU box takes except for the CUDA memory counters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_real_scale_bench_runs_its_methods_in_bf16_on_the_tiny_stack():
    out = _run_bench("real_scale.py", "--architecture", "tiny", "--resolution", "64", "--precision", "bf16",
                     "--methods", "lora", "smp_lora_every2", "smp_t_band_every2", "--threads", "1", "--peak_tflops", "1")
    assert "bf16 autocast; the tiny architecture (random weights), 64 px" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| LoRA", "| SMP-LoRA (paper features), attacker phase every 2nd step",
        "| SMP-LoRA, banded calibrated (t, loss) proxy, attacker phase every 2nd step"]
    for row in rows:  # s/step, x plain, TFLOP/step, achieved TFLOP/s, memory, MFU: all numbers, plain LoRA 1.00
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(re.fullmatch(r"[\d.]+( %)?", cell) for cell in cells), row
    assert rows[0].split("|")[3].strip() == "1.00"


def test_step_overhead_bench_times_every_variant_against_plain_lora():
    out = _run_bench("step_overhead.py", "--steps", "1", "--rounds", "1", "--threads", "1", "--no_memory")
    ratios = dict(re.findall(r"(\w+) / plain: ([\d.]+)x", out))
    assert {"mp_lora", "smp_lora", "smp_lora_every2", "smp_t_band", "smp_t_band_every2"} <= set(ratios)
    assert all(float(value) > 0 for value in ratios.values()) and "plain LoRA / bare loop" in out
    assert "rounds x 2 steps" in out  # --steps 1 rounds up to whole attacker cycles of the *_every2 variants


def test_gpu_check_refuses_a_machine_without_a_gpu_in_one_line(tmp_path):
    """scripts/gpu_check.sh (tests/test_cuda.py and the benches on a GPU box) says so, rather than timing the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    name = f"gpu_logs_{tmp_path.name}"  # relative: the caller's folder, as the launchers' paths (it was the repo's)
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), name], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == "scripts/gpu_check.sh: torch sees no CUDA device"
    assert not (tmp_path / name).exists() and not (REPO_ROOT / name).exists()  # a refused run writes nothing


def test_real_scale_drift_without_plain_lora_is_refused():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "real_scale.py"), "--drift", "--methods",
                           "smp_lora"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "--drift times plain LoRA again at the end: add lora to --methods" in done.stderr
