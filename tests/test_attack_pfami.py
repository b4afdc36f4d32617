"""PFAMI (library/eval/attacks/pfami.py): the fluctuation statistic and the crop are checked against hand
computations, the probe's columns against SecMI's step-back errors on hand-encoded crops, the unperturbed
inversion is shared with SecMI, bad settings are one ConfigError, and the attack runs end to end."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from mia_world import base_args

import evaluate_mia
from library.config import make_config
from library.data.images import load_image
from library.errors import ConfigError
from library.eval.attacks.base import AttackInputs, FeatureSet
from library.eval.attacks.pfami import (
    PFAMIAttack,
    PFAMIProbe,
    center_crop_resized,
    crop_fractions,
    probability_fluctuation,
)
from library.eval.attacks.secmi import SecMIProbe
from library.eval.config import EvalConfig
from library.eval.features import Sample
from library.eval.probes import ModelContext, QueryContext

N = 3


def test_probability_fluctuation_equals_hand_computation():
    # errors [N=2, 1 + P=2, T=2]: index 0 the image itself, 1..2 its perturbations.
    errors = np.array([[[1.0, 2.0], [2.0, 2.0], [4.0, 3.0]],
                       [[4.0, 1.0], [2.0, 1.0], [4.0, 1.0]]])
    expected = np.array([[((2 - 1) / 1 + (4 - 1) / 1) / 2, ((2 - 2) / 2 + (3 - 2) / 2) / 2],
                         [((2 - 4) / 4 + (4 - 4) / 4) / 2, 0.0]])
    np.testing.assert_allclose(probability_fluctuation(errors), expected)
    # A zero error on the image itself gives a large, finite fluctuation, not inf / nan.
    assert np.isfinite(probability_fluctuation(np.array([[[0.0], [1.0]]]))).all()
    with pytest.raises(ValueError, match="1 \\+ P"):
        probability_fluctuation(errors[:, :1, :])


def test_crop_fractions_and_the_centre_crop():
    assert crop_fractions(0.95, 0.7, 6) == (0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
    assert crop_fractions(0.9, 0.7, 1) == (0.9,)
    with pytest.raises(ValueError):
        crop_fractions(1.2, 0.7, 3)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(center_crop_resized(images, 1.0), images)
    # Crop to the central 8 x 8, which holds one value per channel: the resized image is that value everywhere.
    framed = torch.full((1, 3, 16, 16), -1.0)
    framed[:, :, 4:12, 4:12] = torch.tensor([0.3, -0.2, 0.7]).view(1, 3, 1, 1)
    expected = torch.tensor([0.3, -0.2, 0.7]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    torch.testing.assert_close(center_crop_resized(framed, 0.5), expected)


def test_crop_fractions_refuse_no_perturbation_and_a_zero_fraction():
    """P = 0 (no fluctuation to measure) and a crop of 0 (an empty image) are refused where they are built."""
    for count, first, last in ((0, 0.9, 0.7), (3, 0.0, 0.7), (3, 0.9, 0.0)):
        with pytest.raises(ValueError, match="PFAMI needs"):
            crop_fractions(first, last, count)


def test_centre_crop_keeps_int_of_the_side():
    """The crop's side is int(R * fraction), as documented (torchvision's CenterCrop of that size): at 0.65 of 10
    px it is the central 6 x 6, not 7 x 7, so a 6 x 6 centre of one value fills the resized image."""
    framed = torch.full((1, 1, 10, 10), -1.0)
    framed[:, :, 2:8, 2:8] = 0.4
    torch.testing.assert_close(center_crop_resized(framed, 0.65), torch.full((1, 1, 10, 10), 0.4))


def test_centre_crop_offset_is_the_floor_of_half_the_margin():
    """The crop starts at floor((R - side) / 2), as documented (torchvision would round 3.5 to 4): the single
    pixel kept of an 8 x 8 image at 1/8 is pixel (3, 3), and resized it fills the image."""
    ramp = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    torch.testing.assert_close(center_crop_resized(ramp, 0.125), torch.full((1, 1, 8, 8), 27.0))


def test_probe_refuses_a_step_that_does_not_fit_the_timestep():
    """The inversion runs t = k, 2k, ..., t_SEC: a step of 0 or one that does not divide t_SEC is a ValueError."""
    for timestep, step in ((25, 10), (10, 0), (10, 20)):
        with pytest.raises(ValueError, match="multiple of step"):
            PFAMIProbe((0.9,), timestep=timestep, step=step, error="step_back")


def test_sum_candidate_is_the_fluctuation_summed_over_timesteps_and_defaults_cost_110():
    """The ``sum`` row is the public script's score, the fluctuation summed over t; the defaults (P = 10, the
    loss at ten timesteps) cost the public scripts' 11 x 10 queries per sample, the step-back error (SecMI's
    t_SEC 150, k 10) 11 x 16."""
    errors = np.random.default_rng(1).uniform(1.0, 2.0, size=(6, 3, 2))
    attack = PFAMIAttack((0.9, 0.8), timestep=10, step=5, error="step_back")
    inputs = AttackInputs(FeatureSet(np.zeros((6, 1, 1)), (1,), probes={"pfami": {"error": errors}}))
    np.testing.assert_allclose(attack.candidates(inputs)["sum"], probability_fluctuation(errors).sum(axis=1))
    default = PFAMIAttack()
    assert default.probe.fractions == crop_fractions(0.95, 0.7, 10) and default.queries_per_sample() == 110
    assert default.probe.timesteps == tuple(range(50, 501, 50))
    assert PFAMIAttack(error="step_back").queries_per_sample() == 176


@pytest.fixture(scope="module")
def model(mia_world):
    manifest = mia_world["manifest"]
    entries = manifest.members()[:N]
    samples = [Sample(manifest.abs_path(e), e.caption, f"{i:064x}") for i, e in enumerate(entries)]
    return ModelContext(mia_world["bundle"], samples, torch.device("cpu"), torch.float32, seed=0, resolution=32)


def encoded(model, images):
    """The hand encoding: the VAE posterior's mean times the scaling factor."""
    vae = model.bundle.vae
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def test_probe_columns_are_secmi_errors_of_the_image_and_of_each_crop(model):
    images = torch.stack([load_image(s.path, 32) for s in model.samples])
    z0 = encoded(model, images)
    probe = PFAMIProbe((0.9, 0.75), timestep=20, step=5, error="step_back")
    ctx = QueryContext(model, range(N), z0)
    errors = probe.compute(ctx)["error"]
    assert errors.shape == (N, 3, 4)
    secmi = SecMIProbe(20, 5)
    torch.testing.assert_close(errors[:, 0], secmi.compute(QueryContext(model, range(N), z0))["error"])
    for p, fraction in enumerate((0.9, 0.75), start=1):
        crop_latents = encoded(model, center_crop_resized(images, fraction))
        hand = secmi.compute(QueryContext(model, range(N), crop_latents))["error"]
        torch.testing.assert_close(errors[:, p], hand, rtol=1e-4, atol=1e-7)
    # (1 + P) inversions of 20/5 steps plus one step-back query each.
    assert ctx.queries == N * probe.queries_per_sample() == N * 3 * 5
    # Run after SecMI on the same batch, PFAMI's unperturbed inversion is SecMI's: only the crops cost queries.
    shared = QueryContext(model, range(N), z0)
    secmi.compute(shared)
    before = shared.queries
    probe.compute(shared)
    assert shared.queries - before == N * 2 * 5


