"""Hessian power iteration and Pearson correlation (paper Fig. 1b, App. C)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from library.train.smoothness import SmoothnessTracker, hessian_top_eigenvalue, pearson


def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    # loss = 1/2 x^T A x has Hessian A; its largest |eigenvalue| is known.
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([5.0, -2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    x = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=generator))
    loss = 0.5 * x @ a @ x
    assert math.isclose(hessian_top_eigenvalue(loss, [x], iterations=200, tol=1e-10), 5.0, rel_tol=1e-4)


def test_power_iteration_spans_several_parameter_tensors():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    loss = 3.0 * (a ** 2).sum() + 0.5 * (b ** 2).sum()  # Hessian diag(6, 6, 1)
    assert math.isclose(hessian_top_eigenvalue(loss, [a, b], iterations=100), 6.0, rel_tol=1e-4)


def test_pearson_matches_numpy_and_tracker_writes_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = 2 * x + rng.normal(scale=0.1, size=30)
    r, p = pearson(list(x), list(y))
    assert math.isclose(r, np.corrcoef(x, y)[0, 1], rel_tol=1e-9)
    assert p < 1e-6
    tracker = SmoothnessTracker()
    for step, (gx, hy) in enumerate(zip(x, y)):
        tracker.add_grad_norm(step, float(abs(gx)))
        if step % 3 == 0:
            tracker.add_hessian_norm(step, float(abs(hy)))
    summary = tracker.write(tmp_path / "run", title="test")
    assert (tmp_path / "run-smoothness.csv").read_text().startswith("step,grad_norm,hessian_norm")
    assert (tmp_path / "run-smoothness.png").stat().st_size > 0
    assert summary["n_hessian"] == 10


def test_track_smoothness_trains_and_writes_the_hessian(tiny_train_args, tmp_path):
    """End to end on the tiny stack: the Hessian steps run (the fused attention kernels have no double backward;
    the trainer switches those forwards to the math kernel) and the smoothness files hold finite eigenvalues."""
    import csv

    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.trainer import train

    args = tiny_train_args + ["--max_train_steps", "3", "--track_smoothness", "--hessian_every_n_steps", "2",
                              "--attacker_batch_size", "2"]
    result = train(parse_config(TrainConfig, args), "smp_lora")
    with open(tmp_path / "out" / "smp_lora-smoothness.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    hessians = [float(r["hessian_norm"]) for r in rows if r.get("hessian_norm") not in (None, "")]
    assert len(hessians) == 2 and all(math.isfinite(h) and h > 0 for h in hessians)  # steps 0 and 2
    assert (tmp_path / "out" / "smp_lora-smoothness.png").is_file()
    assert math.isfinite(result.final_logs["loss"])


def test_a_resumed_tracked_run_continues_its_smoothness_history(tiny_train_args, tmp_path):
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.trainer import train

    common = tiny_train_args + ["--track_smoothness", "--hessian_every_n_steps", "2", "--attacker_batch_size", "2"]

    def run(steps: int, out: str, *extra: str):
        return train(parse_config(TrainConfig, common + ["--max_train_steps", str(steps), "--output_dir",
                                                         str(tmp_path / out), *extra]), "smp_lora")

    run(4, "full")
    run(2, "half", "--save_state")
    run(4, "resumed", "--resume", str(tmp_path / "half" / "smp_lora-state"))
    full = (tmp_path / "full" / "smp_lora-smoothness.csv").read_text()
    assert full.count("\n") == 5  # header + steps 0-3
    assert (tmp_path / "resumed" / "smp_lora-smoothness.csv").read_text() == full  # not steps 2-3 only


def test_power_iteration_reports_the_magnitude_of_a_negative_top_eigenvalue():
    """The Hessian norm of Fig. 1b is |lambda_max|: a concave direction (-6) outweighs a convex one (1)."""
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    loss = -3.0 * (a ** 2).sum() + 0.5 * (b ** 2).sum()  # Hessian diag(-6, -6, 1)
    assert hessian_top_eigenvalue(loss, [a, b], iterations=100) == pytest.approx(6.0, rel=1e-6)


def test_power_iteration_leaves_out_parameters_the_loss_does_not_reach():
    """A text-encoder LoRA behind cached conditioning gets no gradient: it must not stop the Hessian step."""
    x = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    unused = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert hessian_top_eigenvalue(2.0 * (x ** 2).sum(), [unused, x]) == pytest.approx(4.0, rel=1e-9)


@pytest.mark.parametrize(("x", "y"), [([1.0, 2.0], [3.0, 1.0]), ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])])
def test_pearson_is_nan_for_two_points_or_a_constant_series(x, y):
    """Two points always correlate perfectly (r = +-1): reporting that as a finding would be wrong."""
    assert all(math.isnan(v) for v in pearson(x, y))


def test_tracker_correlates_each_hessian_with_its_own_steps_gradient_norm_and_writes_them(tmp_path):
    """Fig. 1b's PCC pairs the Hessian norm of step s with the gradient norm of step s; the CSV says both per step."""
    grads = [1.0, 5.0, 2.0, 8.0, 3.0, 9.0, 4.0, 7.0, 6.0, 0.123456789]
    hessians = {0: 2.0, 3: 1.0, 6: 7.0, 9: 3.0}
    tracker = SmoothnessTracker()
    for step, grad in enumerate(grads):
        tracker.add_grad_norm(step, grad)
        if step in hessians:
            tracker.add_hessian_norm(step, hessians[step])
    expected = np.corrcoef([grads[s] for s in hessians], list(hessians.values()))[0, 1]
    r, p = tracker.correlation()
    assert r == pytest.approx(expected, rel=1e-9) and 0 < p < 1
    assert tracker.write(tmp_path / "run") == {"pearson_r": r, "p_value": p, "n_hessian": 4}
    rows = (tmp_path / "run-smoothness.csv").read_text().splitlines()
    assert rows[:3] == ["step,grad_norm,hessian_norm", "0,1,2", "1,5,"]
    assert rows[-1] == "9,0.12345679,3" and len(rows) == 11
