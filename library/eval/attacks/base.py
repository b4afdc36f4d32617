"""The attack interface: what every membership-inference attack of the suite sees and returns.

An attack is fitted on D_aux (members and non-members with labels) and then scores any samples; a higher
score means "more likely a member". Each attack may return several *variants* (the loss at each timestep and
averaged over timesteps, h' at two checkpoints, ...), each a :class:`ScoreSet`. Adding an attack (SecMI, PIA,
CLiD, a gradient attack) means one module with one :class:`Attack` subclass, registered by one line in
:data:`library.eval.attacks.registry.ATTACK_CLASSES`; new per-sample statistics go into :class:`FeatureSet`
(computed by :mod:`library.eval.features`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Sequence

import numpy as np

from library.errors import ConfigError
from library.eval.metrics import best_threshold, roc_auc

if TYPE_CHECKING:  # the config is only read, never imported at run time: see library.eval.attacks.registry
    import torch

    from library.eval.config import EvalConfig
    from library.eval.probes import Probe

ScoreKind = Literal["threshold", "classifier"]


@dataclass
class FeatureSet:
    """Per-sample features of one model, rows aligned with the samples.

    ``losses`` ``[N, K, M]``: the loss at K fixed ``timesteps`` x M noise draws (the same noise for every model).
    ``paper`` ``[N, D, F]``: the paper's h' input (error map or loss at a random t) for D draws per sample, if
    computed; an ``[N, F]`` array is one draw.
    ``probes``: the outputs of the attacks' own probes (:mod:`library.eval.probes`), ``{probe: {name: [N, ...]}}``.
    """

    losses: np.ndarray
    timesteps: tuple[int, ...]
    paper: np.ndarray | None = None
    probes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.losses = np.asarray(self.losses, dtype=np.float64)
        if self.losses.ndim != 3 or self.losses.shape[1] != len(self.timesteps):
            raise ValueError(f"losses must be [N, K={len(self.timesteps)}, M], got {self.losses.shape}")
        if self.paper is not None:
            self.paper = np.asarray(self.paper, dtype=np.float32)
            if self.paper.ndim == 2:
                self.paper = self.paper[:, None, :]
            if self.paper.ndim != 3 or self.paper.shape[0] != self.losses.shape[0]:
                raise ValueError(f"paper features must be [N, D, F] with N={self.losses.shape[0]}, "
                                 f"got {self.paper.shape}")
        for probe, outputs in self.probes.items():
            for name, value in outputs.items():
                if value.shape[0] != self.losses.shape[0]:
                    raise ValueError(f"probe output {probe}.{name} has {value.shape[0]} rows, not {len(self)}")

    def __len__(self) -> int:
        return int(self.losses.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray) -> "FeatureSet":
        index = np.asarray(index, dtype=np.int64)
        probes = {probe: {name: value[index] for name, value in outputs.items()}
                  for probe, outputs in self.probes.items()}
        return FeatureSet(self.losses[index], self.timesteps, None if self.paper is None else self.paper[index],
                          probes)

    def probe(self, probe: str) -> dict[str, np.ndarray]:
        """The outputs of ``probe``; a ConfigError if the feature engine did not run it."""
        if probe not in self.probes:
            raise ConfigError(f"the features hold no outputs of probe {probe!r}; was its attack in --attacks?")
        return self.probes[probe]


@dataclass
class AttackInputs:
    """What an attack sees: the attacked model's features and, optionally, the base model's (the reference)."""

    target: FeatureSet
    reference: FeatureSet | None = None

    def __post_init__(self) -> None:
        if self.reference is not None:
            if len(self.reference) != len(self.target) or self.reference.timesteps != self.target.timesteps:
                raise ValueError("target and reference features must cover the same samples and timesteps")

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, index: Sequence[int] | np.ndarray) -> "AttackInputs":
        return AttackInputs(self.target.subset(index), None if self.reference is None else self.reference.subset(index))


@dataclass
class ScoreSet:
    """One variant's membership scores for the samples given to :meth:`Attack.score` (higher = member).

    ``kind="threshold"``: a scalar statistic; ``threshold`` is the balanced-accuracy-optimal threshold fitted on
    D_aux (the honest decision rule). ``kind="classifier"``: a trained model; ``member_probs`` = p(member), whose
    argmax decision is the paper's ASR. ``checkpoint`` says how a classifier's epoch was chosen ("oracle" on
    D_te as in the paper, or "honest" on held-out D_aux). ``headline`` variants go in the plots and main table.
    """

    attack: str
    variant: str
    scores: np.ndarray
    kind: ScoreKind
    threshold: float | None = None
    member_probs: np.ndarray | None = None
    checkpoint: str | None = None
    headline: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.attack} {self.variant}".strip()


class Attack(ABC):
    """A membership-inference attack: ``fit`` on D_aux, then ``score`` any samples (higher = member)."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    description: ClassVar[str] = ""
    threat_model: ClassVar[str] = ""  # what the attacker has: e.g. "gray-box: noise predictions + caption"
    citation: ClassVar[str] = ""  # the paper the statistic comes from
    # A floor (the blind baseline) uses no model: it is reported, but never a model's worst case.
    floor: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> Attack:
        """A fresh attack with the options ``config`` gives it; an attack without options takes none."""
        return cls()

    # The attack's own model queries, if it has one probe (most attacks: set in __init__).
    probe: Probe | None = None

    def probes(self) -> list[Probe]:
        """The model queries this attack needs beyond the shared fixed-t losses (:mod:`library.eval.probes`);
        their outputs reach :meth:`fit` and :meth:`score` as ``inputs.target.probes[probe.name]``."""
        return [] if self.probe is None else [self.probe]

    def queries_per_sample(self) -> float:
        """Nominal cost in UNet forwards per sample (the report's cost column); default: its probes' costs."""
        return float(sum(p.queries_per_sample() for p in self.probes()))

    def check_labels(self, labels: np.ndarray) -> None:
        """ConfigError if the attack cannot be fitted on a D_aux with these ``labels`` (1 = member); called before
        any model work, so a split too small for the attack's own needs fails in a moment (``--dry_run`` too)."""

    @abstractmethod
    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        """Fit on D_aux (``labels``: 1 = member). ``oracle`` (D_te with labels) is only for choices the paper makes
        on the evaluation set itself; results that use it must be labelled "oracle"."""

    @abstractmethod
    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        """Scores of every variant for ``inputs`` (same row order)."""

    def settings(self) -> dict[str, Any]:
        """The attack's hyper-parameters, for the report (by default its probe's settings)."""
        return {} if self.probe is None else self.probe.settings()

    def _check(self, inputs: AttackInputs) -> None:
        if self.needs_reference and inputs.reference is None:
            raise ConfigError(f"attack '{self.name}' needs the base model's features as a reference")