def test_with_latent_mode_sample_the_crops_are_seeded_posterior_draws(model):
    """--latent_mode sample: a crop is encoded as the query images are, one posterior draw seeded by (seed, the
    image's sha256, the crop): the same for every model and batch, another for another crop or image."""
    from dataclasses import replace

    from library.data.latents import encode_pixels
    from library.runtime import hashed_seed

    images = torch.stack([load_image(s.path, 32) for s in model.samples])
    crops = center_crop_resized(images, 0.8)
    sampling = replace(model, latent_mode="sample")
    drawn = QueryContext(sampling, range(N), torch.zeros(N, 4, 8, 8)).encode_images(crops, tag="pfami-crop=0.8")
    seeds = [hashed_seed("smp-lora-mia-latent-draw", 0, s.sha256, "pfami-crop=0.8") for s in model.samples]
    torch.testing.assert_close(drawn, encode_pixels(model.bundle.vae, crops, sample_seeds=seeds))
    alone = QueryContext(sampling, [1], torch.zeros(1, 4, 8, 8)).encode_images(crops[1:2], tag="pfami-crop=0.8")
    torch.testing.assert_close(alone[0], drawn[1])  # per image, not per batch
    mean = QueryContext(model, range(N), torch.zeros(N, 4, 8, 8)).encode_images(crops, tag="pfami-crop=0.8")
    torch.testing.assert_close(mean, encoded(model, crops))
    assert not torch.allclose(drawn, mean)
    other = QueryContext(sampling, range(N), torch.zeros(N, 4, 8, 8)).encode_images(crops, tag="pfami-crop=0.7")
    assert not torch.allclose(drawn, other)
    assert PFAMIProbe((0.8,), latent_mode="sample").settings()["perturbation"].endswith("posterior draw")
    assert PFAMIProbe((0.8,)).settings()["perturbation"].endswith("posterior mean")  # its cache identity as before


