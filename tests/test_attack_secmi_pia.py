"""SecMI, PIA and PIAN (library/eval/attacks/secmi.py, pia.py): each statistic equals a hand computation with
direct UNet calls on the tiny model, the DDIM inversion is undone by the steps back, eps(z_0, 0, c) is one query
shared by SecMI, PIA, PIAN and SimA, and the attacks run end to end in evaluate_mia.py."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import DDPMScheduler
from mia_world import base_args

import evaluate_mia
from library.eval.attacks import attack_class
from library.eval.attacks.ddim import ddim_step
from library.eval.attacks.pia import (
    PIAAttack,
    PIANAttack,
    PIANProbe,
    PIAProbe,
    gaussian_rescaled,
)
from library.eval.attacks.secmi import (
    SecMIAttack,
    SecMIProbe,
    ddim_inversion,
    step_back_errors,
)
from library.eval.attacks.sima import SimAAttack, SimAProbe
from library.eval.config import EvalConfig
from library.eval.features import Sample
from library.eval.probes import ModelContext, ProbeCache, QueryContext, run_probes
from library.sd.configs import SCHEDULER_SETTINGS
from library.sd.text import encode_prompts

N = 3


@pytest.fixture(scope="module")
def bundle(mia_world):
    return mia_world["bundle"]


@pytest.fixture(scope="module")
def model(bundle, tmp_path_factory):
    samples = [Sample(tmp_path_factory.getbasetemp() / f"{i}.png", "a photo", f"{i:064x}") for i in range(N)]
    return ModelContext(bundle, samples, torch.device("cpu"), torch.float32, seed=0, resolution=32)


@pytest.fixture(scope="module")
def z0():
    # Latent-scale inputs (SD latents times 0.18215 have std ~ 1): fixed, independent of any model.
    return torch.randn(N, 4, 8, 8, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hand(bundle):
    """The independent reference: alpha-bar of SD's scheduler and direct UNet calls under the true caption."""
    abar = DDPMScheduler(**SCHEDULER_SETTINGS).alphas_cumprod.double()
    with torch.no_grad():
        cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a photo"] * N)

    @torch.no_grad()
    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        return bundle.unet(z.float(), torch.full((N,), t), encoder_hidden_states=cond).sample.double()

    return abar, eps


def ddim(z, e, abar, s, s2):
    """Song et al.'s eta = 0 step s -> s2, written out (not via library.eval.attacks.ddim)."""
    x0 = (z - (1 - abar[s]).sqrt() * e) / abar[s].sqrt()
    return abar[s2].sqrt() * x0 + (1 - abar[s2]).sqrt() * e


def outputs(probe, model, z0):
    return probe.compute(QueryContext(model, range(N), z0))


# ------------------------------------------------------------------------------------------------ SecMI