def check_labels(labels: np.ndarray, n: int, what: str = "D_aux") -> np.ndarray:
    """Labels as an int array of length ``n`` with both classes present."""
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if y.size != n:
        raise ValueError(f"{what}: {n} samples but {y.size} labels")
    if not ((y == 1).any() and (y == 0).any()):
        raise ValueError(f"{what} needs both members and non-members")
    return y


class ThresholdAttack(Attack):
    """An attack that thresholds scalar statistics: one :class:`ScoreSet` per statistic.

    Subclasses implement :meth:`statistics`; ``fit`` fixes each statistic's threshold on D_aux (the honest
    rule, applied unchanged to D_te), the oracle threshold is computed on D_te by the metrics.
    """

    headline_variant: ClassVar[str] = "avg"
    # Whether the direction of each statistic is fitted on D_aux too: a statistic whose D_aux AUC is below 0.5
    # is reversed. For attacks whose published direction rests on an assumption a fine-tune need not meet
    # (SecMI, PIA: "members are more self-consistent along the deterministic path"); measured reversed on an
    # over-fitted LoRA (docs/attacks.md). A tunable like the threshold, so fitted on D_aux, never on D_te.
    fit_direction: ClassVar[bool] = False

    def __init__(self) -> None:
        self.thresholds: dict[str, float] = {}
        self.aux_balanced_accuracy: dict[str, float] = {}
        self.signs: dict[str, float] = {}

    @abstractmethod
    def statistics(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        """``{variant: scores}``, higher = member."""

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        self._check(aux)
        y = check_labels(labels, len(aux))
        self.thresholds, self.aux_balanced_accuracy, self.signs = {}, {}, {}
        for variant, scores in self.statistics(aux).items():
            self.signs[variant] = -1.0 if self.fit_direction and roc_auc(y, scores) < 0.5 else 1.0
            tau, bal = best_threshold(y, self._oriented(variant, scores))
            self.thresholds[variant], self.aux_balanced_accuracy[variant] = tau, bal

    def _oriented(self, variant: str, scores: np.ndarray) -> np.ndarray:
        """``scores`` in the direction fitted on D_aux (the published one unless ``fit_direction`` reversed it)."""
        return scores if self.signs.get(variant, 1.0) > 0 else 0.0 - scores

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        self._check(inputs)
        out = []
        for variant, scores in self.statistics(inputs).items():
            out.append(
                ScoreSet(
                    attack=self.name,
                    variant=variant,
                    scores=np.asarray(self._oriented(variant, scores), dtype=np.float64),
                    kind="threshold",
                    threshold=self.thresholds.get(variant),
                    headline=variant == self.headline_variant,
                    info={"aux_balanced_accuracy": self.aux_balanced_accuracy.get(variant),
                          **({"direction": "published" if self.signs.get(variant, 1.0) > 0 else "reversed on D_aux"}
                             if self.fit_direction else {})},
                )
            )
        return out


class SelectedThresholdAttack(ThresholdAttack):
    """A threshold attack with several candidate statistics (one per timestep, mixing weight, ...), of which
    ``fit`` picks the one with the highest AUC on D_aux: that choice is the headline variant ``selected``
    (honest: chosen without D_te). Every candidate stays a row of its own, so the best candidate on D_te, the
    oracle choice, is visible as a labelled extra."""

    headline_variant: ClassVar[str] = "selected"

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None

    @abstractmethod
    def candidates(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        """``{candidate: scores}``, higher = member."""

    def statistics(self, inputs: AttackInputs) -> dict[str, np.ndarray]:
        stats = self.candidates(inputs)
        if self.selected is not None:
            stats["selected"] = stats[self.selected]
        return stats

    def fit(self, aux: AttackInputs, labels: np.ndarray, *, oracle: tuple[AttackInputs, np.ndarray] | None = None) -> None:
        self._check(aux)
        y = check_labels(labels, len(aux))
        stats = self.candidates(aux)
        aucs = {name: roc_auc(y, scores) for name, scores in stats.items()}
        if self.fit_direction:  # a reversed statistic is as good as its distance from 0.5
            aucs = {name: max(auc, 1.0 - auc) for name, auc in aucs.items()}
        self.selected = max(aucs, key=aucs.__getitem__)  # the first one on a tie
        super().fit(aux, labels, oracle=oracle)

    def score(self, inputs: AttackInputs) -> list[ScoreSet]:
        out = super().score(inputs)
        for score_set in out:
            score_set.info["selected_on_aux"] = self.selected
        return out


class LossFeatureAttack(ThresholdAttack):
    """A threshold attack on the feature engine's shared fixed-t losses (K timesteps x M draws per sample).

    Its cost is those K*M queries per sample, times ``models_queried`` (2 when the base model's losses are
    queried too, as a reference)."""

    models_queried: ClassVar[int] = 1

    def __init__(self, loss_queries: int = 0) -> None:
        super().__init__()
        self.loss_queries = int(loss_queries)

    @classmethod
    def from_config(cls, config: EvalConfig, device: torch.device) -> Attack:
        return cls(len(config.timesteps) * config.num_noise_draws)

    def queries_per_sample(self) -> float:
        return float(self.loss_queries * self.models_queried)


def per_timestep_statistics(losses: np.ndarray, timesteps: Sequence[int]) -> dict[str, np.ndarray]:
    """``-loss`` at each timestep (mean over draws) and averaged over all K x M queries."""
    # 0.0 - x rather than -x: a zero statistic stays +0.0 (the base model calibrated against itself).
    stats = {f"t={t}": 0.0 - losses[:, k, :].mean(axis=1) for k, t in enumerate(timesteps)}
    stats["avg"] = 0.0 - losses.reshape(losses.shape[0], -1).mean(axis=1)
    return stats
