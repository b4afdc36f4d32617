"""Tests for library/attacks: the interface, score directions and metrics plumbing on synthetic features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.errors import ConfigError
from library.eval.attacks import (
    ATTACK_NAMES,
    DEFAULT_ATTACKS,
    attack_class,
    build_attacks,
)
from library.eval.attacks.base import (
    Attack,
    AttackInputs,
    FeatureSet,
    SelectedThresholdAttack,
    ThresholdAttack,
)
from library.eval.attacks.calibrated import CalibratedLossAttack
from library.eval.attacks.loss_threshold import LossThresholdAttack
from library.eval.attacks.paper_mlp import PaperMLPAttack, stratified_holdout
from library.eval.config import EvalConfig
from library.eval.metrics import roc_auc

TIMESTEPS = (50, 100, 200)


def synthetic(n_members: int, n_nonmembers: int, shift: float, seed: int, paper_dim: int = 16):
    """Losses [N, K, M] where members' losses are lower by ``shift``; error maps shifted the same way."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_members, dtype=np.int64), np.zeros(n_nonmembers, dtype=np.int64)]
    n = labels.size
    difficulty = rng.normal(1.0, 0.3, size=(n, 1, 1))  # per-sample difficulty shared by both models
    noise = rng.normal(0.0, 0.05, size=(n, len(TIMESTEPS), 2))
    reference = np.abs(difficulty + noise)
    target = reference - shift * labels[:, None, None] + rng.normal(0.0, 0.02, size=reference.shape)
    paper = np.abs(rng.normal(1.0, 0.3, size=(n, paper_dim)) - shift * labels[:, None]).astype(np.float32)
    inputs = AttackInputs(FeatureSet(target, TIMESTEPS, paper), FeatureSet(reference, TIMESTEPS, paper))
    return inputs, labels


def by_variant(score_sets):
    return {s.variant: s for s in score_sets}


def test_registry_and_interface():
    suite = {"paper", "loss", "calibrated", "secmi", "pia", "pian", "clid", "gsa", "sima", "blackbox",
             "reconstruction", "rediffuse", "blind"}
    # The default is the whole suite; PFAMI is registered but opt-in (docs/attacks.md: its cost, its demo AUC).
    assert set(DEFAULT_ATTACKS) == suite and set(ATTACK_NAMES) == suite | {"pfami"}
    for name in ATTACK_NAMES:
        cls = attack_class(name)
        assert issubclass(cls, Attack) and cls.name == name
        assert cls.threat_model and cls.citation, f"attack {name} must state its threat model and citation"
    assert [name for name in ATTACK_NAMES if attack_class(name).floor] == ["blind"]
    assert attack_class("loss") is LossThresholdAttack and attack_class("calibrated") is CalibratedLossAttack
    assert CalibratedLossAttack.needs_reference and not LossThresholdAttack.needs_reference
    with pytest.raises(ConfigError, match="unknown attack"):
        attack_class("nope")


def test_attacks_are_built_from_the_config_by_their_own_class():
    config = EvalConfig(attacks=["loss", "paper"], paper_epochs=7, paper_lr=3e-4, paper_features="loss",
                        holdout_fraction=0.1, seed=5)
    loss, paper = build_attacks(config, "cpu")
    assert isinstance(loss, LossThresholdAttack) and isinstance(paper, PaperMLPAttack)
    assert (paper.epochs, paper.lr, paper.features, paper.holdout_fraction, paper.seed) == (7, 3e-4, "loss", 0.1, 5)
    assert EvalConfig.__dataclass_fields__["attacks"].metadata["choices"] == list(ATTACK_NAMES)