def test_attack_selects_on_aux_and_scores_the_fluctuation():
    rng = np.random.default_rng(0)
    n = 40
    labels = np.repeat([1, 0], n // 2)
    errors = rng.uniform(1.0, 2.0, size=(n, 3, 2))
    errors[labels == 1, 1:, 1] *= 1.5  # members: larger errors on their crops at t = 10
    errors[:, 1:, 0] = rng.uniform(0.1, 50.0, size=(n, 2))  # t = 5: a wide, uninformative fluctuation
    attack = PFAMIAttack((0.9, 0.8), timestep=10, step=5, error="step_back")
    inputs = AttackInputs(FeatureSet(np.zeros((n, 1, 1)), (1,), probes={"pfami": {"error": errors}}))
    attack.fit(inputs, labels)
    assert attack.selected == "t=10"
    rows = {s.variant: s for s in attack.score(inputs)}
    assert set(rows) == {"sum", "t=5", "t=10", "selected"}
    np.testing.assert_allclose(rows["selected"].scores, probability_fluctuation(errors)[:, 1])
    assert rows["selected"].headline and rows["selected"].info["direction"] == "published"


def test_options_validation_and_cost():
    config = EvalConfig(pfami_perturbations=4, pfami_crop_range=[0.9, 0.6], pfami_error="step_back",
                        secmi_timestep=40, secmi_step=10)
    attack = PFAMIAttack.from_config(config, torch.device("cpu"))
    assert attack.probe.fractions == (0.9, 0.8, 0.7, 0.6)
    assert attack.queries_per_sample() == 5 * 5
    for bad, key in (({"pfami_crop_range": [0.9]}, "pfami_crop_range"),
                     ({"pfami_crop_range": [0.9, 0.0]}, "pfami_crop_range"),
                     ({"pfami_perturbations": 0}, "pfami_perturbations")):
        with pytest.raises(ConfigError, match=key):
            EvalConfig(pretrained_model_name_or_path="model", split_manifest="split.json", **bad).validate()


def test_end_to_end_report_rows_and_costs(mia_world, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate_mia.main(base_args(mia_world, out, "--network_weights", str(mia_world["lora"]),
                                     "--attacks", "pfami", "--pfami_error", "step_back", "--secmi_timestep", "20",
                                     "--secmi_step", "5",
                                     "--pfami_perturbations", "3"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["attacks"]["pfami"]
    assert entry["queries_per_sample"] == 4 * 5 and entry["crop_fractions"] == [0.95, 0.825, 0.7]
    labels = {r["label"] for r in report["results"] if r["model"] == "overfit"}
    assert {"pfami selected", "pfami sum", "pfami t=5", "pfami t=20"} <= labels
    computed = report["features"]["probes"]["overfit"]["pfami"]["queries_computed"]
    assert computed == 48 * 4 * 5


def test_loss_probe_columns_are_denoising_losses_with_the_images_own_noise(model):
    """--pfami_error loss: column p at t is ||eps_t - eps(sqrt(abar) z_p + sqrt(1 - abar) eps_t, t)||^2 / D, with
    the same paired noise eps_t for the image and every crop (no noise draw in E_p - E_0)."""
    images = torch.stack([load_image(s.path, 32) for s in model.samples])
    z0 = encoded(model, images)
    probe = PFAMIProbe((0.8,), error="loss", loss_timesteps=(50, 300))
    ctx = QueryContext(model, range(N), z0)
    errors = probe.compute(ctx)["error"]
    assert errors.shape == (N, 2, 2) and probe.timesteps == (50, 300)
    versions = (z0, encoded(model, center_crop_resized(images, 0.8)))
    cond = ctx.conditioning()
    for j, t in enumerate((50, 300)):
        abar = float(model.alphas_cumprod[t])
        eps = ctx.noise(f"pfami-loss:t={t}").float()
        for p, latents in enumerate(versions):
            z_t = abar ** 0.5 * latents + (1.0 - abar) ** 0.5 * eps
            with torch.no_grad():
                pred = model.unet(z_t, torch.full((N,), t), encoder_hidden_states=cond).sample
            hand = (pred - eps).pow(2).flatten(1).mean(dim=1)
            torch.testing.assert_close(errors[:, p, j], hand, rtol=1e-4, atol=1e-7)
    assert ctx.queries == N * probe.queries_per_sample() == N * 2 * 2
    # Another sample order gives each sample the same numbers (its noise follows the image, not the batch).
    reverse = list(range(N))[::-1]
    again = probe.compute(QueryContext(model, reverse, z0[reverse]))["error"]
    torch.testing.assert_close(again, errors[reverse])


def test_step_back_settings_keep_their_identity_and_loss_settings_differ():
    """The default error's settings (the probe cache key) are those written before --pfami_error existed, so
    cached step-back probes stay valid; the loss reads its own cache entry."""
    step_back = PFAMIProbe((0.9,), timestep=20, step=5, error="step_back")
    assert set(step_back.settings()) == {"crop_fractions", "timestep", "step", "perturbation"}
    loss = PFAMIProbe((0.9,), error="loss")
    assert loss.identity != step_back.identity and loss.settings()["timesteps"] == [50, 100, 150, 200, 250, 300,
                                                                                   350, 400, 450, 500]
    with pytest.raises(ValueError, match="error must be one of"):
        PFAMIProbe((0.9,), error="ddpm")


def test_loss_option_from_config_costs_and_validation():
    config = EvalConfig(pfami_perturbations=2, pfami_error="loss", pfami_loss_timesteps=[100, 200, 400])
    attack = PFAMIAttack.from_config(config, torch.device("cpu"))
    assert attack.queries_per_sample() == 3 * 3 and attack.settings()["error"] == "loss (paired noise)"
    errors = np.random.default_rng(2).uniform(1.0, 2.0, size=(4, 3, 3))
    inputs = AttackInputs(FeatureSet(np.zeros((4, 1, 1)), (1,), probes={"pfami": {"error": errors}}))
    assert set(attack.candidates(inputs)) == {"sum", "t=100", "t=200", "t=400"}
    for bad, key in (({"pfami_error": "ddpm"}, "'pfami_error' must be one of"),
                     ({"pfami_loss_timesteps": [50, 1000]}, "pfami_loss_timesteps"),
                     ({"pfami_loss_timesteps": []}, "pfami_loss_timesteps"),
                     ({"pfami_loss_timesteps": [50, 50]}, "pfami_loss_timesteps"),
                     ({"pfami_error": "step_back", "pfami_loss_timesteps": [100]},
                      "'pfami_loss_timesteps' is only used with --pfami_error loss")):
        with pytest.raises(ConfigError, match=key):
            make_config(EvalConfig, {"pretrained_model_name_or_path": "model", "split_manifest": "split.json", **bad})


def test_end_to_end_with_the_loss_error(mia_world, tmp_path):
    out = tmp_path / "eval"
    rc = evaluate_mia.main(base_args(mia_world, out, "--network_weights", str(mia_world["lora"]),
                                     "--attacks", "pfami", "--pfami_loss_timesteps", "100", "300",
                                     "--pfami_perturbations", "1"))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["attacks"]["pfami"]
    assert entry["queries_per_sample"] == 2 * 2 and entry["timesteps"] == [100, 300]
    labels = {r["label"] for r in report["results"] if r["model"] == "overfit"}
    assert {"pfami selected", "pfami sum", "pfami t=100", "pfami t=300"} <= labels
    assert report["features"]["probes"]["overfit"]["pfami"]["queries_computed"] == 48 * 2 * 2
