"""CLiD (caption degradation, conditional losses, robust scaling on D_aux) and GSA1/GSA2 (per-sample gradient
norms of LoRA tensors, boosted trees): hand computations with direct UNet calls on the tiny stack, invariants,
and an end-to-end run of evaluate_mia.py on the over-fitted MIA world."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from mia_world import base_args

import evaluate_mia
from library.eval.attacks.base import AttackInputs, FeatureSet
from library.eval.attacks.clid import (
    END_OF_TEXT,
    CLiDAttack,
    CLiDProbe,
    RobustScaler,
    degrade_caption,
)
from library.eval.attacks.gsa import (
    GSAAttack,
    GSAProbe,
    Standardizer,
    _group_norms,
    gsa_timesteps,
)
from library.eval.features import Sample, applied_lora
from library.eval.metrics import roc_auc
from library.eval.probes import ModelContext, QueryContext
from library.sd.text import encode_prompts

E = END_OF_TEXT
CAPTIONS = ["a photo of a red bird", "a photo"]


# ---------------------------------------------------------------------------------------------- degrade_caption


def test_degrade_caption_masks_the_longest_words_first():
    # lengths 1 5 2 1 3 4: half of 6 words = 3, the longest are photo, bird, red
    assert degrade_caption("a photo of a red bird", 0.5) == f"a {E} of a {E} {E}"
    assert degrade_caption("a photo of a red bird", 0.3) == f"a {E} of a red {E}"  # round(1.8) = 2
    assert degrade_caption("aa bb cc", 0.3) == f"{E} bb cc"  # ties: the earlier word
    assert degrade_caption("aa bb cc", 0.7) == f"{E} {E} cc"  # round(2.1) = 2


def test_degrade_caption_counts_and_edge_cases():
    caption = "one two three four five six seven eight nine ten"
    for f in (0.1, 0.25, 0.3, 0.5, 0.7, 0.95):
        out = degrade_caption(caption, f)
        assert out == degrade_caption(caption, f)  # deterministic
        words = out.split()
        assert len(words) == 10  # the word count is kept
        assert words.count(E) == min(10, max(1, int(np.floor(f * 10 + 0.5))))
    assert degrade_caption("", 0.5) == "" and degrade_caption("   ", 0.5) == "   "
    assert degrade_caption("bird", 0.3) == E  # at least one word
    assert degrade_caption("a photo", 0.5, mask="[M]") == "a [M]"
    with pytest.raises(ValueError):
        degrade_caption("a photo", 1.0)


def test_degrade_caption_refuses_a_zero_fraction():
    """A fraction of 0 is refused, not silently rounded up to one masked word (the caption would not be what the
    settings say)."""
    with pytest.raises(ValueError, match="fraction"):
        degrade_caption("a photo", 0.0)


# ---------------------------------------------------------------------------------------------- probe contexts


SPLITS = {"member_aux": (1, True), "nonmember_aux": (0, True), "member_test": (1, False),
          "nonmember_test": (0, False)}


@pytest.fixture(scope="module")
def world_samples(mia_world):
    """All 48 samples of the MIA world (their sha256 stands in for the image hash) with labels, aux mask, latents."""
    from library.data.latents import LatentCache
    from library.sd.bundle import vae_fingerprint

    bundle, manifest = mia_world["bundle"], mia_world["manifest"]
    entries = [(e, *SPLITS[split]) for split in SPLITS for e in manifest.splits()[split]]
    paths = [manifest.abs_path(e) for e, _, _ in entries]
    latents = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many(paths)
    rows = [Sample(path, e.caption, f"{i:064x}") for i, (path, (e, _, _)) in enumerate(zip(paths, entries))]
    return rows, latents, np.array([y for _, y, _ in entries]), np.array([a for _, _, a in entries])


@pytest.fixture(scope="module")
def samples(world_samples):
    """Two of them, with captions of their own (to see the masking)."""
    rows, latents = world_samples[0][:2], world_samples[1][:2]
    return [Sample(r.path, caption, r.sha256) for r, caption in zip(rows, CAPTIONS)], latents


def context(bundle, samples, network=None) -> QueryContext:
    rows, latents = samples
    model = ModelContext(bundle, rows, torch.device("cpu"), torch.float32, seed=0, resolution=32, network=network)
    return QueryContext(model, range(len(rows)), latents)


def test_clid_probe_equals_direct_unet_losses(mia_world, samples):
    bundle = mia_world["bundle"]
    probe = CLiDProbe([440, 460], [0.3, 0.5])
    ctx = context(bundle, samples)
    losses = probe.compute(ctx)["losses"]
    assert losses.shape == (2, 4, 2)
    assert ctx.queries == 2 * probe.queries_per_sample() == 2 * 2 * 4
    conditions = [CAPTIONS, ["", ""], [f"a {E} of a red {E}", f"a {E}"], [f"a {E} of a {E} {E}", f"a {E}"]]
    abar = bundle.noise_scheduler.alphas_cumprod
    with torch.no_grad():
        for k, captions in enumerate(conditions):
            cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, captions)
            for j, t in enumerate((440, 460)):
                eps = ctx.noise(f"clid:t={t}")
                z_t = abar[t].sqrt() * ctx.z0 + (1 - abar[t]).sqrt() * eps
                pred = bundle.unet(z_t, torch.tensor([t, t]), encoder_hidden_states=cond).sample
                expected = (pred - eps).pow(2).mean(dim=(1, 2, 3))
                torch.testing.assert_close(losses[:, k, j], expected, rtol=1e-5, atol=1e-7)
    assert not torch.equal(losses[:, 0], losses[:, 1])  # the caption matters
    # The true-caption query is shared through the memo: asking again costs nothing.
    eps = ctx.noise("clid:t=440")
    z_t = ctx.alpha_bar(440).sqrt() * ctx.z0 + (1 - ctx.alpha_bar(440)).sqrt() * eps
    before = ctx.queries
    ctx.predict(z_t, 440, key="noised:clid:t=440")
    assert ctx.queries == before


def clid_inputs(loss: np.ndarray, delta: np.ndarray) -> AttackInputs:
    """Probe outputs [N, 5, 3] whose mean over t is ``loss`` (true caption) and ``loss + delta`` (degraded)."""
    out = np.repeat(np.stack([loss] + [loss + delta] * 4, axis=1)[:, :, None], 3, axis=2)
    out[:, :, 0] -= 0.1
    out[:, :, 2] += 0.1
    return AttackInputs(FeatureSet(np.zeros((loss.size, 1, 1)), (1,), probes={"clid": {"losses": out}}))


def test_clid_robust_scaler_is_fitted_on_aux_only():
    rng = np.random.default_rng(0)
    y = np.repeat([1, 0], 20)
    aux_loss, aux_delta = rng.normal(1.0, 0.1, 40) - 0.2 * y, rng.normal(0.1, 0.05, 40) + 0.1 * y
    attack = CLiDAttack([440, 450, 460], [0.3, 0.5, 0.7])
    attack.fit(clid_inputs(aux_loss, aux_delta), y)
    loss_scaler, delta_scaler = attack.scalers
    q1, med, q3 = np.percentile(aux_loss, [25, 50, 75])
    assert loss_scaler.median == pytest.approx(med) and loss_scaler.iqr == pytest.approx(q3 - q1)
    q1, med, q3 = np.percentile(aux_delta, [25, 50, 75])
    assert delta_scaler.median == pytest.approx(med) and delta_scaler.iqr == pytest.approx(q3 - q1)
    # Scoring another set (shifted far away) applies D_aux's scalers unchanged, it never refits them.
    test_loss, test_delta = rng.normal(5.0, 0.1, 40) - 0.2 * y, rng.normal(3.0, 0.05, 40) + 0.1 * y
    sets = {s.variant: s for s in attack.score(clid_inputs(test_loss, test_delta))}
    assert attack.scalers == (loss_scaler, delta_scaler)
    np.testing.assert_allclose(sets["alpha=0.0"].scores, -(test_loss - loss_scaler.median) / loss_scaler.iqr)
    np.testing.assert_allclose(sets["alpha=1.0"].scores, (test_delta - delta_scaler.median) / delta_scaler.iqr)
    np.testing.assert_allclose(sets["alpha=0.3"].scores, 0.7 * sets["alpha=0.0"].scores + 0.3 * sets["alpha=1.0"].scores)
    assert len(sets) == 12 and [s.variant for s in sets.values() if s.headline] == ["selected"]
    assert sets["selected"].info["selected_on_aux"] in sets and sets["selected"].threshold is not None
    assert sets["selected"].info["robust_scaler_on_aux"] == {  # the fitted numbers, each under its own name
        "loss": {"median": loss_scaler.median, "iqr": loss_scaler.iqr},
        "mean_delta": {"median": delta_scaler.median, "iqr": delta_scaler.iqr}}
    assert roc_auc(y, sets["selected"].scores) > 0.8  # members: low loss and a large discrepancy


def test_clid_discrepancy_averages_every_degraded_caption_against_the_true_one():
    """mean_k Delta_k runs over the empty caption and every masked one, each minus the true caption's loss (the
    fitted-scaler test above degrades every caption alike, so it would not see the empty caption dropped)."""
    losses = np.array([[[1.0, 3.0], [4.0, 8.0], [2.0, 2.0], [3.0, 5.0], [9.0, 9.0]]])  # means over t: 2, 6, 2, 4, 9
    inputs = AttackInputs(FeatureSet(np.zeros((1, 1, 1)), (1,), probes={"clid": {"losses": losses}}))
    loss, delta = CLiDAttack([440, 460], [0.3, 0.5, 0.7]).loss_and_delta(inputs)
    assert loss.tolist() == [2.0] and delta.tolist() == [(4.0 + 0.0 + 2.0 + 7.0) / 4]


def test_clid_robust_scaler_without_spread_scales_by_one():
    """An IQR of 0 (e.g. a D_aux whose losses mostly tie) scales by 1: finite scores, not a division by ~0."""
    scaler = RobustScaler(np.array([2.0, 2.0, 2.0, 2.0, 5.0]))  # q1 = median = q3 = 2
    assert (scaler.median, scaler.iqr) == (2.0, 1.0)
    np.testing.assert_allclose(scaler(np.array([1.0, 4.5])), [-1.0, 2.5])


def test_clid_from_config_uses_the_configured_fractions_and_refuses_scoring_before_fit():
    """--clid_mask_fractions reaches the probe (its conditions and cost), and scoring without D_aux's scalers is an
    error that says so rather than a crash deep inside numpy."""
    from library.eval.config import EvalConfig

    attack = CLiDAttack.from_config(EvalConfig(clid_timesteps=[2, 5], clid_mask_fractions=[0.5]), torch.device("cpu"))
    assert attack.probe.fractions == (0.5,) and attack.probe.timesteps == (2, 5)
    assert attack.queries_per_sample() == 2 * (2 + 1)
    with pytest.raises(RuntimeError, match="D_aux first"):
        attack.score(clid_inputs(np.ones(4), np.zeros(4)))


# ---------------------------------------------------------------------------------------------- GSA


def snapshot(modules):
    return {f"{i}.{n}": (p.detach().clone(), p.requires_grad) for i, m in enumerate(modules)
            for n, p in m.named_parameters()}


def test_gsa_probe_reads_only_lora_gradients_and_changes_nothing(mia_world, samples):
    bundle = mia_world["bundle"]
    probe = GSAProbe(k=2)
    assert probe.timesteps == [499, 999] and gsa_timesteps(10) == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    with applied_lora(bundle, mia_world["lora"], 1.0, torch.device("cpu"), torch.float32) as network:
        modules = [bundle.unet, bundle.text_encoder, bundle.vae, network]
        before = snapshot(modules)
        ctx = context(bundle, samples, network)
        probe.begin(ctx.model)
        out = probe.compute(ctx)
        after = snapshot(modules)
        names = [n for n, _ in network.named_parameters()]
        assert probe.groups == names and out["gsa1"].shape == out["gsa2"].shape == (2, len(names))
        assert before.keys() == after.keys()
        for key, (value, flag) in before.items():
            assert torch.equal(value, after[key][0]) and flag == after[key][1], key  # bit-identical, flags restored
        assert all(p.grad is None for m in modules for p in m.parameters())
        assert (out["gsa1"] > 0).all() and (out["gsa1"] <= out["gsa2"] + 1e-6).all()  # ||mean g|| <= mean ||g||
        assert ctx.queries == 2 * probe.queries_per_sample()

        # Hand check of one feature: sample 1, one lora_up tensor, direct autograd.
        col = next(i for i, n in enumerate(names) if n.endswith("lora_up.weight"))
        tensor = dict(network.named_parameters())[names[col]]
        tensor.requires_grad_(True)
        cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, [CAPTIONS[1]]).detach()
        abar = bundle.noise_scheduler.alphas_cumprod
        grads = []
        for j, t in enumerate(probe.timesteps, start=1):
            eps = ctx.noise(f"gsa:j={j}")[1:2]
            z_t = abar[t].sqrt() * ctx.z0[1:2] + (1 - abar[t]).sqrt() * eps
            loss = (bundle.unet(z_t, torch.tensor([t]), encoder_hidden_states=cond).sample - eps).pow(2).mean()
            grads.append(torch.autograd.grad(loss, [tensor])[0])
        tensor.requires_grad_(False)
        assert float(out["gsa1"][1, col]) == pytest.approx(float((sum(grads) / 2).norm()), rel=1e-4)
        assert float(out["gsa2"][1, col]) == pytest.approx(float(sum(g.norm() for g in grads) / 2), rel=1e-4)


def test_gsa_batched_lora_gradients_equal_one_backward_per_sample(mia_world, samples):
    """The LoRA path (Opacus per-sample hooks, one backward per t for the batch) gives every feature of the
    per-sample loop (one backward per sample and t)."""
    bundle = mia_world["bundle"]
    probe = GSAProbe(k=2)
    with applied_lora(bundle, mia_world["lora"], 1.0, torch.device("cpu"), torch.float32) as network:
        ctx = context(bundle, samples, network)
        groups = list(ctx.model.parameter_groups().values())
        params = [p for group in groups for p in group]
        cond = ctx.conditioning().detach()
        noise = [ctx.noise(f"gsa:j={j}") for j in (1, 2)]
        for p in params:
            p.requires_grad_(True)
        try:
            gsa1, gsa2 = probe._batch_features(ctx, groups, params, cond, noise)
            loop = [probe._sample_features(ctx, groups, params, cond[i:i + 1], [e[i:i + 1] for e in noise], i)
                    for i in range(len(ctx))]
        finally:
            for p in params:
                p.requires_grad_(False)
    torch.testing.assert_close(gsa1, torch.stack([g1 for g1, _ in loop]), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gsa2, torch.stack([g2 for _, g2 in loop]), rtol=1e-4, atol=1e-8)


def test_gsa_on_a_text_encoder_only_lora_is_zero_and_said(mia_world, samples, tmp_path, capsys):
    """Its conditioning is detached, so no tensor of a text-encoder-only LoRA is in the UNet's graph: zero features
    and a warning that the rows are at chance by construction (it crashed in backward before)."""
    from safetensors.torch import save_file

    bundle = mia_world["bundle"]
    width, generator = bundle.text_encoder.config.hidden_size, torch.Generator().manual_seed(0)
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    te_only = tmp_path / "te_only.safetensors"
    save_file({f"{name}.lora_down.weight": torch.randn(2, width, generator=generator),
               f"{name}.lora_up.weight": torch.randn(width, 2, generator=generator),
               f"{name}.alpha": torch.tensor(2.0)}, str(te_only))
    probe = GSAProbe(k=1)
    with applied_lora(bundle, te_only, 1.0, torch.device("cpu"), torch.float32) as network:
        ctx = context(bundle, samples, network)
        probe.begin(ctx.model)
        out = probe.compute(ctx)
    assert out["gsa1"].shape[1] == len(probe.groups) > 0 and not out["gsa1"].any() and not out["gsa2"].any()
    assert "a LoRA without UNet tensors (text encoder only) gets no GSA signal" in capsys.readouterr().err


def test_gsa_probe_on_the_base_model_uses_unet_blocks(mia_world, samples):
    bundle = mia_world["bundle"]
    ctx = context(bundle, ([samples[0][0]], samples[1][:1]))
    probe = GSAProbe(k=1)
    probe.begin(ctx.model)
    out = probe.compute(ctx)
    assert "mid_block" in probe.groups and "down_blocks.0" in probe.groups
    assert out["gsa1"].shape == (1, len(probe.groups))
    torch.testing.assert_close(out["gsa1"], out["gsa2"])  # K = 1: the norm of the mean is the mean of the norms
    assert all(not p.requires_grad and p.grad is None for p in bundle.unet.parameters())


def test_gsa_attack_scores_probabilities_and_picks_a_headline_on_aux():
    rng = np.random.default_rng(0)
    y = np.repeat([1, 0], 16)

    def inputs(n_rows):
        labels = np.repeat([1, 0], n_rows // 2)
        g = np.exp(rng.normal(0, 1, (n_rows, 6)) - 1.5 * labels[:, None] * (np.arange(6) < 2))
        return AttackInputs(FeatureSet(np.zeros((n_rows, 1, 1)), (1,), probes={"gsa": {"gsa1": g, "gsa2": g * 2}}))

    attack = GSAAttack(k=10, seed=0)
    attack.fit(inputs(32), y)
    sets = attack.score(inputs(40))
    assert [s.variant for s in sets] == ["gsa1", "gsa2"] and sum(s.headline for s in sets) == 1
    labels = np.repeat([1, 0], 20)
    for s in sets:
        assert s.kind == "classifier" and s.checkpoint == "honest" and s.threshold is None
        assert np.array_equal(s.scores, s.member_probs) and ((0 <= s.scores) & (s.scores <= 1)).all()
        assert len(np.unique(s.scores)) > 2  # probabilities, not hard labels
        assert roc_auc(labels, s.scores) > 0.8
    assert attack.queries_per_sample() == 30
    assert attack.models["gsa1"][0].mean.shape == (6,)  # standardised with D_aux's statistics


def test_gsa_group_norm_pools_every_tensor_of_a_group():
    """A UNet block (the base model's parameter group) holds many tensors: its feature is the L2 norm over all
    of them, and each group gets its own tensors (LoRA groups are one tensor each, so the LoRA tests cannot see
    a slip in the group bounds)."""
    groups = [[None, None], [None], [None, None, None]]  # only the sizes are read
    grads = [torch.ones(2), torch.full((3,), 2.0), torch.tensor([3.0]), torch.tensor([3.0]), torch.zeros(2),
             torch.tensor([[4.0]])]
    torch.testing.assert_close(_group_norms(groups, grads), torch.tensor([14.0, 9.0, 25.0], dtype=torch.float64).sqrt())


def test_gsa_features_are_standardised_logs_and_a_zero_column_stays_finite():
    """Features are log norms standardised with D_aux's mean and std; a column that is the same for every sample
    (0: a text-encoder LoRA tensor, whose gradient is never taken; or a constant norm, std 0) neither gives NaN
    nor changes the scores."""
    rng = np.random.default_rng(2)
    y = np.repeat([1, 0], 12)
    x = np.exp(rng.normal(0, 2, (24, 4)) - 1.0 * y[:, None])
    x[:, 2], x[:, 3] = 0.0, 1.0
    scaler = Standardizer(x)
    logs = np.log(x[:, :2])
    np.testing.assert_allclose(scaler(x)[:, :2], (logs - logs.mean(axis=0)) / logs.std(axis=0))
    for column in scaler(x)[:, 2:].T:
        assert np.isfinite(column).all() and np.unique(column).size == 1

    def scores(features):
        attack = GSAAttack(seed=0, n_estimators=20)
        inputs = AttackInputs(FeatureSet(np.zeros((24, 1, 1)), (1,), probes={"gsa": {"gsa1": features,
                                                                                     "gsa2": features}}))
        attack.fit(inputs, y)
        return attack.score(inputs)[0].scores

    with_zero = scores(x)
    assert np.isfinite(with_zero).all()
    np.testing.assert_allclose(with_zero, scores(x[:, :2]))


def gsa_inputs(gsa1, gsa2):
    return AttackInputs(FeatureSet(np.zeros((len(gsa1), 1, 1)), (1,), probes={"gsa": {"gsa1": gsa1, "gsa2": gsa2}}))


def test_gsa_headline_is_the_variant_with_the_better_cross_validated_auc():
    """Whichever of GSA1 / GSA2 carries the signal on D_aux is the headline (by its cross-validated AUC of
    p(member)), the other one a labelled extra row."""
    rng = np.random.default_rng(1)
    y = np.repeat([1, 0], 16)
    signal = np.exp(rng.normal(0, 1, (32, 4)) - 2.0 * y[:, None])
    noise = np.exp(rng.normal(0, 1, (32, 4)))
    for informative, inputs in (("gsa1", gsa_inputs(signal, noise)), ("gsa2", gsa_inputs(noise, signal))):
        attack = GSAAttack(seed=0, n_estimators=20)
        attack.fit(inputs, y)
        assert attack.headline == informative and attack.cv_auc[informative] > 0.8
        assert attack.cv_auc[informative] > attack.cv_auc[({"gsa1", "gsa2"} - {informative}).pop()]
        assert [s.variant for s in attack.score(inputs) if s.headline] == [informative]


def test_gsa_scores_each_sample_alone_with_the_aux_fit():
    """Nothing is fitted on D_te: a sample's p(member) is the same scored alone or in a batch, and the standardiser
    is D_aux's (all of it), so scoring cannot leak the test set's statistics into the scores."""
    rng = np.random.default_rng(4)
    y = np.repeat([1, 0], 12)
    aux = {v: np.exp(rng.normal(0, 1, (24, 3)) - 1.0 * y[:, None]) for v in ("gsa1", "gsa2")}
    test = {v: 10.0 * np.exp(rng.normal(0, 1, (6, 3))) for v in ("gsa1", "gsa2")}  # far from D_aux
    attack = GSAAttack(seed=0, n_estimators=20)
    attack.fit(gsa_inputs(aux["gsa1"], aux["gsa2"]), y)
    for variant in ("gsa1", "gsa2"):
        logs = np.log(aux[variant])
        np.testing.assert_allclose(attack.models[variant][0].mean, logs.mean(axis=0))
        np.testing.assert_allclose(attack.models[variant][0].std, logs.std(axis=0))
    batch = attack.score(gsa_inputs(test["gsa1"], test["gsa2"]))
    for i in range(6):
        alone = attack.score(gsa_inputs(test["gsa1"][i : i + 1], test["gsa2"][i : i + 1]))
        assert [s.scores[0] for s in alone] == [s.scores[i] for s in batch]


def test_gsa_seed_reaches_the_cross_validation_and_from_config():
    """The evaluation's --seed shuffles the cross-validation folds (the headline choice on D_aux) and seeds the
    trees: a run is reproducible for its seed and not tied to seed 0."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from library.eval.config import EvalConfig

    assert GSAAttack.from_config(EvalConfig(seed=7, gsa_timesteps=4), torch.device("cpu")).seed == 7
    rng = np.random.default_rng(6)
    y = np.repeat([1, 0], 15)
    x = np.exp(rng.normal(0, 1, (30, 3)) - 0.7 * y[:, None])  # a weak signal: the folds move the AUC
    attack = GSAAttack(seed=7, n_estimators=20)
    attack.fit(gsa_inputs(x, x), y)
    assert attack._classifier().random_state == 7
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=7)
    p = cross_val_predict(attack._classifier(), attack.models["gsa1"][0](x), y, cv=cv, method="predict_proba")
    assert attack.cv_auc["gsa1"] == pytest.approx(roc_auc(y, p[:, 1]))
    with pytest.raises(RuntimeError, match="fit on D_aux first"):
        GSAAttack().score(gsa_inputs(x, x))


