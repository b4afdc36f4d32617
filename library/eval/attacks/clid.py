"""CLiD (Zhai et al., NeurIPS 2024), threshold variant: the loss under the true caption and its *conditional
likelihood discrepancy* to degraded captions.

A fine-tune memorises an image together with its caption, so a member's loss rises more than a non-member's
when the caption is degraded. At each t of ``clid_timesteps`` (paper: 440, 450, 460) one noise eps_t per sample
is shared by every condition; ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps_t`` and

    L(c)   = mean_t mean (eps(z_t, t, c) - eps_t)^2          (c: the true caption, or a degraded one c_k)
    Delta_k = L(c_k) - L(c)                                  (c_k: the empty caption and one masked caption per
                                                              fraction of ``clid_mask_fractions``)
    s_alpha = (1 - alpha) * RS(-L(c)) + alpha * RS(mean_k Delta_k)          (higher = member)

RS is a robust scaler (median and inter-quartile range, as scikit-learn's ``RobustScaler``; an IQR of 0 scales
by 1) fitted on D_aux only. The paper writes ``s = (1-alpha) RS(L) + alpha RS(-mean Delta)``, member if
``s <= tau``; ours is its negation, so that higher = member as every attack of the suite. alpha runs over the
paper's grid {0, 0.1, ..., 1}: one candidate per alpha, the headline ``selected`` is the alpha with the best
AUC on D_aux (:class:`~library.eval.attacks.base.SelectedThresholdAttack`), its threshold the balanced-accuracy
optimum on D_aux. Cost: ``len(clid_timesteps) * (2 + len(clid_mask_fractions))`` UNet queries (15).

Our choices where the paper is vague: the paper masks the *most important* words (by an importance model); we
have none, so :func:`degrade_caption` masks the longest words first (ties: the earlier word), a deterministic
proxy (long words are the content words, short ones the articles and prepositions), replacing
``round(f * n)`` of the n whitespace-separated words (at least one) by the tokenizer's end-of-text token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from library.eval.attacks.base import (
    AttackInputs,
    ScoreSet,
    SelectedThresholdAttack,
    check_labels,
)
from library.eval.probes import Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig

END_OF_TEXT = "<|endoftext|>"  # CLIP's end-of-text token, the replacement of CLiD's masked words
ALPHAS = tuple(i / 10 for i in range(11))  # the paper's grid of mixing weights


def degrade_caption(caption: str, fraction: float, mask: str = END_OF_TEXT) -> str:
    """``caption`` with ``round(fraction * n)`` (at least 1) of its n whitespace-separated words replaced by
    ``mask``: the longest words first, ties broken by position (earlier first). The number of words is kept
    (they are re-joined by single spaces); an empty or blank caption is returned unchanged."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    words = caption.split()
    if not words:
        return caption
    count = min(len(words), max(1, int(np.floor(fraction * len(words) + 0.5))))  # round half up
    order = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))
    masked = set(order[:count])
    return " ".join(mask if i in masked else word for i, word in enumerate(words))


def condition_names(fractions: Sequence[float]) -> list[str]:
    """The probe's conditions in output order: ``true``, ``empty``, then ``mask=<f>`` per fraction."""
    return ["true", "empty", *(f"mask={f:g}" for f in fractions)]


class CLiDProbe(Probe):
    """``losses`` [B, C, T]: mean (eps(z_t, t, c) - eps_t)^2 per condition c (:func:`condition_names`) and t."""

    name = "clid"

    def __init__(self, timesteps: Sequence[int], fractions: Sequence[float]) -> None:
        self.timesteps = tuple(int(t) for t in timesteps)
        self.fractions = tuple(float(f) for f in fractions)

    def settings(self) -> dict[str, Any]:
        return {"timesteps": list(self.timesteps), "mask_fractions": list(self.fractions),
                "conditions": condition_names(self.fractions), "word_order": "longest first, ties by position"}

    def queries_per_sample(self) -> float:
        return float(len(self.timesteps) * (2 + len(self.fractions)))

    def captions(self, ctx: QueryContext) -> dict[str, list[str]]:
        """Each condition's captions for the batch (``true``: the samples' own)."""
        mask = getattr(ctx.model.bundle.tokenizer, "eos_token", None) or END_OF_TEXT
        out = {"true": list(ctx.captions), "empty": [""] * len(ctx)}
        for name, f in zip(condition_names(self.fractions)[2:], self.fractions):
            out[name] = [degrade_caption(c, f, mask) for c in ctx.captions]
        return out

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        conditions = self.captions(ctx)
        rows = []
        for name, captions in conditions.items():
            columns = []
            for t in self.timesteps:  # one noise per (sample, t), shared by the conditions
                columns.append(ctx.denoising_loss(t, f"clid:t={t}", key=f"noised:clid:t={t}", caption_key=name,
                                                  captions=None if name == "true" else captions))
            rows.append(torch.stack(columns, dim=1))
        return {"losses": torch.stack(rows, dim=1)}