def test_loss_attack_scores_members_higher_and_fits_threshold_on_aux():
    aux, aux_y = synthetic(40, 40, shift=0.2, seed=0)
    test, test_y = synthetic(40, 40, shift=0.2, seed=1)
    attack = LossThresholdAttack()
    attack.fit(aux, aux_y)
    sets = by_variant(attack.score(test))
    assert set(sets) == {"t=50", "t=100", "t=200", "avg"}
    assert sets["avg"].headline and sets["avg"].kind == "threshold"
    # Score = -loss exactly, and the honest threshold comes from D_aux.
    np.testing.assert_allclose(sets["avg"].scores, -test.target.losses.reshape(80, -1).mean(1))
    assert sets["avg"].threshold == attack.thresholds["avg"]
    assert roc_auc(test_y, sets["avg"].scores) > 0.6


def test_each_per_timestep_row_of_the_loss_attack_uses_its_own_timestep():
    aux, aux_y = synthetic(10, 10, shift=0.2, seed=0)
    attack = LossThresholdAttack()
    attack.fit(aux, aux_y)
    sets = by_variant(attack.score(aux))
    losses = aux.target.losses
    for k, t in enumerate(TIMESTEPS):  # -loss at timestep k, mean over the M draws
        np.testing.assert_allclose(sets[f"t={t}"].scores, -losses[:, k, :].mean(axis=1))
    assert not np.allclose(sets["t=50"].scores, sets["t=200"].scores)  # the rows differ, so the check bites


def _one_statistic(values) -> AttackInputs:
    """Features whose only statistic is ``values`` (K = 1 timestep, M = 1 draw)."""
    return AttackInputs(FeatureSet(np.asarray(values, float)[:, None, None], (0,)))


class _DirectionFitted(ThresholdAttack):
    name = "test-direction"
    fit_direction = True

    def statistics(self, inputs):
        return {"stat": inputs.target.losses[:, 0, 0]}


class _DirectionFittedSelection(SelectedThresholdAttack):
    name = "test-selection"
    fit_direction = True

    def candidates(self, inputs):
        return {"weak": inputs.target.losses[:, 0, 0], "strong reversed": inputs.target.losses[:, 0, 1]}


def test_a_fitted_direction_keeps_the_sign_when_members_score_higher_on_aux_and_reverses_it_when_lower():
    y = np.array([1, 1, 1, 0, 0, 0])
    higher = np.array([4.0, 5.0, 6.0, 1.0, 2.0, 3.0])  # AUC 1 on D_aux: the published direction holds
    attack = _DirectionFitted()
    attack.fit(_one_statistic(higher), y)
    (row,) = attack.score(_one_statistic(higher))
    assert row.info["direction"] == "published" and attack.signs["stat"] == 1.0
    np.testing.assert_array_equal(row.scores, higher)
    lower = -higher  # AUC 0 on D_aux: reversed, so the row's scores are -stat and members score higher again
    attack.fit(_one_statistic(lower), y)
    (row,) = attack.score(_one_statistic(lower))
    assert row.info["direction"] == "reversed on D_aux" and attack.signs["stat"] == -1.0
    np.testing.assert_array_equal(row.scores, higher)
    assert roc_auc(y, row.scores) == 1.0 and row.info["aux_balanced_accuracy"] == 1.0


def test_a_fitted_direction_selects_the_candidate_farthest_from_chance_on_aux():
    from sklearn.metrics import roc_auc_score

    y = np.array([1, 1, 0, 0, 0, 0, 0])  # 2 x 5 = 10 member/non-member pairs
    weak = np.array([6.0, 2.5, 5.0, 4.0, 3.0, 2.0, 1.0])  # 7 of 10 pairs in the published order: AUC 0.7
    strong_reversed = np.array([0.5, 1.5, 5.0, 4.0, 3.0, 2.0, 1.0])  # 1 of 10: AUC 0.1, i.e. 0.9 reversed
    assert roc_auc_score(y, weak) == pytest.approx(0.7) and roc_auc_score(y, strong_reversed) == pytest.approx(0.1)
    aux = AttackInputs(FeatureSet(np.stack([weak, strong_reversed], axis=1)[:, None, :], (0,)))
    attack = _DirectionFittedSelection()
    attack.fit(aux, y)
    assert attack.selected == "strong reversed"  # 0.9 > 0.7 once reversed, though its raw AUC is the lower one
    selected = by_variant(attack.score(aux))["selected"]
    assert selected.info["selected_on_aux"] == "strong reversed" and selected.info["direction"] == "reversed on D_aux"
    assert roc_auc(y, selected.scores) == pytest.approx(0.9)