def test_secmi_statistic_equals_hand_computation(model, z0, hand):
    abar, eps = hand
    t_sec, k = 30, 10
    error = outputs(SecMIProbe(t_sec, k), model, z0)["error"]
    assert error.shape == (N, t_sec // k)
    path, noise = [z0.double()], []
    for t in range(0, t_sec, k):
        noise.append(eps(path[-1], t))
        path.append(ddim(path[-1], noise[-1], abar, t, t + k))
    noise.append(eps(path[-1], t_sec))
    back = ddim(path[-1], noise[-1], abar, t_sec, t_sec - k)
    expected = ((back - path[-2]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(error[:, -1].double(), expected, rtol=1e-4, atol=1e-9)
    # The free trajectory columns: the step back from z_10 to z_0 reuses the inversion's eps at t = 10.
    first = ((ddim(path[1], noise[1], abar, k, 0) - path[0]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(error[:, 0].double(), first, rtol=1e-4, atol=1e-9)
    assert (error > 0).all()


def test_ddim_inversion_is_undone_by_the_steps_back(model, z0, hand):
    """Invert z_0 to t = 20 (step 5), then denoise step by step with fresh predictions back to t = 0."""
    abar, eps = hand
    latents, inv_eps = ddim_inversion(QueryContext(model, range(N), z0), 20, 5)
    assert len(latents) == 5 and len(inv_eps) == 4
    # With the inversion's own eps each step is the algebraic inverse: back to z_0 up to float32 rounding.
    z = latents[-1]
    for i in range(4, 0, -1):
        z = ddim_step(z, inv_eps[i - 1], abar[5 * i].float(), abar[5 * (i - 1)].float())
    torch.testing.assert_close(z, z0, rtol=0, atol=1e-5)
    # With fresh predictions (the sampler's steps back) the error is the model's inconsistency between adjacent
    # timesteps: measured max |z - z_0| = 3.4e-3 on the tiny UNet at t <= 20 (latents of std 1), while the path
    # itself moves 0.13 away from z_0; stated bound 1e-2.
    assert (latents[-1] - z0).abs().max().item() > 0.05
    z = latents[-1].double()
    for t in range(20, 0, -5):
        z = ddim(z, eps(z, t), abar, t, t - 5)
    gap = (z - z0.double()).abs().max().item()
    assert gap < 1e-2, gap
    far = ddim(z0.double(), eps(z0, 0), abar, 0, 20)  # one big step is no substitute: the path moved
    assert (far - latents[-1].double()).abs().max().item() > gap


def test_secmi_options_and_cost():
    attack = SecMIAttack.from_config(EvalConfig(secmi_timestep=100, secmi_step=10), "cpu")
    assert attack.queries_per_sample() == 11 and attack.settings()["timestep"] == 100  # the paper's DDPM setting
    default = SecMIAttack.from_config(EvalConfig(), "cpu")
    assert default.queries_per_sample() == SecMIAttack().queries_per_sample() == 16  # SecMI's SD code: 150, k = 10
    assert attack_class("secmi") is SecMIAttack and attack.threat_model and "Duan" in attack.citation
    with pytest.raises(ValueError):
        SecMIProbe(25, 10)


def test_secmi_takes_a_single_step_and_refuses_a_zero_step():
    """t_SEC = k is one inversion step and its step back (2 queries); a zero step is refused by name, not a crash."""
    assert SecMIProbe(10, 10).queries_per_sample() == 2
    for timestep, step in [(10, 0), (10, 20), (10, -5)]:
        with pytest.raises(ValueError, match="SecMI needs"):
            SecMIProbe(timestep, step)


def test_inversions_with_different_steps_keep_their_own_queries(model, z0):
    """SecMI and PFAMI may invert with different steps in one run: their paths reach t = 10 at different latents,
    so the memoised query there must not be shared (only eps(z_0, 0) is)."""
    shared = QueryContext(model, range(N), z0)
    coarse, fine = step_back_errors(shared, 20, 10), step_back_errors(shared, 20, 5)
    # atol 0: the errors are ~1e-6, below assert_close's default absolute tolerance
    torch.testing.assert_close(fine, step_back_errors(QueryContext(model, range(N), z0), 20, 5), rtol=1e-5, atol=0)
    torch.testing.assert_close(coarse, step_back_errors(QueryContext(model, range(N), z0), 20, 10), rtol=1e-5,
                               atol=0)


# ------------------------------------------------------------------------------------------------ PIA / PIAN


def test_pia_and_pian_equal_hand_computation(model, z0, hand):
    abar, eps = hand
    timesteps = (10, 200)
    pia = outputs(PIAProbe(timesteps, 4), model, z0)["distance"]
    pian = outputs(PIANProbe(timesteps, 4), model, z0)["distance"]
    eps0 = eps(z0, 0)
    eps0_n = eps0 * math.sqrt(2 / math.pi) / eps0.abs().mean(dim=(1, 2, 3), keepdim=True)
    for k, t in enumerate(timesteps):
        for e0, got in ((eps0, pia), (eps0_n, pian)):
            zt = abar[t].sqrt() * z0.double() + (1 - abar[t]).sqrt() * e0
            expected = ((eps(zt, t) - e0).abs() ** 4).mean(dim=(1, 2, 3))
            torch.testing.assert_close(got[:, k].double(), expected, rtol=1e-4, atol=1e-12)
    assert not torch.allclose(pia, pian)  # the tiny UNet's eps_0 is not at Gaussian scale: the rescaling matters


def test_pian_rescaling_gives_gaussian_mean_abs():
    scales = torch.tensor([0.1, 1.0, 3.0, 20.0]).view(-1, 1, 1, 1)
    eps = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * scales
    scaled = gaussian_rescaled(eps)
    torch.testing.assert_close(scaled.abs().mean(dim=(1, 2, 3)), torch.full((4,), math.sqrt(2 / math.pi)))
    unit = lambda x: x / torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(unit(scaled), unit(eps))  # direction kept, scale only


def test_pian_rescaling_keeps_an_all_zero_prediction_at_zero():
    """A UNet whose output layer starts at zero predicts eps = 0: PIAN's rescaling must not turn it into NaN."""
    zeros = torch.zeros(2, 4, 8, 8)
    assert torch.equal(gaussian_rescaled(zeros), zeros)


def test_pia_refuses_timesteps_outside_1_to_999():
    """t = 0 puts z_t at the clean latent (a statistic of zero), 1000 is past the schedule, none is no attack."""
    for timesteps in [(0,), (1000,), (), (50, 0)]:
        with pytest.raises(ValueError, match="PIA needs timesteps in 1..999"):
            PIAProbe(timesteps, 4)
    assert PIAProbe((1, 999), 4).timesteps == (1, 999)


def test_pia_odd_norm_takes_absolute_differences(model, z0, hand):
    """``--pia_norm 3``: mean |eps - eps_0|^3. The default p = 4 is even, so only an odd p sees a missing
    absolute value (the signed cubes would partly cancel, and the distance could go negative)."""
    abar, eps = hand
    t = 100
    got = outputs(PIAProbe((t,), 3), model, z0)["distance"][:, 0]
    e0 = eps(z0, 0)
    zt = abar[t].sqrt() * z0.double() + (1 - abar[t]).sqrt() * e0
    torch.testing.assert_close(got.double(), ((eps(zt, t) - e0).abs() ** 3).mean(dim=(1, 2, 3)), rtol=1e-4,
                               atol=1e-12)
    assert (got > 0).all()


def test_secmi_and_pia_scores_are_the_negated_errors_at_the_right_columns():
    # Higher = member: SecMI's stat is minus the step-back error at t_SEC (the probe's last column, not t_SEC - k),
    # its trajectory minus the mean over every column; PIA's t=<t> is minus the distance at that t. On D_aux with
    # members of lower error the fitted direction is the published one (a flipped sign would read "reversed").
    import numpy as np

    from library.eval.attacks.base import AttackInputs, FeatureSet

    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 10)
    errors = rng.uniform(1.0, 2.0, size=(20, 3)) - 0.5 * labels[:, None]
    inputs = AttackInputs(FeatureSet(np.zeros((20, 1, 1)), (1,), probes={"secmi": {"error": errors},
                                                                        "pia": {"distance": errors[:, :2]}}))
    secmi = SecMIAttack(30, 10)
    candidates = secmi.candidates(inputs)
    np.testing.assert_array_equal(candidates["stat"], -errors[:, 2])
    np.testing.assert_allclose(candidates["trajectory"], -(errors[:, 0] + errors[:, 1] + errors[:, 2]) / 3)
    pia = PIAAttack((10, 200), 4)
    candidates = pia.candidates(inputs)
    np.testing.assert_array_equal(candidates["t=10"], -errors[:, 0])
    np.testing.assert_array_equal(candidates["t=200"], -errors[:, 1])
    for attack in (secmi, pia):
        attack.fit(inputs, labels)
        rows = {s.variant: s for s in attack.score(inputs)}
        assert rows["selected"].info["direction"] == "published", attack.name


def test_sima_scores_are_the_negated_norms_at_their_timesteps():
    """SimA's t=<t> candidate is minus the norm in that t's column (higher = member, the paper's direction)."""
    import numpy as np

    from library.eval.attacks.base import AttackInputs, FeatureSet

    norms = np.random.default_rng(1).uniform(0.0, 1.0, size=(6, 3))
    inputs = AttackInputs(FeatureSet(np.zeros((6, 1, 1)), (1,), probes={"sima": {"norm": norms}}))
    candidates = SimAAttack((0, 10, 50), 2).candidates(inputs)
    assert list(candidates) == ["t=0", "t=10", "t=50"]
    for k, name in enumerate(candidates):
        np.testing.assert_array_equal(candidates[name], -norms[:, k])


def test_sima_statistic_equals_hand_computation(model, z0, hand):
    """mean |eps(z_0, t, c)|^p over latent elements; an odd p = 3 also checks the absolute value."""
    _, eps = hand
    got = outputs(SimAProbe((0, 10), 3), model, z0)["norm"]
    for k, t in enumerate((0, 10)):
        torch.testing.assert_close(got[:, k].double(), (eps(z0, t).abs() ** 3).mean(dim=(1, 2, 3)), rtol=1e-4,
                                   atol=1e-12)


def test_sima_options_and_cost():
    """--sima_timesteps and --sima_norm reach the probe and the report; one query per candidate t."""
    attack = SimAAttack.from_config(EvalConfig(sima_timesteps=[0, 5, 30], sima_norm=4), "cpu")
    assert attack.settings() == {"timesteps": [0, 5, 30], "norm": 4} and attack.queries_per_sample() == 3


def test_pia_options_and_cost():
    config = EvalConfig(pia_timesteps=[20, 40, 60], pia_norm=2)
    pia, pian = PIAAttack.from_config(config, "cpu"), PIANAttack.from_config(config, "cpu")
    assert pia.queries_per_sample() == pian.queries_per_sample() == 4
    assert (pia.probe.name, pian.probe.name) == ("pia", "pian") and pian.settings()["normalized"]
    assert pia.settings()["norm"] == pian.settings()["norm"] == 2  # --pia_norm reaches the statistic
    assert attack_class("pia") is PIAAttack and attack_class("pian") is PIANAttack
    assert "PIAN" in pian.citation and "Kong" in pia.citation


# ------------------------------------------------------------------------------------------------ sharing


def test_eps0_is_one_query_for_secmi_pia_pian_and_sima(model, z0):
    probes = [SimAProbe((0, 10), 2), PIAProbe((50, 100), 4), PIANProbe((50, 100), 4), SecMIProbe(30, 10)]
    runs = run_probes(probes, model, z0, batch_size=2, cache=ProbeCache(None), model_identity={"test": 1})
    computed = {name: run.queries_computed for name, run in runs.items()}
    nominal = sum(p.queries_per_sample() for p in probes)  # 2 + 3 + 3 + 4 = 12 per sample
    # Distinct queries: eps(z_0, 0) once, SimA t=10, PIA 2, PIAN 2, SecMI's inversion at 10, 20 and its step back.
    assert sum(computed.values()) == N * (nominal - 3) == N * 9
    assert computed == {"sima": 2 * N, "pia": 2 * N, "pian": 2 * N, "secmi": 3 * N}  # the first probe paid eps_0
    for probe in probes:  # sharing changes costs, never values
        alone = run_probes([probe], model, z0, batch_size=N, cache=ProbeCache(None), model_identity={"test": 1})
        for name, value in alone[probe.name].outputs.items():
            torch.testing.assert_close(value, runs[probe.name].outputs[name])


# ------------------------------------------------------------------------------------------------ end to end


def test_end_to_end_report_rows_and_costs(mia_world, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate_mia.main(base_args(mia_world, out, "--network_weights", str(mia_world["lora"]),
                                     "--attacks", "secmi", "pia", "pian", "--secmi_timestep", "20",
                                     "--secmi_step", "5", "--pia_timesteps", "5", "10", "20", "50"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert {"secmi": 5, "pia": 5, "pian": 5} == {k: v["queries_per_sample"] for k, v in report["attacks"].items()}
    headline = {(r["model"], r["attack"]): r for r in report["results"] if r["headline"]}
    assert set(headline) == {(m, a) for m in ("base", "overfit") for a in ("secmi", "pia", "pian")}
    aucs = {key: (round(r["auc"], 3), [round(c, 3) for c in r["auc_ci"]]) for key, r in headline.items()}
    print("headline AUC [95% CI] on D_te:", aucs)
    variants = {r["label"] for r in report["results"] if r["model"] == "overfit"}
    assert {"secmi selected", "secmi stat", "secmi trajectory", "pia selected", "pia t=5", "pian t=50"} <= variants
    # Queries actually computed: SecMI (first in --attacks) pays eps(z_0, 0); PIA and PIAN reuse it.
    computed = {p: run["queries_computed"] for p, run in report["features"]["probes"]["overfit"].items()}
    assert computed == {"secmi": 48 * 5, "pia": 48 * 4, "pian": 48 * 4}
    # Detection on an over-fitted LoRA and chance on the base model are asserted on the pre-trained attack world
    # (tests/test_attack_suite.py); this world's D_te (16 + 16) is too small for a CI to mean much.
    for row in headline.values():
        assert row["info"]["direction"] in ("published", "reversed on D_aux")
