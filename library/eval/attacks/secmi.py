"""SecMI (Duan et al., ICML 2023), the statistic variant SecMI_stat: the error of one deterministic denoising step
at the end of a deterministic DDIM inversion of the clean latent.

The attacker walks the clean latent up the diffusion path with deterministic DDIM steps (eta = 0)
    z_0 -> z_k -> z_2k -> ... -> z_{t_SEC},   z_{t+k} = Phi(z_t, t -> t+k)
(Phi = :func:`~library.eval.attacks.ddim.ddim_step` with eps(z_t, t, c)) and steps back once,
    zhat_{t_SEC-k} = Phi(z_{t_SEC}, t_SEC -> t_SEC-k).
For a member the model's noise predictions are consistent along the path, so the step back lands near where the
inversion passed: statistic = -||zhat_{t_SEC-k} - z_{t_SEC-k}||^2 (higher = member), thresholded on D_aux.
Cost: t_SEC/k queries for the inversion (the first at t = 0 on the clean latent) + 1 for the step back. The
default is SecMI's Stable Diffusion code (SecMI-LDM): k = 10, t_SEC = 150, the error read at 140, 16 queries; the
paper's DDPM setting t_SEC = 100 (11 queries) was our default until the two were measured on the demo's models,
where 150 is the stronger on every LoRA (docs/results.md section 30).

Our choices (stated where the paper or its code is vague):

* alpha-bar from SD's scaled-linear *training* schedule (``ModelContext.alphas_cumprod``), the clean latent sits
  at t = 0 with alpha-bar_0 = 1 - beta_0 (as the public code indexes it), and the DDIM arithmetic runs in
  float32 whatever the UNet's dtype (1 - alpha-bar near t = 0 is below fp16's resolution around 1);
* the conditional prediction only, no classifier-free guidance (the attacker knows the caption);
* the squared error is averaged over latent elements instead of summed (a constant factor: same ROC);
* the query eps(z_0, 0, c) is asked as ``key="z0"``, the very query PIA's eps_0 and SimA's t = 0 use, so the
  probe engine computes it once for all three;
* a free second candidate ``trajectory``: stepping back from *every* inverted z_t (t = k .. t_SEC) reuses the
  inversion's own queries, so the mean of those step-back errors costs no query. The headline ``selected`` is the
  candidate (``stat`` or ``trajectory``) chosen on D_aux, and so is the direction: on an over-fitted LoRA we
  measured members *less* self-consistent than non-members (AUC far below 0.5 in the paper's direction), so
  the direction is a tunable fitted on D_aux (``ThresholdAttack.fit_direction``), reported per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.eval.attacks.base import AttackInputs, SelectedThresholdAttack
from library.eval.attacks.ddim import ddim_step
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig


def schedule_alpha_bar(ctx: QueryContext, t: int) -> torch.Tensor:
    """alpha-bar at timestep ``t`` as a float32 scalar tensor on the model's device (full precision: fp16 cannot
    hold 1 - alpha-bar near t = 0)."""
    return ctx.model.alphas_cumprod[int(t)].to(torch.float32).to(ctx.model.device)


def inversion_key(step: int, t: int, start: str = "z0") -> str:
    """The memo key of the DDIM-inverted latent at ``t`` (step ``step`` from the latent named ``start``, by default
    the clean latent): the same path is one set of queries, whichever probe walks it; t = 0 is the start itself."""
    return start if t == 0 else f"{start}:ddim-inversion:step={step}:t={t}"


def ddim_inversion(ctx: QueryContext, end: int, step: int, *, start: tuple[str, torch.Tensor] | None = None,
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The deterministic DDIM inversion of the batch's clean latents from t = 0 to ``end`` in steps of ``step``
    (``start``: another (name, latents) to invert instead, e.g. PFAMI's perturbed images).

    Returns (latents, eps): ``latents[i]`` is z at t = i*step (float32, ``latents[0]`` = z_0), for i = 0 .. end/step;
    ``eps[i]`` = eps(latents[i], i*step, c) for i = 0 .. end/step - 1 (the queries the inversion made).
    """
    name, z0 = start if start is not None else ("z0", ctx.z0)
    latents, eps = [z0.float()], []
    for t in range(0, end, step):
        e = ctx.predict(latents[-1], t, key=inversion_key(step, t, name)).float()
        eps.append(e)
        latents.append(ddim_step(latents[-1], e, schedule_alpha_bar(ctx, t), schedule_alpha_bar(ctx, t + step)))
    return latents, eps