def test_gsa_without_two_folds_reports_no_cv_auc_and_keeps_gsa1():
    """A D_aux with one member cannot be cross-validated: the fit still runs (cv AUC NaN, said in the rows) and
    the headline falls back to GSA1, as it does on any tie (never chosen by what D_te would show)."""
    rng = np.random.default_rng(7)
    y = np.array([1] + [0] * 7)
    x = np.exp(rng.normal(0, 1, (8, 3)))
    attack = GSAAttack(seed=0, n_estimators=5)
    attack.fit(gsa_inputs(x, x.copy()), y)
    assert all(np.isnan(a) for a in attack.cv_auc.values()) and attack.headline == "gsa1"
    tied = GSAAttack(seed=0, n_estimators=5)
    y = np.repeat([1, 0], 6)
    x = np.exp(rng.normal(0, 1, (12, 3)))
    tied.fit(gsa_inputs(x, x.copy()), y)
    assert tied.cv_auc["gsa1"] == tied.cv_auc["gsa2"] and tied.headline == "gsa1"


def test_gsa_cross_validation_has_as_many_folds_as_the_smallest_class():
    """k = min(5, smallest class): 3 folds for a D_aux of 12 members and 3 non-members; each variant's own
    cross-validated AUC is the number reported in its row's info."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(3)
    y = np.array([1] * 12 + [0] * 3)
    features = {v: np.exp(rng.normal(0, 1, (15, 3)) - 0.5 * y[:, None]) for v in ("gsa1", "gsa2")}
    inputs = gsa_inputs(features["gsa1"], features["gsa2"])
    attack = GSAAttack(seed=0, n_estimators=20)
    attack.fit(inputs, y)
    info = {s.variant: s.info["cv_auc_on_aux"] for s in attack.score(inputs)}
    for variant, x in features.items():
        cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
        p = cross_val_predict(attack._classifier(), attack.models[variant][0](x), y, cv=cv, method="predict_proba")
        assert attack.cv_auc[variant] == pytest.approx(roc_auc(y, p[:, 1])) == info[variant]
    assert attack.cv_auc["gsa1"] != attack.cv_auc["gsa2"]


# ---------------------------------------------------------------------------------------------- end to end


def test_gsa_detects_the_overfitted_lora_at_its_timesteps(mia_world, world_samples):
    """The world's LoRA is over-fitted at t < 20 only (tests/mia_world.py), where the paper's grid (t = 99, ...,
    999) does not look: at t = 1, 5, 10 the boosted trees on 16 D_aux samples find the members (measured
    GSA1 0.836, GSA2 0.852; base model at these t: 0.578, 0.482)."""
    rows, latents, y, aux = world_samples
    bundle = mia_world["bundle"]
    with applied_lora(bundle, mia_world["lora"], 1.0, torch.device("cpu"), torch.float32) as network:
        probe = GSAProbe(timesteps=[1, 5, 10])
        model = ModelContext(bundle, rows, torch.device("cpu"), torch.float32, seed=0, resolution=32, network=network)
        outs = [probe.compute(QueryContext(model, range(a, a + 16), latents[a : a + 16])) for a in range(0, 48, 16)]
    features = {name: torch.cat([o[name] for o in outs]).double().numpy() for name in ("gsa1", "gsa2")}
    inputs = AttackInputs(FeatureSet(np.zeros((48, 1, 1)), (1,), probes={"gsa": features}))
    attack = GSAAttack(seed=0)
    attack.fit(inputs.subset(np.flatnonzero(aux)), y[aux])
    measured = {s.variant: (roc_auc(y[~aux], s.scores), s.headline) for s in attack.score(inputs.subset(np.flatnonzero(~aux)))}
    print("GSA at t = 1, 5, 10 on the over-fitted LoRA (AUC, headline):", measured)
    assert next(auc for auc, headline in measured.values() if headline) >= 0.8


# Measured with the paper's settings on this world (same LoRA): CLiD at t = 440-460 AUC 0.375 [0.19, 0.57], GSA
# K = 10 (t = 99..999) 0.363 [0.17, 0.54]: the LoRA changed nothing there. So CLiD runs at the LoRA's t here.
def test_clid_and_gsa_end_to_end(mia_world):
    out = mia_world["root"] / "eval-clid-gsa"
    rc = evaluate_mia.main(base_args(mia_world, out, "--network_weights", str(mia_world["lora"]),
                                     "--attacks", "clid", "gsa", "--clid_timesteps", "2", "5", "10",
                                     "--gsa_timesteps", "1"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["attack"], r["variant"]): r for r in report["results"]}
    for model in ("base", "overfit"):
        assert {(model, "clid", "selected"), (model, "gsa", "gsa1"), (model, "gsa", "gsa2")} <= rows.keys()
        assert sum(r["headline"] for k, r in rows.items() if k[:2] == (model, "gsa")) == 1
        assert rows[(model, "gsa", "gsa1")]["asr_honest"] is not None
        assert sum(r["headline"] for k, r in rows.items() if k[:2] == (model, "clid")) == 1
    assert report["attacks"]["clid"]["queries_per_sample"] == 15
    assert report["attacks"]["gsa"]["queries_per_sample"] == 3
    runs = report["features"]["probes"]["overfit"]
    assert runs["clid"]["queries_computed"] == 15 * 48 and runs["gsa"]["queries_computed"] == 3 * 48
    measured = {k: (round(r["auc"], 3), [round(x, 3) for x in r["auc_ci"]]) for k, r in rows.items()
                if k[2] in ("selected", "gsa1", "gsa2", "alpha=0.0", "alpha=1.0")}
    print("measured AUCs:", measured)
    clid = rows[("overfit", "clid", "selected")]
    assert clid["auc"] >= 0.8 and clid["auc_ci"][0] > 0.5  # measured 0.875 [0.75, 0.98]
    lo, hi = rows[("base", "clid", "selected")]["auc_ci"]
    assert lo <= 0.5 <= hi
    for variant in ("gsa1", "gsa2"):  # t = 999 only: nothing to see on either model
        lo, hi = rows[("base", "gsa", variant)]["auc_ci"]
        assert lo <= 0.5 <= hi
