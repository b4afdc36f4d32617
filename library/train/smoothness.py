"""Local-smoothness analysis of the training loss (paper Fig. 1b, App. C; Propositions 1-2).

The paper relates the Hessian norm of the training loss w.r.t. the LoRA parameters to its gradient
norm (the (L0, L1)-smoothness of Eq. 7): for MP-LoRA (Eq. 8) L1 = 0 and the two are uncorrelated,
for SMP-LoRA (Eq. 11) L1' > 0 and they correlate. We measure exactly what App. C describes:

* the global L2 norm of the LoRA gradient, every step;
* the top Hessian eigenvalue |lambda_max| by power iteration on Hessian-vector products (double
  backward), every N steps, 50 iterations, tolerance 1e-6;
* Pearson's r (and p-value) between the two series.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch


def hessian_top_eigenvalue(
    loss: torch.Tensor,
    params: Sequence[torch.nn.Parameter],
    iterations: int = 50,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> float:
    """|largest eigenvalue| of d^2 loss / d params^2 by power iteration (the graph of ``loss`` is kept).

    Each iteration is one Hessian-vector product Hv = d(g . v)/d params, with g = d loss / d params
    built once with ``create_graph=True``. Stops when the unit vector moves less than ``tol``.
    """
    candidates = [p for p in params if p.requires_grad]
    # Parameters the loss does not reach (e.g. a text-encoder LoRA behind cached conditioning) have a
    # zero Hessian block; leave them out.
    all_grads = torch.autograd.grad(loss, candidates, create_graph=True, allow_unused=True)
    params = [p for p, g in zip(candidates, all_grads) if g is not None]
    grads = [g for g in all_grads if g is not None]
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((v * v).sum() for v in vector))
    vector = [v / norm for v in vector]
    eigenvalue = 0.0
    for _ in range(iterations):
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        eigenvalue = sum((h * v).sum() for h, v in zip(hv, vector)).item()  # Rayleigh quotient v^T H v
        hv_norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if hv_norm.item() == 0.0:
            return 0.0
        new_vector = [h / hv_norm for h in hv]
        shift = torch.sqrt(sum(((n - v) ** 2).sum() for n, v in zip(new_vector, vector))).item()
        vector = new_vector
        if shift < tol:
            break
    return abs(eigenvalue)


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value (scipy); NaNs when fewer than 3 points or a constant series."""
    from scipy import stats  # noqa: PLC0415

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan"), float("nan")
    result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


@dataclass
class SmoothnessTracker:
    """Collects (step, gradient norm, Hessian norm) and writes the CSV, plot and correlation."""

    steps: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    hessian_steps: list[int] = field(default_factory=list)
    hessian_norms: list[float] = field(default_factory=list)

    def add_grad_norm(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.grad_norms.append(value)

    def add_hessian_norm(self, step: int, value: float) -> None:
        self.hessian_steps.append(step)
        self.hessian_norms.append(value)

    def correlation(self) -> tuple[float, float]:
        """Pearson r, p between the Hessian norms and the gradient norms of the same steps."""
        by_step = dict(zip(self.steps, self.grad_norms))
        pairs = [(by_step[s], h) for s, h in zip(self.hessian_steps, self.hessian_norms) if s in by_step]
        return pearson([p[0] for p in pairs], [p[1] for p in pairs])

    def write(self, prefix: str | Path, title: str = "") -> dict[str, float]:
        """Write ``<prefix>-smoothness.csv`` and ``-smoothness.png``; return the summary numbers."""
        prefix = Path(prefix)
        hessian_by_step = dict(zip(self.hessian_steps, self.hessian_norms))
        with open(f"{prefix}-smoothness.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "grad_norm", "hessian_norm"])
            for step, grad in zip(self.steps, self.grad_norms):
                writer.writerow([step, f"{grad:.8g}", f"{hessian_by_step[step]:.8g}" if step in hessian_by_step else ""])
        r, p = self.correlation()
        self._plot(Path(f"{prefix}-smoothness.png"), title, r, p)
        return {"pearson_r": r, "p_value": p, "n_hessian": len(self.hessian_norms)}

    def _plot(self, path: Path, title: str, r: float, p: float) -> None:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.grad_norms, lw=0.8, label="gradient norm")
        ax.plot(self.hessian_steps, self.hessian_norms, "o-", ms=3, label="Hessian norm")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(f"{title}  PCC={r:.3f}, p={p:.2g}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