def test_calibrated_removes_difficulty_and_is_zero_against_itself():
    aux, aux_y = synthetic(40, 40, shift=0.1, seed=2)
    test, test_y = synthetic(40, 40, shift=0.1, seed=3)
    calibrated, loss = CalibratedLossAttack(), LossThresholdAttack()
    calibrated.fit(aux, aux_y)
    loss.fit(aux, aux_y)
    auc_cal = roc_auc(test_y, by_variant(calibrated.score(test))["avg"].scores)
    auc_loss = roc_auc(test_y, by_variant(loss.score(test))["avg"].scores)
    # The per-sample difficulty (std 0.3) swamps a 0.1 shift for the raw loss; calibration removes it.
    assert auc_cal > 0.95 and auc_cal > auc_loss
    itself = AttackInputs(test.reference, test.reference)
    for s in calibrated.score(itself):
        assert np.all(s.scores == 0.0) and not np.signbit(s.scores).any()


def test_calibrated_costs_the_queries_of_both_models():
    """The calibrated attack queries the fine-tune and its base model: its reported cost is twice the loss's."""
    config = EvalConfig(timesteps=[50, 100, 200], num_noise_draws=2)
    assert LossThresholdAttack.from_config(config, "cpu").queries_per_sample() == 3 * 2
    assert CalibratedLossAttack.from_config(config, "cpu").queries_per_sample() == 2 * 3 * 2


@pytest.mark.parametrize("attack", [LossThresholdAttack, CalibratedLossAttack])
def test_per_timestep_rows_keep_their_timestep_when_listed_unsorted(attack):
    """``--timesteps 200 50 100``: each t=<t> row is that timestep's column, in whatever order they were listed."""
    inputs, _ = synthetic(10, 10, shift=0.2, seed=0)
    order = (200, 50, 100)
    unsorted = AttackInputs(FeatureSet(inputs.target.losses, order), FeatureSet(inputs.reference.losses, order))
    stats = attack().statistics(unsorted)
    reference = inputs.reference.losses if attack.needs_reference else 0.0
    for k, t in enumerate(order):
        np.testing.assert_allclose(stats[f"t={t}"], -(inputs.target.losses - reference)[:, k, :].mean(axis=1))


def test_calibrated_needs_reference():
    inputs, labels = synthetic(5, 5, 0.1, seed=4)
    with pytest.raises(ConfigError, match="reference"):
        CalibratedLossAttack().fit(AttackInputs(inputs.target), labels)


@pytest.mark.parametrize("features", ["error_map", "multi_t_loss"])
def test_paper_attack_learns_direction_and_reports_both_checkpoints(features):
    aux, aux_y = synthetic(30, 30, shift=0.8, seed=5)
    test, test_y = synthetic(20, 20, shift=0.8, seed=6)
    attack = PaperMLPAttack(features=features, epochs=15, lr=1e-3, batch_size=8, holdout_fraction=0.25, seed=0)
    attack.fit(aux, aux_y, oracle=(test, test_y))
    sets = by_variant(attack.score(test))
    assert set(sets) == {"h' [oracle ckpt]", "h' [honest ckpt]"}
    for s in sets.values():
        assert s.kind == "classifier" and s.member_probs is not None
        assert np.all((s.member_probs >= 0) & (s.member_probs <= 1))
        assert 1 <= s.info["epoch"] <= 15
        assert roc_auc(test_y, s.scores) > 0.8
    assert sets["h' [oracle ckpt]"].checkpoint == "oracle"
    # The oracle checkpoint is the best epoch on D_te by construction.
    oracle = sets["h' [oracle ckpt]"]
    assert oracle.info["selection_asr"] == max(oracle.info["curve_asr"])
    # Deterministic for a seed.
    again = PaperMLPAttack(features=features, epochs=15, lr=1e-3, batch_size=8, holdout_fraction=0.25, seed=0)
    again.fit(aux, aux_y, oracle=(test, test_y))
    np.testing.assert_array_equal(by_variant(again.score(test))["h' [honest ckpt]"].scores,
                                  sets["h' [honest ckpt]"].scores)


