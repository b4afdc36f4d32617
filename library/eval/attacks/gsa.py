"""GSA1 / GSA2 (Pang et al. 2023, "White-box membership inference attacks against diffusion models"): per-sample
gradient norms of the denoising loss, fed to a gradient-boosted classifier. The paper's Table 11 "white-box
gradient-based" attack.

For K = ``gsa_timesteps`` (paper: 10) timesteps ``t_j = j * 1000 / K - 1`` (j = 1..K: 99, 199, ..., 999) with a
fresh noise eps_j per (sample, j) (paired: the same for every model), ``z_j = sqrt(abar) z_0 + sqrt(1 - abar)
eps_j`` and ``l_j = mean (eps(z_j, t_j, c) - eps_j)^2`` under the true caption c. Per parameter group p
(:meth:`~library.eval.probes.ModelContext.parameter_groups`: each LoRA tensor, or each UNet block without a LoRA)

    GSA1_p = || grad_p mean_j l_j ||_2          GSA2_p = mean_j || grad_p l_j ||_2

Both come from the same K per-sample forwards and backwards (grad of the mean = mean of the K gradients), so the
cost is K forwards + K backwards = 3K query-equivalents per sample (a backward counts as two forwards).

Attack: per feature set (GSA1, GSA2) the ``log`` of the norms (they span orders of magnitude; trees care only
about the order of a feature's values, up to where between two training values a split falls, which the log
puts at their geometric mean), standardised with D_aux's mean and std (for the record: trees are indifferent),
then scikit-learn's ``GradientBoostingClassifier`` (exact trees, so that a D_aux of a few dozen samples still
splits, where ``HistGradientBoostingClassifier``'s 20-sample leaves would not; 100 trees of depth 2, learning
rate 0.1, ``random_state`` = the evaluation's seed) fitted on D_aux and scored by ``predict_proba`` (p(member);
hard labels give a degenerate ROC). Both variants are reported; the headline is the one with the better
cross-validated AUC on D_aux (stratified k-fold, k = min(5, smallest class); gsa1 on a tie), never chosen on
D_te. The ASR is the balanced accuracy of p(member) > 0.5, an honest number (checkpoint ``honest``: nothing is chosen on D_te).

Our choices: for a LoRA the gradients are taken w.r.t. the LoRA tensors only (no published source does LoRAs);
the text conditioning is detached, so a text-encoder LoRA tensor's feature is 0.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from library.errors import warn
from library.eval.attacks.base import Attack, AttackInputs, ScoreSet, check_labels
from library.eval.metrics import roc_auc
from library.eval.probes import ModelContext, Probe, QueryContext

if TYPE_CHECKING:
    from library.eval.config import EvalConfig

NUM_TRAIN_TIMESTEPS = 1000  # SD v1.x's training schedule
VARIANTS = ("gsa1", "gsa2")


def gsa_timesteps(k: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The paper's ``t_j = j * T / K - 1`` for j = 1..K."""
    return [j * num_train_timesteps // k - 1 for j in range(1, k + 1)]


class GSAProbe(Probe):
    """``gsa1`` and ``gsa2`` [B, P]: the per-sample gradient-norm features, one column per parameter group."""

    name = "gsa"

    def __init__(self, k: int = 10, timesteps: Sequence[int] | None = None) -> None:
        # ``timesteps`` overrides the paper's grid (not a CLI option: for tests and studies at other t).
        self.timesteps = gsa_timesteps(int(k)) if timesteps is None else [int(t) for t in timesteps]
        self.k = len(self.timesteps)
        self.groups: list[str] = []  # the column names, set per model by begin()

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "timesteps": self.timesteps, "loss": "mean squared error, true caption"}

    def queries_per_sample(self) -> float:
        return float(3 * self.k)

    def begin(self, model: ModelContext) -> None:
        self.groups = list(model.parameter_groups())
        if model.network is not None and not any(m.lora_name.startswith("lora_unet_")
                                                 for m in getattr(model.network, "loras", ())):
            warn("gsa: a LoRA without UNet tensors (text encoder only) gets no GSA signal here: its gradients are "
                 "taken through the UNet with the text conditioning detached, so its features are all 0 and its GSA "
                 "rows are at chance by construction, not a finding")

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        groups = list(ctx.model.parameter_groups().values())
        params = [p for group in groups for p in group]
        with torch.no_grad():
            cond = ctx.conditioning().detach()
        noise = [ctx.noise(f"gsa:j={j}") for j in range(1, self.k + 1)]
        flags = [p.requires_grad for p in params]
        rows1, rows2 = [], []
        try:
            for p in params:
                p.requires_grad_(True)
            if ctx.model.network is not None:  # a LoRA: per-sample gradients of the whole batch at once
                gsa1, gsa2 = self._batch_features(ctx, groups, params, cond, noise)
                rows1, rows2 = list(gsa1), list(gsa2)
            for i in range(len(ctx) if ctx.model.network is None else 0):
                g1, g2 = self._sample_features(ctx, groups, params, cond[i : i + 1], [e[i : i + 1] for e in noise], i)
                rows1.append(g1)
                rows2.append(g2)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
        # Forward equivalents actually run (one forward + one backward per (sample, j)), as queries_per_sample.
        ctx.queries += 3 * self.k * len(ctx)
        return {"gsa1": torch.stack(rows1), "gsa2": torch.stack(rows2)}

    def _sample_features(self, ctx: QueryContext, groups: list[list[torch.nn.Parameter]],
                         params: list[torch.nn.Parameter], cond: torch.Tensor, noise: list[torch.Tensor],
                         i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(GSA1, GSA2) [P] of the batch's sample ``i``: K forwards and K backwards."""
        z0 = ctx.z0[i : i + 1]
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        norm_sum = torch.zeros(len(groups), dtype=torch.float64)
        with torch.enable_grad():
            for t, eps in zip(self.timesteps, noise):
                abar = ctx.alpha_bar(t)[:1]
                z_t = abar.sqrt() * z0 + (1.0 - abar).sqrt() * eps
                timestep = torch.tensor([t], dtype=torch.long, device=ctx.model.device)
                pred = ctx.model.unet(z_t, timestep, encoder_hidden_states=cond).sample
                loss = (pred.float() - eps.float()).pow(2).mean()
                # autograd.grad, not backward(): no .grad is written anywhere, no parameter can change.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(t_) if g is None else g.float() for g, t_ in zip(grads, total)]
                for acc, g in zip(total, grads):
                    acc.add_(g)
                norm_sum += _group_norms(groups, grads)
        gsa1 = _group_norms(groups, [g / self.k for g in total])
        return gsa1.float(), (norm_sum / self.k).float()

    def _batch_features(self, ctx: QueryContext, groups: list[list[torch.nn.Parameter]],
                        params: list[torch.nn.Parameter], cond: torch.Tensor,
                        noise: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(GSA1, GSA2) [B, P] of the whole batch of a LoRA model: per timestep one forward and one backward
        of the summed per-sample losses, with Opacus' per-sample-gradient hooks on the LoRA's Linear / Conv2d
        layers (as DP-SGD training does), which give every sample the gradient of its own loss — the same
        numbers as one backward per sample (tested), K instead of B * K passes."""
        import opacus  # noqa: PLC0415 - a requirement, imported only for white-box attacks on a LoRA

        # The LoRA layers nearest the input see activations that need no gradient; torch then warns once per
        # backward hook that it fires on outputs only, which is exactly what per-sample gradients need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        hooked = opacus.GradSampleModule(ctx.model.network, loss_reduction="sum", strict=False)
        # Opacus records activations only in training mode; the LoRA's Linear / Conv2d layers behave the same in
        # both (any dropout lives in their parents, which stay in eval mode).
        layers = [m for m in ctx.model.network.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        modes = [m.training for m in layers]
        for m in layers:
            m.training = True
        batch = len(ctx)
        total = [torch.zeros((batch, *p.shape), dtype=torch.float32, device=p.device) for p in params]
        norm_sum = torch.zeros((batch, len(groups)), dtype=torch.float64)
        try:
            with torch.enable_grad():
                for t, eps in zip(self.timesteps, noise):
                    abar = ctx.alpha_bar(t)
                    z_t = abar.sqrt() * ctx.z0 + (1.0 - abar).sqrt() * eps
                    timestep = torch.full((batch,), t, dtype=torch.long, device=ctx.model.device)
                    pred = ctx.model.unet(z_t, timestep, encoder_hidden_states=cond).sample
                    loss = (pred.float() - eps.float()).pow(2).flatten(1).mean(dim=1).sum()
                    if loss.requires_grad:  # else a text-encoder-only LoRA: no tensor of it is in this graph
                        loss.backward()
                    grads = []
                    for p, acc in zip(params, total):
                        sample = getattr(p, "grad_sample", None)
                        grads.append(torch.zeros_like(acc) if sample is None else sample.float())
                        p.grad, p.grad_sample = None, None  # nothing is left on the parameters
                    for acc, g in zip(total, grads):
                        acc.add_(g)
                    norm_sum += torch.stack([_group_norms(groups, [g[i] for g in grads]) for i in range(batch)])
        finally:
            hooked._close()  # removes the hooks; the LoRA network is left as it was
            for m, mode in zip(layers, modes):
                m.training = mode
            for p in params:
                p.grad = None
        gsa1 = torch.stack([_group_norms(groups, [g[i] / self.k for g in total]) for i in range(batch)])
        return gsa1.float(), (norm_sum / self.k).float()


def _group_norms(groups: list[list[torch.nn.Parameter]], grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each group's gradients (``grads`` in the order of the groups' parameters), float64 [P]."""
    squares = torch.stack([g.double().pow(2).sum() for g in grads]).cpu()  # one device sync, not one per tensor
    bounds = np.cumsum([0] + [len(group) for group in groups])
    return torch.stack([squares[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])]).sqrt()


class Standardizer:
    """log of the norms, then (x - mean) / std with D_aux's statistics (a std of 0 scales by 1)."""

    def __init__(self, x: np.ndarray) -> None:
        logs = self.log(x)
        self.mean = logs.mean(axis=0)
        std = logs.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)

    @staticmethod
    def log(x: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(np.asarray(x, dtype=np.float64), 1e-30))  # a zero norm (unused tensor) stays finite

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (self.log(x) - self.mean) / self.std


