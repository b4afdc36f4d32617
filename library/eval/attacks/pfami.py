"""PFAMI (Fu et al. 2023, "A Probabilistic Fluctuation based Membership Inference Attack for Diffusion Models"):
a member sits at a local *maximum* of the model's likelihood, so the model's error grows more when a member
image is perturbed than when a non-member is.

The attacker perturbs the query image P times (a centre crop of fraction s_p of its side, resized back; s_p
evenly spaced from ``--pfami_crop_range``'s first to its last value, as the public SD script does with 0.95 ..
0.7), encodes every version with the VAE, and reads the model's error on each version and on the image itself.
The error is, by default, the denoising loss ||eps - eps(z_t, t, c)||^2 at t = 50, 100, ..., 500
(:func:`denoising_losses`), the public SD scripts' error; ``--pfami_error step_back`` reads instead SecMI's
step-back error along the deterministic DDIM inversion, at t = k, 2k, ..., t_SEC
(:func:`~library.eval.attacks.secmi.step_back_errors`). The authors' code offers both; on the demo's models the
loss is the stronger (docs/results.md section 29).
Per timestep t, the *probability fluctuation*
    f_t = (1/P) sum_p (E_p(t) - E_0(t)) / E_0(t)      (higher = member)
with E_0 the error on the image itself and E_p on its p-th perturbation. Candidates: ``sum`` (sum over t, the
public script's score) and each ``t=<t>``; the headline ``selected`` is the one chosen on D_aux, and so is the
direction (:attr:`~library.eval.attacks.base.ThresholdAttack.fit_direction`: the "local maximum" premise is
an assumption a fine-tune need not meet, as for SecMI).

Cost: (1 + P) x T UNet queries per sample (defaults: 11 x 10 = 110) and P VAE encodes. With the step-back
error: (1 + P) x (t_SEC/k + 1) (11 x 16 = 176 at SecMI's t_SEC 150), the unperturbed image's inversion being
SecMI's own (same memo keys), computed once when both run.

Our choices: the public script's error is summed over latent elements and divided by E_0 + 1e-6; ours is
averaged over elements (a constant factor) and divided by E_0 floored at the smallest positive float, so the
ratio does not depend on the latent's size. Perturbed versions are encoded with the VAE posterior's mean, as
the evaluation encodes the query images. The public script's second score ("corr", each timestep divided by its
mean over all evaluated samples) normalises with the evaluation data; it is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from library.eval.attacks.base import AttackInputs, SelectedThresholdAttack
from library.eval.attacks.secmi import step_back_errors
from library.eval.config import PFAMI_ERRORS, PFAMI_LOSS_TIMESTEPS
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig


def crop_fractions(first: float, last: float, count: int) -> tuple[float, ...]:
    """``count`` crop fractions evenly spaced from ``first`` to ``last`` (both included; one: ``first``)."""
    if count < 1 or not (0.0 < first <= 1.0 and 0.0 < last <= 1.0):
        raise ValueError(f"PFAMI needs >= 1 perturbation and crop fractions in (0, 1], got {count}, {first}, {last}")
    return tuple(round(float(v), 6) for v in np.linspace(first, last, count))


def center_crop_resized(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """Each image [B, C, R, R] centre-cropped to a side of int(R * ``fraction``) (at least 1), from the offset
    floor((R - side) / 2) as the training images' centre crop, and resized back to R with antialiased bilinear
    interpolation (torchvision's ``Resize`` on tensors). torchvision's ``CenterCrop`` rounds that offset half to
    even instead: one pixel further when floor((R - side) / 2) is odd (3 of the 10 default crops at 512 px)."""
    size = images.shape[-1]
    side = max(1, int(size * fraction))
    top = (size - side) // 2
    crop = images[..., top:top + side, top:top + side]
    return F.interpolate(crop.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def probability_fluctuation(errors: np.ndarray) -> np.ndarray:
    """[N, T]: (1/P) sum_p (E_p - E_0) / E_0 per timestep, from ``errors`` [N, 1 + P, T] (index 0: the image
    itself, 1..P: its perturbations). Higher = the image is a sharper minimum of the error (PFAMI: a member)."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 3 or errors.shape[1] < 2:
        raise ValueError(f"PFAMI errors must be [N, 1 + P, T] with P >= 1, got {errors.shape}")
    original = np.maximum(errors[:, :1, :], np.finfo(np.float64).tiny)
    return ((errors[:, 1:, :] - original) / original).mean(axis=1)


def denoising_losses(ctx: QueryContext, timesteps: Sequence[int], *,
                     start: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, T]: the mean squared denoising loss ||eps_t - eps(z_t, t, c)||^2 / D at each of ``timesteps``, z_t the
    clean latent (or ``start``'s (name, latents)) noised with the sample's paired noise for that t.

    The noise depends on the sample and t only (``ctx.noise``), not on the latent it noises: a perturbed version
    is noised with its image's very noise, so E_p(t) - E_0(t) holds no difference of noise draws (common random
    numbers). The public SD script draws fresh noise for every version from the global generator, which adds the
    spread of one noise draw to each fluctuation.
    """
    name, latents = start if start is not None else ("z0", None)
    return torch.stack([ctx.denoising_loss(int(t), f"pfami-loss:t={int(t)}", key=f"{name}:pfami-noised:t={int(t)}",
                                           latents=latents) for t in timesteps], dim=1)


class PFAMIProbe(Probe):
    """``error`` [B, 1 + P, T]: the model's error on the image (index 0) and on each of its P centre-crop
    perturbations, at T timesteps: SecMI's step-back errors at t = k .. t_SEC (``error="step_back"``) or the
    denoising loss at ``loss_timesteps`` (``error="loss"``)."""

    name = "pfami"

    def __init__(self, fractions: Sequence[float], timestep: int = 150, step: int = 10, error: str = "loss",
                 loss_timesteps: Sequence[int] = PFAMI_LOSS_TIMESTEPS, latent_mode: str = "mean") -> None:
        if not 0 < step <= timestep or timestep % step:
            raise ValueError(f"PFAMI needs 0 < step <= timestep, timestep a multiple of step; got {timestep}, {step}")
        if error not in PFAMI_ERRORS:
            raise ValueError(f"PFAMI's error must be one of {PFAMI_ERRORS}, got {error!r}")
        self.fractions = tuple(float(f) for f in fractions)
        self.timestep, self.step, self.error = int(timestep), int(step), error
        self.loss_timesteps = tuple(int(t) for t in loss_timesteps)
        self.latent_mode = latent_mode  # how the crops are encoded: as the query images (ctx.encode_images)

    @property
    def timesteps(self) -> tuple[int, ...]:
        """The timesteps of the error's last axis."""
        if self.error == "loss":
            return self.loss_timesteps
        return tuple(range(self.step, self.timestep + 1, self.step))

    def settings(self) -> dict[str, Any]:
        common = {"crop_fractions": list(self.fractions),
                  "perturbation": "center crop + antialiased bilinear resize; VAE posterior "
                                  + ("mean" if self.latent_mode == "mean" else "draw")}
        if self.error == "loss":
            return {**common, "error": "loss (paired noise)", "timesteps": list(self.loss_timesteps)}
        # The step-back settings carry no "error" key: the same identity (and cache) as before the option existed.
        return {**common, "timestep": self.timestep, "step": self.step}

    def queries_per_sample(self) -> float:
        per_version = len(self.loss_timesteps) if self.error == "loss" else self.timestep // self.step + 1
        return float((1 + len(self.fractions)) * per_version)

    def _errors(self, ctx: QueryContext, start: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.error == "loss":
            return denoising_losses(ctx, self.loss_timesteps, start=start)
        return step_back_errors(ctx, self.timestep, self.step, start=start)

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        errors = [self._errors(ctx)]
        images = ctx.images()
        for fraction in self.fractions:
            latents = ctx.encode_images(center_crop_resized(images, fraction), tag=f"pfami-crop={fraction}")
            errors.append(self._errors(ctx, start=(f"pfami-crop={fraction}", latents)))
        return {"error": torch.stack(errors, dim=1)}


class PFAMIAttack(SelectedThresholdAttack):
    name = "pfami"
    description = ("threshold on the probability fluctuation mean_p (E_p - E_0) / E_0 of the model's error E "
                   "(the denoising loss, or SecMI's step-back error) under P centre-crop perturbations of the query "
                   "image; timestep (or their sum) chosen on D_aux")
    threat_model = "gray-box: noise predictions at chosen latents and timesteps + caption + the VAE encoder"
    citation = ("Fu et al., 2023, A Probabilistic Fluctuation based Membership Inference Attack for Diffusion "
                "Models (PFAMI; arXiv:2308.12143)")
    fit_direction = True  # see ThresholdAttack.fit_direction

    def __init__(self, fractions: Sequence[float] = crop_fractions(0.95, 0.7, 10), timestep: int = 150,
                 step: int = 10, error: str = "loss",
                 loss_timesteps: Sequence[int] = PFAMI_LOSS_TIMESTEPS, latent_mode: str = "mean") -> None:
        super().__init__()
        self.probe = PFAMIProbe(fractions, timestep, step, error, loss_timesteps, latent_mode)

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> PFAMIAttack:
        first, last = config.pfami_crop_range
        return cls(crop_fractions(first, last, config.pfami_perturbations), config.secmi_timestep, config.secmi_step,
                   config.pfami_error, config.pfami_loss_timesteps, config.latent_mode)

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "guidance_scale": 1.0, "schedule": "scaled_linear (training)"}

    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        fluctuation = probability_fluctuation(inputs.target.probe(self.probe.name)["error"])
        return {"sum": fluctuation.sum(axis=1),
                **{f"t={t}": fluctuation[:, j] for j, t in enumerate(self.probe.timesteps)}}


__all__ = ["PFAMIAttack", "PFAMIProbe", "center_crop_resized", "crop_fractions", "denoising_losses",
           "probability_fluctuation"]