def test_paper_attack_with_several_draws_averages_them():
    """D draws per sample: each epoch trains on one draw, the score is p(member) averaged over the D draws."""
    rng = np.random.default_rng(9)

    def drawn(n: int, seed: int):
        inputs, labels = synthetic(n, n, shift=0.3, seed=seed)
        # Three noisy draws around each sample's map: one draw is weak evidence, their mean is better.
        paper = inputs.target.paper + rng.normal(0.0, 0.6, size=(2 * n, 3, 16)).astype(np.float32)
        return AttackInputs(FeatureSet(inputs.target.losses, TIMESTEPS, np.abs(paper))), labels

    aux, aux_y = drawn(40, 10)
    test, test_y = drawn(40, 11)
    attack = PaperMLPAttack(features="error_map", epochs=12, lr=1e-3, batch_size=8, holdout_fraction=0.25, seed=0)
    attack.fit(aux, aux_y)
    assert attack.draws == 3 and attack.queries_per_sample() == 3.0 and attack.settings()["draws"] == 3
    (honest,) = attack.score(test)
    state, _ = attack.checkpoints["honest"]
    model = attack._new_model()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        per_draw = [torch.softmax(model(torch.as_tensor(test.target.paper[:, d])), dim=1)[:, 1].numpy()
                    for d in range(3)]
    np.testing.assert_allclose(honest.scores, np.mean(per_draw, axis=0), rtol=1e-5)
    assert roc_auc(test_y, honest.scores) > max(roc_auc(test_y, p) for p in per_draw) - 0.02


def test_paper_attack_without_oracle_or_holdout():
    aux, aux_y = synthetic(10, 10, shift=0.5, seed=7)
    attack = PaperMLPAttack(features="error_map", epochs=2, lr=1e-3, batch_size=4, holdout_fraction=0.0)
    attack.fit(aux, aux_y)
    assert attack.score(aux) == []  # neither checkpoint can be chosen: nothing to report
    attack = PaperMLPAttack(features="error_map", epochs=2, lr=1e-3, batch_size=4, holdout_fraction=0.2)
    attack.fit(aux, aux_y)
    assert [s.checkpoint for s in attack.score(aux)] == ["honest"]


def test_paper_attack_needs_its_features():
    inputs, labels = synthetic(5, 5, 0.1, seed=8)
    bare = AttackInputs(FeatureSet(inputs.target.losses, TIMESTEPS))
    with pytest.raises(ConfigError, match="random-t features"):
        PaperMLPAttack(features="error_map", epochs=1).fit(bare, labels)


def _row_tagged(n_members: int, n_nonmembers: int, draws: int = 1):
    """D_aux whose h' features name their row and draw: feature value = 100 * draw + row + 1 (all positive)."""
    labels = np.r_[np.ones(n_members, dtype=np.int64), np.zeros(n_nonmembers, dtype=np.int64)]
    n = labels.size
    tags = 100.0 * np.arange(draws)[None, :, None] + np.arange(n)[:, None, None] + 1.0
    paper = np.broadcast_to(tags, (n, draws, 4)).astype(np.float32)
    losses = np.ones((n, len(TIMESTEPS), 1))
    return AttackInputs(FeatureSet(losses, TIMESTEPS, paper)), labels


