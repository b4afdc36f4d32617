"""The GPU path: the same training and evaluation code on a CUDA device, checked against the CPU.

Skipped where torch sees no CUDA device (every machine of this project's CI). On a GPU box the rest of the suite
runs on the GPU as well (the trainer and ``evaluate_mia`` take it whenever one is visible); these tests add what
only a comparison can show: the first step's objective and the evaluation's scores on the GPU equal the CPU's up
to float rounding (TF32 convolutions, other kernels), a GPU-trained file is the same kohya file, and the benches'
CUDA path (``max_memory_allocated``, bf16 autocast, MFU) runs. ``bash scripts/gpu_check.sh`` runs them and the
real-scale benches (and, with ``FULL_SUITE=1``, the rest of the suite).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mia_world import base_args
from safetensors import safe_open

import evaluate_mia

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]

REPO_ROOT = Path(__file__).resolve().parents[1]


def _subprocess(argv: list[str], cuda: bool) -> str:
    """Run a command of this repository with the GPU visible (``cuda``) or hidden, offline; its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _train(method: str, args: list[str], out: Path, cuda: bool) -> dict:
    _subprocess([str(REPO_ROOT / f"train_{method}.py"), *args, "--output_dir", str(out)], cuda)
    return json.loads((out / f"{method}.json").read_text())


@pytest.mark.parametrize("method", ["lora", "mp_lora", "smp_lora"])
def test_the_first_steps_objective_on_the_gpu_equals_the_cpus(method, tiny_train_args, tmp_path):
    """One step from the same seed: the same timesteps and noise (drawn on the CPU whatever the device), the same
    weights, so L_ada (and G, after the attacker's first phase) agree up to the kernels' rounding."""
    args = tiny_train_args + ["--max_train_steps", "1", "--attacker_batch_size", "2", "--k_steps", "2"]
    gpu = _train(method, args, tmp_path / "gpu", cuda=True)
    cpu = _train(method, args, tmp_path / "cpu", cuda=False)
    assert gpu["device"].startswith("cuda") and cpu["device"] == "cpu"
    assert gpu["final"]["l_ada"] == pytest.approx(cpu["final"]["l_ada"], rel=2e-2)
    if method != "lora":
        assert gpu["final"]["g"] == pytest.approx(cpu["final"]["g"], abs=2e-2)
    with safe_open(tmp_path / "gpu" / f"{method}.safetensors", "pt") as g, \
            safe_open(tmp_path / "cpu" / f"{method}.safetensors", "pt") as c:
        assert sorted(g.keys()) == sorted(c.keys())  # the same kohya layout, written from the GPU
        for key in g.keys():
            tensor = g.get_tensor(key)
            assert tensor.shape == c.get_tensor(key).shape and tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all(), key


def test_bf16_autocast_trains_on_the_gpu(tiny_train_args, tmp_path):
    record = _train("smp_lora", tiny_train_args + ["--mixed_precision", "bf16", "--attacker_batch_size", "2"],
                    tmp_path / "bf16", cuda=True)
    assert record["device"].startswith("cuda") and record["global_step"] == 4
    assert all(torch.isfinite(torch.tensor(v)) for v in record["final"].values())


def test_a_gpu_run_resumes_with_its_dropout_streams(tiny_train_args, tmp_path):
    """LoRA and attacker dropout draw from the GPU's RNG there: the state carries it, so 3 steps + resume to 6 give
    the uninterrupted run's weights up to kernel rounding (other dropout masks would move them far beyond it)."""
    from safetensors.torch import load_file

    args = tiny_train_args + ["--attacker_batch_size", "2", "--network_dropout", "0.1"]
    _train("smp_lora", args + ["--max_train_steps", "6"], tmp_path / "full", cuda=True)
    _train("smp_lora", args + ["--max_train_steps", "3", "--save_state"], tmp_path / "half", cuda=True)
    record = _train("smp_lora", args + ["--max_train_steps", "6", "--resume",
                                        str(tmp_path / "half" / "smp_lora-state")], tmp_path / "resumed", cuda=True)
    assert record["device"].startswith("cuda")
    for name in ("smp_lora.safetensors", "smp_lora-attacker.safetensors"):
        full, resumed = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        for key in full:
            torch.testing.assert_close(resumed[key], full[key], rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_full_determinism_repeats_a_gpu_run_bit_for_bit(tiny_train_args, tmp_path):
    """Two seeded SMP-LoRA runs on the GPU with --full_determinism (dropout on, so the GPU's RNG matters too)
    write equal files; without it, atomic adds in the backward passes may move the last bits."""
    from safetensors.torch import load_file

    args = tiny_train_args + ["--attacker_batch_size", "2", "--network_dropout", "0.1", "--full_determinism"]
    for run in ("a", "b"):
        assert _train("smp_lora", args, tmp_path / run, cuda=True)["device"].startswith("cuda")
    for name in ("smp_lora.safetensors", "smp_lora-attacker.safetensors"):
        first, second = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert all(torch.equal(first[key], second[key]) for key in first), name


def test_the_evaluation_on_the_gpu_scores_like_the_cpu(mia_world, tmp_path):
    """``evaluate_mia --device cuda`` against ``--device cpu`` on the over-fitted LoRA: the same per-sample noise,
    so the same scores up to rounding, and the same AUCs."""
    reports = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device
        argv = base_args(mia_world, out, "--attacks", "loss", "calibrated", "--network_weights",
                         str(mia_world["lora"]), "--device", device, "--no-quality")
        assert evaluate_mia.main(argv) == 0
        reports[device] = json.loads((out / "report.json").read_text())
    assert reports["cuda"]["device"].startswith("cuda") and reports["cpu"]["device"] == "cpu"
    auc = {device: {(r["model"], r["label"]): r["auc"] for r in report["results"]} for device, report in reports.items()}
    assert auc["cuda"].keys() == auc["cpu"].keys() and auc["cpu"]
    for key, value in auc["cpu"].items():
        assert auc["cuda"][key] == pytest.approx(value, abs=0.03), key


def test_full_determinism_repeats_a_gpu_evaluation_bit_for_bit(mia_world, tmp_path, torch_defaults_restored):
    """Two GPU evaluations with --full_determinism (features recomputed: --no_cache) write the same scores."""
    scores = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = base_args(mia_world, out, "--attacks", "loss", "calibrated", "--network_weights",
                         str(mia_world["lora"]), "--device", "cuda", "--no-quality", "--no_cache", "--full_determinism")
        assert evaluate_mia.main(argv) == 0
        scores.append((out / "scores.csv").read_text())
    assert scores[0] == scores[1]


def test_the_real_scale_bench_takes_its_cuda_path():
    out = _subprocess([str(REPO_ROOT / "bench" / "real_scale.py"), "--device", "cuda", "--architecture", "tiny",
                       "--resolution", "64", "--methods", "lora", "smp_lora", "--peak_tflops", "989"], cuda=True)
    assert "bf16 autocast" in out and "max_memory_allocated" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 2 and all(float(row.strip("|").split("|")[5]) >= 0 for row in rows)  # the memory column


def test_the_step_overhead_bench_runs_on_the_gpu():
    out = _subprocess([str(REPO_ROOT / "bench" / "step_overhead.py"), "--steps", "1", "--rounds", "1",
                       "--no_memory"], cuda=True)
    assert "CUDA peak MiB" in out and "smp_lora / plain:" in out
