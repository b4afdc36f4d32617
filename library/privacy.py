"""Privacy objectives of MP-LoRA / SMP-LoRA and the proxy attacker h_ω (Luo et al., AAAI 2025).

Everything here is a pure function of tensors except :class:`ProxyAttacker`, which is the paper's
3-layer MLP h_ω. Conventions used throughout:

* the attacker outputs 2-class logits; **class 1 = member**, so h_ω(x) = softmax(logits)[:, 1];
* log-probabilities are taken with ``log_softmax`` (never ``log(softmax)``), in fp32, so a saturated
  attacker gives a large finite log-probability instead of ``-inf``;
* G (the "MI gain") is a mean of log-probabilities, hence G ≤ 0.

Equations (numbers as in the paper):

* Eq. 5  G(h_ω, D_aux, f) = 1/(2|S^m|) Σ_m log h_ω(x) + 1/(2|S^nm|) Σ_nm log(1 − h_ω(x))
                                                                                   -> :func:`mi_gain`
* Eq. 6  L_PL  = L_ada + λ·G(h_ω, D_tr, f)                                        -> :func:`mp_lora_loss`
* Eq. 10 L_SPL = L_ada / (1 − λ·G(h_ω, D_tr, f) + δ)                              -> :func:`smp_lora_loss`
* Algorithm 1, line 6: ω ← ω + η_1 ∇_ω G, i.e. the attacker minimises −G          -> :func:`attacker_loss`
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import ConfigError, TrainingError

Normalization = Literal["none", "log", "standardize", "log_standardize"]
NORMALIZATIONS: tuple[str, ...] = ("none", "log", "standardize", "log_standardize")

#: Paper default stabiliser δ of Eq. 10 (also hard-coded upstream).
DEFAULT_DELTA = 1e-5


# --------------------------------------------------------------------------------------------------
# Proxy attacker h_ω
# --------------------------------------------------------------------------------------------------


def attacker_in_features(feature_shape: Sequence[int]) -> int:
    """Number of input features of h_ω for one sample whose feature tensor has ``feature_shape``.

    For the upstream feature (the element-wise squared-error map over the latent) pass the latent shape
    ``(C, H, W)``: SD v1.x at 512² gives 4·64·64 = 16,384. Upstream hard-coded that number, which broke
    every other resolution; here the caller derives it from the data.
    """
    shape = tuple(int(s) for s in feature_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"attacker feature shape must be non-empty and positive, got {shape}")
    return math.prod(shape)


class FeatureNormalizer(nn.Module):
    """Optional input transform of h_ω: ``none`` | ``log`` | ``standardize`` | ``log_standardize``.

    Why: h_ω sees squared errors (ε̂ − ε)². They are heavy-tailed (χ²-like per element) and their scale
    changes by orders of magnitude with the timestep t, so an MLP on raw values is dominated by the t of
    each draw and saturates easily (upstream weakness: raw fp16 features). ``log`` maps them to
    log(x + eps); ``standardize`` subtracts a running mean and divides by a running standard deviation.

    Design choices:

    * ``eps`` (default 1e-4) bounds the gradient that flows back into the LoRA through the G term:
      |∂ log(r² + eps)/∂r| = 2|r|/(r² + eps) ≤ 1/√eps = 100, instead of exploding where r ≈ 0.
    * By default the statistics are **one scalar mean and variance over all features**: the
      squared-error map is statistically the same at every latent position, and the attacker trains on
      batches of 1 member + 1 non-member, from which 16,384 per-feature variances would be noise.
      ``per_feature=True`` keeps one mean/variance per input feature instead, the right choice for a
      few heterogeneous features such as per-sample losses at several timesteps (``[B, T]``), whose
      scales differ by t. It needs ``num_features``.
    * Inputs are always normalised with the **running** statistics of the batches seen *before* (never the
      batch's own, unlike BatchNorm in train mode; the first batch sees the identity transform): batch
      statistics over a {member, non-member} pair would leak the pairing to the attacker, and the transform
      must be the same at training and evaluation time. (Until 2026-12-05 a training batch was added to the
      statistics before it was normalised: the first batch was normalised by its own.)
    * Running statistics are EMAs of the first two moments with rate max(momentum, 1/n_batches): an exact
      cumulative mean for the first 1/momentum batches, then a slow EMA that follows the drift of the
      features as the LoRA trains. They are buffers, so they are saved in the attacker's state dict.
    * The buffers are detached constants in the forward pass, so the transform is an affine map of the
      (logged) input and gradients flow through it to the features (needed for ∂G/∂LoRA).
    """

    def __init__(
        self,
        mode: Normalization = "log_standardize",
        eps: float = 1e-4,
        momentum: float = 0.01,
        per_feature: bool = False,
        num_features: int | None = None,
    ):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ConfigError(f"attacker normalization must be one of {', '.join(NORMALIZATIONS)}; got {mode!r}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"attacker normalization eps must be a positive number, got {eps}")
        if not (0 < momentum <= 1):
            raise ConfigError(f"attacker normalization momentum must be in (0, 1], got {momentum}")
        self.mode = mode
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.per_feature = bool(per_feature)
        self.uses_log = mode in ("log", "log_standardize")
        self.uses_standardize = mode in ("standardize", "log_standardize")
        if self.uses_standardize:
            # First and second raw moments (initialised to the identity transform: mean 0, var 1).
            if per_feature and not num_features:
                raise ConfigError("per-feature standardisation needs the number of features")
            shape = (int(num_features),) if per_feature else ()
            self.register_buffer("running_mean", torch.zeros(shape))
            self.register_buffer("running_sq_mean", torch.ones(shape))
            self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}, momentum={self.momentum}, per_feature={self.per_feature}"

    @property
    def running_var(self) -> Tensor:
        return (self.running_sq_mean - self.running_mean.square()).clamp_min(0.0)

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        self.num_batches_tracked += 1
        rate = max(self.momentum, 1.0 / float(self.num_batches_tracked))
        x64 = x.detach().double()
        # x is [B, F]: per-feature stats reduce over the batch only, scalar stats over everything.
        mean = x64.mean(dim=0) if self.per_feature else x64.mean()
        sq_mean = x64.square().mean(dim=0) if self.per_feature else x64.square().mean()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
        self.running_sq_mean.lerp_(sq_mean.to(self.running_sq_mean.dtype), rate)

    def forward(self, x: Tensor, update_stats: bool = False) -> Tensor:
        if self.uses_log:
            # Squared errors are >= 0; clamp guards against tiny negatives from other feature choices.
            x = torch.log(x.clamp_min(0.0) + self.eps)
        if self.uses_standardize:
            # The statistics of the batches before this one: a batch normalised by its own statistics (the
            # first one, and every one with weight 1/n early on) would show the attacker its pairing.
            mean, var = self.running_mean.clone(), self.running_var
            if update_stats:
                self._update(x)
            x = (x - mean) * torch.rsqrt(var + 1e-8)
        return x


class ProxyAttacker(nn.Module):
    """h_ω: the paper's proxy attack model, a 3-layer MLP giving 2-class logits (class 1 = member).

    Layers (paper §4 "3-layer MLP [512, 256, 2]"; dropout as in the authors' code):
    ``in_features -> 512 -> ReLU -> Dropout(0.5) -> 256 -> ReLU -> Dropout(0.5) -> 2``.

    Args:
        in_features: features per sample, computed by the caller (see :func:`attacker_in_features`).
        hidden: hidden layer sizes (default (512, 256)).
        dropout: dropout after each hidden layer (upstream 0.5; the paper does not mention it).
        normalization: input transform (see :class:`FeatureNormalizer`). Default ``"log_standardize"``
            because raw squared errors are heavy-tailed with a t-dependent scale; ``"none"`` feeds the raw
            features, as upstream does (upstream also ran h_w under fp16 autocast, which saturated; ours runs in
            fp32 whatever the autocast).
        eps, momentum, per_feature_stats: passed to :class:`FeatureNormalizer` (``per_feature``).

    ``forward`` accepts ``[B, in_features]`` or ``[B, *feature_shape]`` (flattened from dim 1) and runs
    with autocast disabled, in the attacker's own parameter dtype (fp32 unless the caller casts it): the
    attacker is tiny next to the UNet, and fp16 logits saturate and create score ties (upstream
    weakness #10).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (512, 256),
        dropout: float = 0.5,
        normalization: Normalization = "log_standardize",
        eps: float = 1e-4,
        momentum: float = 0.01,
        per_feature_stats: bool = False,
    ):
        super().__init__()
        if isinstance(in_features, bool) or int(in_features) != in_features or in_features <= 0:
            raise ConfigError(f"attacker in_features must be a positive integer, got {in_features!r}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden or any(h <= 0 for h in hidden):
            raise ConfigError(f"attacker hidden sizes must be positive integers, got {hidden}")
        if not (0.0 <= dropout < 1.0):
            raise ConfigError(f"attacker dropout must be in [0, 1), got {dropout}")
        self.in_features = int(in_features)
        self.hidden = hidden
        self.normalizer = FeatureNormalizer(
            normalization, eps=eps, momentum=momentum, per_feature=per_feature_stats, num_features=self.in_features
        )
        layers: list[nn.Module] = []
        width = self.in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor, update_stats: bool | None = None) -> Tensor:
        """Logits ``[B, 2]`` for features ``[B, ...]``.

        ``update_stats`` controls the normaliser's running statistics; ``None`` means "in train mode".
        Pass ``False`` when h_ω scores the members-only training batch for the G term of Eq. 6/10, so
        the statistics are fitted on the balanced attacker batches only.
        """
        if features.dim() < 2:
            raise ValueError(f"attacker input must be [batch, ...], got shape {tuple(features.shape)}")
        x = features.flatten(1)
        if x.shape[1] != self.in_features:
            raise ConfigError(
                f"the proxy attacker expects {self.in_features} features per sample but got {x.shape[1]} "
                f"(input shape {tuple(features.shape)}); it was built for another latent size/resolution"
            )
        if update_stats is None:
            update_stats = self.training
        weight = self.net[0].weight
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.normalizer(x.to(weight.dtype), update_stats=update_stats)
            return self.net(x)


# --------------------------------------------------------------------------------------------------
# Log-probabilities and the MI gain G
# --------------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, name: str) -> Tensor:
    if logits.dim() != 2 or logits.shape[1] != 2:
        raise ValueError(f"{name} must be 2-class logits of shape [batch, 2], got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; G needs at least one sample")
    # Upcast half precision to fp32; keep fp64 (used by gradient checks) as it is.
    return logits if logits.dtype == torch.float64 else logits.float()


def member_log_prob(logits: Tensor) -> Tensor:
    """log h_ω(x) = log softmax(logits)[:, 1], per sample (the member terms of Eq. 5)."""
    return F.log_softmax(_check_logits(logits, "logits"), dim=-1)[:, 1]


def nonmember_log_prob(logits: Tensor) -> Tensor:
    """log(1 − h_ω(x)) = log softmax(logits)[:, 0], per sample (the non-member terms of Eq. 5)."""
    return F.log_softmax(_check_logits(logits, "logits"), dim=-1)[:, 0]


def mi_gain(member_logits: Tensor, nonmember_logits: Tensor) -> Tensor:
    """Eq. 5: G = 1/(2|S^m|) Σ_{S^m} log h_ω(x) + 1/(2|S^nm|) Σ_{S^nm} log(1 − h_ω(x)).

    Each half is averaged over its own size, so the two classes weigh 1/2 each whatever the batch sizes.
    With |S^m| = |S^nm|, −G equals the mean 2-class cross-entropy of the concatenated batch. G ≤ 0, and
    G = log(1/2) for an attacker that cannot tell the classes apart (constant logits).
    """
    return 0.5 * member_log_prob(member_logits).mean() + 0.5 * nonmember_log_prob(nonmember_logits).mean()


def mi_gain_members(member_logits: Tensor, member_weight: float = 1.0) -> Tensor:
    """G(h_ω, D_tr, f) of Eq. 6/10: the MI gain on a training batch, where every sample is a member.

    Returns ``member_weight · mean_batch log h_ω(x)``. D_tr has no non-members, so only the first term
    of Eq. 5 exists. Two readings:

    * ``member_weight=1.0`` (default): the authors' code, which uses −CE(h_ω(x), member) = the batch
      mean of log h_ω(x), with no 1/2 factor;
    * ``member_weight=0.5``: literal substitution into Eq. 5 (its 1/(2|S^m|) factor).

    The two differ only by a factor on G, i.e. they are the same objective with λ rescaled by 2.
    """
    if not (member_weight > 0 and math.isfinite(member_weight)):
        raise ConfigError(f"member_weight must be a positive number, got {member_weight}")
    return member_weight * member_log_prob(member_logits).mean()


def attacker_loss(member_logits: Tensor, nonmember_logits: Tensor) -> Tensor:
    """What h_ω minimises: −G of Eq. 5 (gradient ascent on G, Algorithm 1 line 6)."""
    return -mi_gain(member_logits, nonmember_logits)


@torch.no_grad()
def attacker_accuracy(member_logits: Tensor, nonmember_logits: Tensor) -> float:
    """Fraction of correct argmax decisions over members and non-members together (the ASR of h_ω).

    A tie (equal logits) counts as "non-member", as ``torch.argmax`` picks the first index.
    """
    m = _check_logits(member_logits, "member_logits")
    nm = _check_logits(nonmember_logits, "nonmember_logits")
    correct = (m.argmax(dim=1) == 1).sum() + (nm.argmax(dim=1) == 0).sum()
    return float(correct) / (m.shape[0] + nm.shape[0])


# --------------------------------------------------------------------------------------------------
# LoRA objectives (Eq. 6 and Eq. 10)
# --------------------------------------------------------------------------------------------------


def validate_privacy_lambda(lam: float) -> float:
    """λ of Eq. 6/10 must be a finite number >= 0 (λ = 0 turns both objectives into plain LoRA)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ConfigError(f"privacy_lambda must be a finite number >= 0, got {lam!r}")
    if lam < 0:
        raise ConfigError(f"privacy_lambda must be >= 0, got {lam}")
    return float(lam)


def validate_privacy_delta(delta: float) -> float:
    """δ of Eq. 10 must be a finite number > 0 (paper: 1e-5): the paper's "small positive constant" (with G <= 0
    the denominator stays >= 1 without it; the training config refuses 0 the same way)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 0:
        raise ConfigError(f"'privacy_delta' must be a finite number > 0 (paper: 1e-5), got {delta!r}")
    return float(delta)


def _check_scalar(t: Tensor, name: str) -> None:
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar tensor, got shape {tuple(t.shape)}")


def _value(t: Tensor) -> float:
    return float(t.detach().reshape(()).float())


def mp_lora_loss(l_ada: Tensor, g: Tensor, lam: float) -> Tensor:
    """Eq. 6: L_PL = L_ada + λ·G (MP-LoRA). ∂L/∂L_ada = 1, ∂L/∂G = λ.

    G ≤ 0 is unbounded below, so minimising this can push G → −∞ (the attacker's member log-probability
    to −∞); the paper puts MP-LoRA's instability down to unconstrained local smoothness (Proposition 1, Eq. 8).
    Raises :class:`TrainingError` if L_ada or G is not finite.
    """
    lam = validate_privacy_lambda(lam)
    _check_scalar(l_ada, "l_ada")
    _check_scalar(g, "g")
    if not bool(torch.isfinite(torch.stack([l_ada.detach().reshape(()), g.detach().reshape(())])).all()):
        raise TrainingError(
            f"MP-LoRA loss is not finite: L_ada={_value(l_ada)}, G={_value(g)}, privacy_lambda={lam}; "
            "lower the learning rate or privacy_lambda, or resume from the last checkpoint"
        )
    return l_ada + lam * g


def smp_denominator(g: Tensor, lam: float, delta: float = DEFAULT_DELTA) -> Tensor:
    """The denominator of Eq. 10: 1 − λ·G + δ (≥ 1 + δ since G ≤ 0 and λ ≥ 0)."""
    lam = validate_privacy_lambda(lam)
    delta = validate_privacy_delta(delta)
    return 1.0 - lam * g + delta


def smp_lora_loss(l_ada: Tensor, g: Tensor, lam: float, delta: float = DEFAULT_DELTA) -> Tensor:
    """Eq. 10: L_SPL = L_ada / (1 − λ·G + δ) (SMP-LoRA).

    With D = 1 − λG + δ: ∂L/∂L_ada = 1/D and ∂L/∂G = λ·L_ada/D². Since G ≤ 0 and λ ≥ 0, D ≥ 1 + δ,
    so the L_ada gradient is never amplified; D grows (and every gradient shrinks) as G falls, i.e. as
    the attacker stops recognising training samples as members. Unlike Eq. 6, the loss stays bounded
    below by 0, and the 1/D factors are what bound the local smoothness in Eq. 11.

    Raises :class:`ConfigError` for λ < 0 or δ <= 0, and :class:`TrainingError` naming λ, G and D when
    L_ada or G is not finite or D is not a positive finite number.
    """
    lam = validate_privacy_lambda(lam)
    delta = validate_privacy_delta(delta)
    _check_scalar(l_ada, "l_ada")
    _check_scalar(g, "g")
    denom = smp_denominator(g, lam, delta)
    # One host sync for all three checks.
    vals = torch.stack([t.detach().reshape(()).float() for t in (l_ada, g, denom)])
    ok = torch.isfinite(vals).all() & (vals[2] > 0)
    if not bool(ok):
        l_v, g_v, d_v = (float(v) for v in vals)
        raise TrainingError(
            f"SMP-LoRA loss is not usable: L_ada={l_v}, G={g_v}, privacy_lambda={lam}, "
            f"denominator 1 - lambda*G + delta={d_v} (must be a positive finite number); "
            "lower the learning rate or privacy_lambda, or resume from the last checkpoint"
        )
    return l_ada / denom


@dataclass(frozen=True)
class PrivacyLossTerms:
    """The objective and its pieces, detached except ``loss``, for logging (``denominator`` is None for MP)."""

    loss: Tensor
    l_ada: Tensor
    g: Tensor
    denominator: Tensor | None


def privacy_loss_terms(
    method: Literal["mp", "smp"], l_ada: Tensor, g: Tensor, lam: float, delta: float = DEFAULT_DELTA
) -> PrivacyLossTerms:
    """Eq. 6 (``"mp"``) or Eq. 10 (``"smp"``) plus the detached pieces a trainer logs."""
    if method == "mp":
        loss = mp_lora_loss(l_ada, g, lam)
        denom = None
    elif method == "smp":
        loss = smp_lora_loss(l_ada, g, lam, delta)
        denom = smp_denominator(g, lam, delta).detach()
    else:
        raise ConfigError(f"privacy method must be 'mp' or 'smp', got {method!r}")
    return PrivacyLossTerms(loss=loss, l_ada=l_ada.detach(), g=g.detach(), denominator=denom)