def _rows_of(x: torch.Tensor) -> np.ndarray:
    """The D_aux rows of a tagged feature tensor [N, D, F] (draw 0's tag is row + 1)."""
    return x[:, 0, 0].numpy().astype(np.int64) - 1


def test_honest_paper_attack_trains_without_its_holdout_and_selects_on_it(monkeypatch):
    """The honest h' must never train on the rows it picks its epoch on, or its ASR is the oracle's optimism again."""
    aux, labels = _row_tagged(10, 10)
    test, test_y = _row_tagged(6, 6)
    calls = []

    def record_train(self, x, y, monitor_x, monitor_y, seed, use_ce_tiebreak):
        calls.append({"train": _rows_of(x), "y": y, "monitor": _rows_of(monitor_x), "monitor_y": monitor_y,
                      "tiebreak": use_ce_tiebreak})
        return {}, 1, [{"epoch": 1, "asr": 0.5, "ce": 0.7}]

    monkeypatch.setattr(PaperMLPAttack, "_train", record_train)
    PaperMLPAttack(features="error_map", epochs=1, holdout_fraction=0.2, seed=3).fit(aux, labels, oracle=(test, test_y))
    oracle, honest = calls
    # The oracle h' trains on all of D_aux and monitors D_te (the paper's protocol, labelled "oracle").
    np.testing.assert_array_equal(oracle["train"], np.arange(20))
    np.testing.assert_array_equal(oracle["monitor"], np.arange(12))
    train_idx, hold_idx = stratified_holdout(labels, 0.2, seed=3)
    assert honest["tiebreak"] and not oracle["tiebreak"]
    np.testing.assert_array_equal(honest["train"], train_idx)
    np.testing.assert_array_equal(honest["y"], labels[train_idx])
    np.testing.assert_array_equal(honest["monitor"], hold_idx)
    np.testing.assert_array_equal(honest["monitor_y"], labels[hold_idx])
    assert not set(honest["train"]) & set(honest["monitor"]) and len(hold_idx) == 4


def test_paper_attack_trains_the_oracle_and_honest_h_from_their_own_seeds(monkeypatch):
    """The oracle h' starts from the evaluation seed and the honest one from seed + 1: two independent inits, the
    same for every run with that seed (so reported h' numbers are reproducible)."""
    aux, labels = _row_tagged(10, 10)
    seeds = []

    def record_train(self, x, y, monitor_x, monitor_y, seed, use_ce_tiebreak):
        seeds.append(seed)
        return {}, 1, [{"epoch": 1, "asr": 0.5, "ce": 0.7}]

    monkeypatch.setattr(PaperMLPAttack, "_train", record_train)
    PaperMLPAttack(features="error_map", epochs=1, holdout_fraction=0.2, seed=5).fit(aux, labels, oracle=(aux, labels))
    assert seeds == [5, 6]


def test_paper_attack_epoch_trains_on_every_row_of_the_larger_class(monkeypatch):
    """Balanced batches cycle the smaller class, so an epoch still sees every sample of the larger one (the
    paper's epochs are passes over all of D_aux)."""
    aux, labels = _row_tagged(9, 3)
    trained: set[int] = set()
    new_model = PaperMLPAttack._new_model

    def spying_model(self):
        model = new_model(self)
        forward = model.forward

        def recording(features, update_stats=None):
            if model.training:
                trained.update((features[:, 0].long() - 1).tolist())
            return forward(features, update_stats)

        model.forward = recording
        return model

    monkeypatch.setattr(PaperMLPAttack, "_new_model", spying_model)
    attack = PaperMLPAttack(features="error_map", epochs=1, lr=1e-3, batch_size=2, holdout_fraction=0.0)
    attack.fit(aux, labels, oracle=(aux, labels))
    assert trained == set(range(12))