class RobustScaler:
    """(x - median) / IQR, both fitted on one sample of x (an IQR of 0 scales by 1)."""

    def __init__(self, values: np.ndarray) -> None:
        q1, self.median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
        self.iqr = float(q3 - q1) if q3 > q1 else 1.0
        self.median = float(self.median)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (np.asarray(values, dtype=np.float64) - self.median) / self.iqr


class CLiDAttack(SelectedThresholdAttack):
    name = "clid"
    description = ("robust-scaled mix of -L(c) and the mean loss increase under degraded captions; "
                   "mixing weight alpha and threshold fitted on D_aux")
    threat_model = "gray-box: noise predictions under chosen captions (true, empty, masked) + the true caption"
    citation = ("Zhai et al., NeurIPS 2024, Membership inference on text-to-image diffusion models via "
                "conditional likelihood discrepancy (CLiD)")

    def __init__(self, timesteps: Sequence[int] = (440, 450, 460),
                 fractions: Sequence[float] = (0.3, 0.5, 0.7)) -> None:
        super().__init__()
        self.probe = CLiDProbe(timesteps, fractions)
        self.scalers: tuple[RobustScaler, RobustScaler] | None = None  # (of L(c), of mean Delta), from D_aux

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> CLiDAttack:
        return cls(config.clid_timesteps, config.clid_mask_fractions)

    def settings(self) -> dict[str, Any]:
        # The per-model fitted values (scalers, alpha) are in each score set's info, not here: settings are shared.
        return {**self.probe.settings(), "alphas": list(ALPHAS), "alpha_choice": "best AUC on D_aux",
                "scaler": "median / IQR of D_aux"}

    def loss_and_delta(self, inputs: AttackInputs) -> tuple[np.ndarray, np.ndarray]:
        """(L(c), mean_k Delta_k) per sample, from the probe's [N, C, T] losses."""
        losses = inputs.target.probe(self.probe.name)["losses"].mean(axis=2)  # [N, C]: mean over t
        return losses[:, 0], (losses[:, 1:] - losses[:, :1]).mean(axis=1)

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        check_labels(labels, len(aux))
        loss, delta = self.loss_and_delta(aux)
        self.scalers = (RobustScaler(loss), RobustScaler(delta))  # D_aux only, then applied unchanged
        super().fit(aux, labels, oracle=oracle)

    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        if self.scalers is None:
            raise RuntimeError("CLiD: fit the robust scalers on D_aux first")
        loss, delta = self.loss_and_delta(inputs)
        # RS(-L) = -RS(L) for a median/IQR scaler: low loss and a large discrepancy = member.
        a, b = 0.0 - self.scalers[0](loss), self.scalers[1](delta)
        return {f"alpha={alpha:.1f}": (1.0 - alpha) * a + alpha * b for alpha in ALPHAS}

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        out = super().score(inputs)
        assert self.scalers is not None
        scaler = {name: {"median": s.median, "iqr": s.iqr} for name, s in zip(("loss", "mean_delta"), self.scalers)}
        for score_set in out:
            score_set.info["robust_scaler_on_aux"] = scaler
        return out


__all__ = ["ALPHAS", "CLiDAttack", "CLiDProbe", "END_OF_TEXT", "RobustScaler", "condition_names", "degrade_caption"]