class GSAAttack(Attack):
    name = "gsa"
    description = ("gradient-boosted classifier on per-sample gradient norms of the denoising loss "
                   "(GSA1: norm of the mean gradient, GSA2: mean of the norms), fitted on D_aux")
    threat_model = "white-box: gradients of the loss w.r.t. the fine-tuned parameters + caption"
    citation = ("Pang et al., 2023, White-box membership inference attacks against diffusion models (GSA); "
                "the paper's Table 11 gradient attack")

    def __init__(self, k: int = 10, seed: int = 0, n_estimators: int = 100, max_depth: int = 2,
                 learning_rate: float = 0.1) -> None:
        self.probe = GSAProbe(k)
        self.seed = int(seed)
        self.tree_settings = {"n_estimators": int(n_estimators), "max_depth": int(max_depth),
                              "learning_rate": float(learning_rate)}
        self.models: dict[str, tuple[Standardizer, Any]] = {}
        self.cv_auc: dict[str, float] = {}
        self.headline: str | None = None

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> GSAAttack:
        return cls(config.gsa_timesteps, seed=config.seed)

    def settings(self) -> dict[str, Any]:
        return {**self.probe.settings(), "classifier": "sklearn GradientBoostingClassifier", **self.tree_settings,
                "random_state": self.seed, "features": "log norm, standardised on D_aux",
                "headline_choice": "better cross-validated AUC on D_aux"}  # per model: the score sets' info

    def _classifier(self) -> Any:
        from sklearn.ensemble import GradientBoostingClassifier

        return GradientBoostingClassifier(random_state=self.seed, **self.tree_settings)

    def _cross_validated_auc(self, x: np.ndarray, y: np.ndarray) -> float:
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        folds = min(5, int(y.sum()), int(y.size - y.sum()))
        if folds < 2:
            return float("nan")
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed % 2**32)
        p = cross_val_predict(self._classifier(), x, y, cv=cv, method="predict_proba")[:, 1]
        return float(roc_auc(y, p))

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        y = check_labels(labels, len(aux))
        features = aux.target.probe(self.probe.name)
        self.models, self.cv_auc = {}, {}
        for variant in VARIANTS:
            scaler = Standardizer(features[variant])
            x = scaler(features[variant])
            # Chosen on D_aux by cross-validation, the final classifier then fitted on all of D_aux.
            self.cv_auc[variant] = self._cross_validated_auc(x, y)
            self.models[variant] = (scaler, self._classifier().fit(x, y))
        auc = {v: (a if np.isfinite(a) else -1.0) for v, a in self.cv_auc.items()}
        self.headline = max(VARIANTS, key=lambda v: auc[v])  # gsa1 on a tie

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        if not self.models:
            raise RuntimeError("GSA: fit on D_aux first")
        features = inputs.target.probe(self.probe.name)
        out = []
        for variant in VARIANTS:
            scaler, model = self.models[variant]
            p = model.predict_proba(scaler(features[variant]))[:, list(model.classes_).index(1)]
            out.append(ScoreSet(attack=self.name, variant=variant, scores=p.astype(np.float64), kind="classifier",
                                member_probs=p.astype(np.float64), checkpoint="honest",
                                headline=variant == self.headline,
                                info={"cv_auc_on_aux": self.cv_auc[variant], "headline_on_aux": self.headline,
                                      "n_features": int(features[variant].shape[1])}))
        return out


__all__ = ["GSAAttack", "GSAProbe", "Standardizer", "VARIANTS", "gsa_timesteps"]