def test_paper_attack_rows_say_where_their_epoch_was_chosen():
    """The report must label the oracle checkpoint as chosen on D_te and the honest one on the D_aux hold-out."""
    aux, aux_y = synthetic(8, 8, shift=0.5, seed=14)
    attack = PaperMLPAttack(features="error_map", epochs=2, lr=1e-3, batch_size=4, holdout_fraction=0.25)
    attack.fit(aux, aux_y, oracle=(aux, aux_y))
    sets = by_variant(attack.score(aux))
    assert sets["h' [oracle ckpt]"].info["selection_set"] == "D_te"
    assert sets["h' [honest ckpt]"].info["selection_set"] == "D_aux hold-out"


def test_paper_attack_epoch_e_trains_on_draw_e_mod_d(monkeypatch):
    """With D draws, epoch e sees draw (e - 1) mod D of every sample: the D draws are there to be trained on."""
    aux, labels = _row_tagged(8, 8, draws=3)
    events = []  # (training?, draws of the batch's rows), in call order
    new_model = PaperMLPAttack._new_model

    def spying_model(self):
        model = new_model(self)
        forward = model.forward

        def recording(features, update_stats=None):
            events.append((model.training, set((features[:, 0] // 100).long().tolist())))
            return forward(features, update_stats)

        model.forward = recording
        return model

    monkeypatch.setattr(PaperMLPAttack, "_new_model", spying_model)
    PaperMLPAttack(features="error_map", epochs=6, lr=1e-3, batch_size=4, holdout_fraction=0.25).fit(aux, labels)
    # An epoch is a run of training batches, ended by the hold-out evaluation (eval mode).
    per_epoch, current = [], set()
    for training, draws in events:
        if training:
            current |= draws
        elif current:
            per_epoch.append(current)
            current = set()
    assert per_epoch == [{0}, {1}, {2}, {0}, {1}, {2}]


def test_paper_attack_epoch_selection_breaks_asr_ties_by_lower_ce_then_earlier_epoch(monkeypatch):
    """The documented selection: best ASR; the honest h' breaks ties by lower hold-out CE, then the earlier epoch;
    the oracle h' (the paper's, upstream's strict `>`) keeps the earliest best-ASR epoch."""
    # (hold-out ASR, CE) per epoch: epoch 1's lowest CE loses to a higher ASR; epochs 2-5 tie on ASR.
    script = [(0.5, 0.3), (0.75, 0.6), (0.75, 0.4), (0.75, 0.5), (0.75, 0.4)]
    evaluations = []

    def scripted_evaluate(self, model, x, y):
        evaluations.append(None)
        return script[(len(evaluations) - 1) % len(script)]

    monkeypatch.setattr(PaperMLPAttack, "_evaluate", scripted_evaluate)
    aux, aux_y = synthetic(8, 8, shift=0.5, seed=12)
    test, test_y = synthetic(4, 4, shift=0.5, seed=13)
    attack = PaperMLPAttack(features="error_map", epochs=len(script), lr=1e-3, batch_size=4, holdout_fraction=0.25)
    attack.fit(aux, aux_y, oracle=(test, test_y))
    assert len(evaluations) == 2 * len(script)  # each h' is evaluated once per epoch, from epoch 1 again
    assert attack.checkpoints["honest"][1] == 3  # CE 0.4 beats 0.6 and 0.5; epoch 5's equal 0.4 comes later
    assert attack.checkpoints["oracle"][1] == 2  # no CE tie-break: the first epoch at ASR 0.75
    assert [c["ce"] for c in attack.curves["honest"]] == [ce for _, ce in script]


def test_stratified_holdout_keeps_both_classes():
    labels = np.r_[np.ones(10, dtype=np.int64), np.zeros(10, dtype=np.int64)]
    train, hold = stratified_holdout(labels, 0.2, seed=0)
    assert len(set(train) & set(hold)) == 0 and len(train) + len(hold) == 20
    assert labels[hold].sum() == 2 and (labels[hold] == 0).sum() == 2


def test_stratified_holdout_holds_out_at_least_one_of_each_class_and_follows_the_seed():
    """A small fraction still holds out one of each class (else the honest h' has no hold-out to choose on), and
    the split is the evaluation seed's (so another seed is another, reproducible, split)."""
    labels = np.r_[np.ones(10, dtype=np.int64), np.zeros(10, dtype=np.int64)]
    _, hold = stratified_holdout(labels, 0.01, seed=0)
    assert sorted(labels[hold].tolist()) == [0, 1]
    splits = {tuple(stratified_holdout(labels, 0.2, seed=s)[1]) for s in range(4)}
    assert len(splits) > 1
    np.testing.assert_array_equal(stratified_holdout(labels, 0.2, seed=3)[1], stratified_holdout(labels, 0.2, seed=3)[1])


def test_holdout_refuses_a_class_it_would_empty():
    """A class of one cannot lose a sample to the hold-out: h' would train without that class, so it is refused
    up front, with the fix in the message."""
    labels = np.r_[np.ones(1, dtype=np.int64), np.zeros(6, dtype=np.int64)]
    with pytest.raises(ConfigError, match="too few to hold any out"):
        stratified_holdout(labels, 0.2, seed=0)
    with pytest.raises(ConfigError, match="holdout_fraction 0"):
        PaperMLPAttack(holdout_fraction=0.2).check_labels(labels)
    PaperMLPAttack(holdout_fraction=0.0).check_labels(labels)  # no hold-out: nothing to refuse


def test_multi_t_loss_features_are_one_column_per_timestep_averaged_over_draws():
    """h' with multi_t_loss reads the fixed-t losses [N, K, M] as one draw of K features, each a timestep's loss
    averaged over its M noise draws (not one feature per draw averaged over the timesteps)."""
    inputs, _ = synthetic(3, 3, shift=0.5, seed=4)
    x = PaperMLPAttack(features="multi_t_loss").matrix(inputs)
    assert x.shape == (6, 1, len(TIMESTEPS))
    np.testing.assert_allclose(x[:, 0], inputs.target.losses.mean(axis=2), rtol=1e-6)


def test_paper_attack_monitors_several_draws_by_their_averaged_member_probability():
    """With D > 1 draws the epoch is chosen on the same draw-averaged p(member) that scores D_te, not on draw 0."""
    attack = PaperMLPAttack(features="error_map")
    attack.in_features = 4
    with torch.random.fork_rng():  # seeded, without moving the global stream later tests in this worker draw from
        torch.manual_seed(0)
        model = attack._new_model()
        x = torch.rand(10, 3, 4) * torch.tensor([1.0, 5.0, 25.0]).view(1, 3, 1)  # draws far apart
    y = np.r_[np.ones(5, dtype=np.int64), np.zeros(5, dtype=np.int64)]
    acc, ce = attack._evaluate(model, x, y)
    p = attack._member_probs(model, x).double()
    assert acc == float(((p > 0.5).numpy() == y).mean())
    assert ce == pytest.approx(float(torch.nn.functional.binary_cross_entropy(p, torch.as_tensor(y).double())))


def test_paper_attack_refuses_an_unknown_feature_kind():
    """A misspelt paper_features is one ConfigError naming the choices, not a silent fallback to another input."""
    with pytest.raises(ConfigError, match="error_map, loss or multi_t_loss"):
        PaperMLPAttack(features="x")


def test_feature_set_validates_shapes():
    with pytest.raises(ValueError):
        FeatureSet(np.zeros((3, 2, 1)), TIMESTEPS)
    with pytest.raises(ValueError):
        AttackInputs(FeatureSet(np.zeros((3, 3, 1)), TIMESTEPS), FeatureSet(np.zeros((4, 3, 1)), TIMESTEPS))


def test_config_reads_the_registries_without_importing_torch():
    """--help stays fast: the attack and extractor registries give their names without importing torch."""
    import subprocess
    import sys

    code = "import sys, library.eval.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