def step_back_errors(ctx: QueryContext, end: int, step: int, *, start: tuple[str, torch.Tensor] | None = None,
                     ) -> torch.Tensor:
    """[B, end/step]: the mean squared step-back error ||Phi(z_t, t -> t-k) - z_{t-k}||^2 / D along the DDIM
    inversion (:func:`ddim_inversion`, same ``start``) at t = k, 2k, ..., ``end`` (k = ``step``)."""
    name = start[0] if start is not None else "z0"
    latents, eps = ddim_inversion(ctx, end, step, start=start)
    # The one extra query: eps at the end of the inversion; every earlier step back reuses the inversion's eps.
    eps.append(ctx.predict(latents[-1], end, key=inversion_key(step, end, name)).float())
    columns = []
    for i in range(1, len(latents)):
        t = i * step
        back = ddim_step(latents[i], eps[i], schedule_alpha_bar(ctx, t), schedule_alpha_bar(ctx, t - step))
        columns.append((back - latents[i - 1]).pow(2).flatten(1).mean(dim=1))
    return torch.stack(columns, dim=1)


class SecMIProbe(Probe):
    """``error`` [B, t_SEC/k]: mean squared step-back error ||Phi(z_t, t -> t-k) - z_{t-k}||^2 / D at
    t = k, 2k, ..., t_SEC (column j at t = (j+1)k; the last column is SecMI's statistic)."""

    name = "secmi"

    def __init__(self, timestep: int = 150, step: int = 10) -> None:
        if not 0 < step <= timestep or timestep % step:
            raise ValueError(f"SecMI needs 0 < step <= timestep, timestep a multiple of step; got {timestep}, {step}")
        self.timestep, self.step = int(timestep), int(step)

    def settings(self) -> dict[str, Any]:
        return {"timestep": self.timestep, "step": self.step}

    def queries_per_sample(self) -> float:
        return float(self.timestep // self.step + 1)

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        return {"error": step_back_errors(ctx, self.timestep, self.step)}


class SecMIAttack(SelectedThresholdAttack):
    name = "secmi"
    description = ("threshold on -||Phi(z_tSEC, tSEC -> tSEC-k) - z_(tSEC-k)||^2 after a deterministic DDIM inversion "
                   "of the clean latent to t_SEC (SecMI_stat)")
    threat_model = "gray-box: noise predictions at chosen latents and timesteps + caption"
    citation = ("Duan et al., ICML 2023, Are Diffusion Models Vulnerable to Membership Inference Attacks? (SecMI)")
    fit_direction = True  # see ThresholdAttack.fit_direction

    def __init__(self, timestep: int = 150, step: int = 10) -> None:
        super().__init__()
        self.probe = SecMIProbe(timestep, step)

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> SecMIAttack:
        return cls(config.secmi_timestep, config.secmi_step)

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "guidance_scale": 1.0, "schedule": "scaled_linear (training)"}

    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        """The paper's statistic (the step-back error at t_SEC - k) and its mean over the trajectory; the
        headline (``selected``) is the one of them chosen on D_aux."""
        errors = inputs.target.probe(self.probe.name)["error"]
        # 0.0 - x: a zero error stays +0.0 (as the loss attacks do).
        return {"stat": 0.0 - errors[:, -1], "trajectory": 0.0 - errors.mean(axis=1)}


__all__ = ["SecMIAttack", "SecMIProbe", "ddim_inversion", "inversion_key", "schedule_alpha_bar", "step_back_errors"]
