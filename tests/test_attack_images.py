"""Tests of the image-space attacks: black-box generation (Wu et al. 2022), reconstruction (Pang & Wang 2025) and
the blind baseline (Das et al. 2024), on the tiny MIA world (tests/mia_world.py)."""

from __future__ import annotations

import json
import math
import os
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from mia_world import base_args

import evaluate_mia
from library.errors import ConfigError
from library.eval.attacks.base import AttackInputs, FeatureSet
from library.eval.attacks.blackbox import (
    BlackBoxProbe,
    ddim_denoise,
    generation_noise,
    unet_eps,
)
from library.eval.attacks.blind import (
    BLIND_FEATURES,
    BlindAttack,
    BlindProbe,
    blind_features,
)
from library.eval.attacks.ddim import ddim_timesteps
from library.eval.attacks.image_distance import (
    COST_OUTPUT,
    ImageSet,
    nearest_distances,
    paired_distances,
    ssim,
)
from library.eval.attacks.reconstruction import (
    ReconstructionAttack,
    ReconstructionProbe,
    reconstruction_timesteps,
)
from library.eval.attacks.rediffuse import (
    DISTANCES,
    ReDiffuseAttack,
    ReDiffuseProbe,
    variation_timesteps,
)
from library.eval.config import EvalConfig
from library.eval.features import Sample, applied_lora
from library.eval.probes import ModelContext, QueryContext
from library.eval.summary import oracle_extra_rows
from library.fileio import sha256_file
from library.sd.configs import SCHEDULER_SETTINGS
from library.sd.text import encode_prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(mia_world):
    return mia_world


@pytest.fixture(scope="module")
def samples(world):
    manifest = world["manifest"]
    entries = manifest.member_aux + manifest.nonmember_aux
    return [Sample(manifest.abs_path(e), e.caption, sha256_file(manifest.abs_path(e))) for e in entries]


@pytest.fixture(scope="module")
def latents(world, samples):
    from library.data.latents import LatentCache
    from library.sd.bundle import vae_fingerprint

    bundle = world["bundle"]
    return LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many([s.path for s in samples])


def model_context(bundle, samples, seed=0):
    return ModelContext(bundle, samples, CPU, torch.float32, seed, 32)


def hand_ddim(unet, z, timesteps, cond, uncond, scale, alphas):
    """The DDIM loop written out: direct UNet calls, eta = 0, alpha-bar 1 after the last step."""
    z = z.float()
    for i, t in enumerate(timesteps):
        steps = torch.full((z.shape[0],), t, dtype=torch.long)
        eps = unet(z, steps, encoder_hidden_states=cond.expand(z.shape[0], -1, -1)).sample
        if scale != 1.0:
            eps_u = unet(z, steps, encoder_hidden_states=uncond.expand(z.shape[0], -1, -1)).sample
            eps = eps_u + scale * (eps - eps_u)
        a = float(alphas[t])
        a_next = float(alphas[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
        z = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return z


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_ddim_loop_equals_hand_loop(world, scale):
    bundle = world["bundle"]
    cond, uncond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a photo", ""]).split(1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = ddim_timesteps(3)
    assert timesteps == [667, 334, 1]
    alphas = bundle.noise_scheduler.alphas_cumprod.double()
    ours = ddim_denoise(z, timesteps, unet_eps(bundle.unet, cond, uncond, scale, torch.float32), alphas)
    expected = hand_ddim(bundle.unet, z, timesteps, cond, uncond, scale, alphas)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_ddim_timesteps_are_the_sd_schedulers():
    """The samplers' timesteps are SD's DDIM scheduler's ("leading", offset 1), also where steps do not divide 1000."""
    scheduler = DDIMScheduler(**SCHEDULER_SETTINGS)
    for steps in (3, 6, 7, 20, 30, 50):
        scheduler.set_timesteps(steps)
        assert ddim_timesteps(steps) == scheduler.timesteps.tolist(), steps


@torch.no_grad()
def test_blackbox_generations_are_paired_across_models_and_batches(world, samples, latents):
    bundle = world["bundle"]
    probe = BlackBoxProbe(num_images=3, steps=2, guidance_scale=2.0)
    model = model_context(bundle, samples)
    probe.begin(model)
    ctx = QueryContext(model, [0, 1], latents[[0, 1]])
    first = probe.generations(ctx, "a photo")
    assert ctx.queries == 3 * 2 * 2  # images x steps x (cond + uncond)
    # The same model seen again with the samples reversed, in another batch: identical generations.
    again = BlackBoxProbe(num_images=3, steps=2, guidance_scale=2.0)
    other = model_context(bundle, samples[::-1])
    again.begin(other)
    second = again.generations(QueryContext(other, [5], latents[[5]]), "a photo")
    assert torch.equal(first.latents, second.latents) and torch.equal(first.images, second.images)
    assert first.images.shape == (3, 3, 32, 32) and first.images.abs().max() <= 1.0
    # The starting noise is (seed, caption, i): another seed or caption starts elsewhere.
    noise = generation_noise(0, "a photo", 3, (4, 8, 8))
    assert not torch.equal(noise, generation_noise(1, "a photo", 3, (4, 8, 8)))
    assert not torch.equal(noise[0], generation_noise(0, "a drawing", 1, (4, 8, 8))[0])
    assert not torch.equal(noise[0], noise[1])
    # Cost: one caption for all samples -> caption cost / N per sample.
    assert probe.queries_per_sample() == pytest.approx(3 * 2 * 2 / len(samples))


@torch.no_grad()
def test_blackbox_probe_outputs_nearest_distances(world, samples, latents):
    bundle = world["bundle"]
    probe = BlackBoxProbe(num_images=2, steps=2, guidance_scale=1.0)
    model = model_context(bundle, samples[:3])
    probe.begin(model)
    ctx = QueryContext(model, [0, 1, 2], latents[:3])
    gen = probe.generations(ctx, "a photo")
    assert ctx.queries == 2 * 2  # images x steps, no guidance
    out = probe.compute(ctx)
    assert ctx.queries == 4, "the caption's generations are made once per model"
    assert probe._generated == {}, "released after the caption's last sample"
    expected_pixel = torch.stack([((ctx.images()[i] - gen.images) ** 2).flatten(1).mean(1).min() for i in range(3)])
    expected_latent = torch.stack([((latents[i] - gen.latents) ** 2).flatten(1).mean(1).min() for i in range(3)])
    torch.testing.assert_close(out["pixel"], expected_pixel.double(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(out["latent"], expected_latent.double(), rtol=1e-5, atol=1e-9)
    assert torch.all(out[COST_OUTPUT] == 2 * 2 / 3)


@torch.no_grad()
def test_blackbox_generations_serve_every_batch_of_a_caption_once(world, samples, latents):
    """A caption's images are made at its first sample, kept for its later batches and released after its last."""
    probe = BlackBoxProbe(num_images=1, steps=1, guidance_scale=1.0)
    model = model_context(world["bundle"], samples[:4])
    with pytest.raises(RuntimeError, match="before begin"):
        probe.compute(QueryContext(model, [0, 1], latents[[0, 1]]))
    probe.begin(model)
    first, second = (QueryContext(model, rows, latents[rows]) for rows in ([0, 1], [2, 3]))
    probe.compute(first)
    assert first.queries == 1 and "a photo" in probe._generated
    probe.compute(second)
    assert second.queries == 0 and probe._generated == {}


@torch.no_grad()
def test_blackbox_generations_start_from_the_models_seed(world, samples, latents):
    """The generation noise is seeded by (--seed, caption, i): another seed generates other images."""
    generated = []
    for seed in (0, 3):
        probe = BlackBoxProbe(num_images=1, steps=1, guidance_scale=1.0)
        model = model_context(world["bundle"], samples[:2], seed=seed)
        probe.begin(model)
        generated.append(probe.generations(QueryContext(model, [0], latents[[0]]), "a photo").latents)
    assert not torch.equal(generated[0], generated[1])


def test_nearest_distance_picks_the_minimum_in_each_space():
    query = ImageSet(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4, 1, 1))
    query.images[1] += 1.0
    # Candidate 0 is the nearest in pixels for query 0, candidate 2 the nearest in latents.
    cand = ImageSet(torch.stack([torch.full((3, 2, 2), v) for v in (0.1, 0.5, 2.0)]),
                    torch.stack([torch.full((4, 1, 1), v) for v in (3.0, 1.0, -0.2)]))
    d = nearest_distances(query, cand)
    torch.testing.assert_close(d["pixel"], torch.tensor([0.01, 0.25], dtype=torch.float64))
    torch.testing.assert_close(d["latent"], torch.tensor([0.04, 0.04], dtype=torch.float64))
    paired = paired_distances(query, cand.subset([1, 2]))
    torch.testing.assert_close(paired["pixel"], torch.tensor([0.25, 1.0], dtype=torch.float64))


def test_reconstruction_schedule():
    assert reconstruction_timesteps(20, 0.5)[0] == 451 and len(reconstruction_timesteps(20, 0.5)) == 10
    assert reconstruction_timesteps(4, 0.5) == [251, 1]
    assert reconstruction_timesteps(20, 1.0) == ddim_timesteps(20)
    assert reconstruction_timesteps(100, 0.51)[0] == 501
    with pytest.raises(ConfigError, match="reconstruction_strength"):
        reconstruction_timesteps(4, 0.0005)


def test_reconstruction_runs_the_steps_diffusers_img2img_runs():
    """The attacker's img2img runs int(steps x strength) steps: 0.54 of 20 starts at t = 451 (10 steps), not 501."""
    scheduler = DDIMScheduler(**SCHEDULER_SETTINGS)
    for steps, strength in [(20, 0.54), (20, 0.51), (20, 0.49), (20, 0.55), (50, 0.5), (4, 0.3), (10, 0.99)]:
        scheduler.set_timesteps(steps)
        count = min(int(steps * strength), steps)  # diffusers' StableDiffusionImg2ImgPipeline.get_timesteps
        assert reconstruction_timesteps(steps, strength) == scheduler.timesteps[steps - count:].tolist(), strength
    with pytest.raises(ConfigError, match="at least 0.25"):  # 0.2 of 4 steps is no step at all
        reconstruction_timesteps(4, 0.2)


class RecordingUNet:
    """The UNet, recording the timestep of every forward."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, timesteps, **kwargs):
        self.calls.append(int(timesteps[0]))
        return self.unet(x, timesteps, **kwargs)


@torch.no_grad()
def test_reconstruction_starts_at_its_timestep_and_counts_its_queries(world, samples, latents):
    bundle = world["bundle"]
    recorder = RecordingUNet(bundle.unet)
    fake = types.SimpleNamespace(**{k: getattr(bundle, k) for k in ("vae", "text_encoder", "tokenizer",
                                                                    "noise_scheduler")}, unet=recorder)
    probe = ReconstructionProbe(strength=0.5, steps=4, guidance_scale=2.0, repeats=2)
    ctx = QueryContext(model_context(fake, samples), [0, 1, 2], latents[[0, 1, 2]])
    out = probe.compute(ctx)
    assert recorder.calls == [251, 251, 1, 1] * 2  # (cond, uncond) per step, per repeat
    assert ctx.queries == 3 * 2 * 2 * 2 and probe.queries_per_sample() == 8.0
    assert torch.all(out[COST_OUTPUT] == 8.0)


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 2.0])  # 2.0: guided by the empty caption
def test_reconstruction_equals_hand_computation(world, samples, latents, scale):
    bundle = world["bundle"]
    probe = ReconstructionProbe(strength=0.5, steps=4, guidance_scale=scale, repeats=1)
    ctx = QueryContext(model_context(bundle, samples), [3, 4], latents[[3, 4]])
    out = probe.compute(ctx)
    a = float(bundle.noise_scheduler.alphas_cumprod[251])
    z = math.sqrt(a) * latents[[3, 4]] + math.sqrt(1 - a) * ctx.noise("reconstruction", 0)
    cond, uncond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a photo", ""]).split(1)
    z0_hat = hand_ddim(bundle.unet, z, [251, 1], cond, uncond, scale, bundle.noise_scheduler.alphas_cumprod.double())
    images = bundle.vae.decode(z0_hat / bundle.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(out["latent"], ((z0_hat - latents[[3, 4]]) ** 2).flatten(1).mean(1).double(),
                               rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out["pixel"], ((images - ctx.images()) ** 2).flatten(1).mean(1).double(),
                               rtol=1e-4, atol=1e-8)


@torch.no_grad()
def test_reconstruction_averages_distances_over_distinct_draws(world, samples, latents):
    """--reconstruction_repeats: each repeat noises with its own draw, and the distances are their mean."""
    probe = ReconstructionProbe(strength=0.5, steps=4, guidance_scale=1.0, repeats=2)
    ctx = QueryContext(model_context(world["bundle"], samples), [3, 4], latents[[3, 4]])
    out = probe.compute(ctx)
    rebuilt = [probe.reconstruct(ctx, r) for r in range(2)]
    assert not torch.allclose(rebuilt[0], rebuilt[1])
    per_draw = [((z - latents[[3, 4]]) ** 2).flatten(1).mean(1).double() for z in rebuilt]
    torch.testing.assert_close(out["latent"], (per_draw[0] + per_draw[1]) / 2, rtol=1e-5, atol=1e-9)


def test_reconstruction_options_reach_the_probe_and_the_report():
    """The flags set the probe, and the report states where the img2img starts and what it costs."""
    config = EvalConfig(reconstruction_strength=0.5, blackbox_steps=4, blackbox_guidance_scale=2.0,
                        reconstruction_repeats=3)
    attack = ReconstructionAttack.from_config(config, CPU)
    settings = attack.settings()
    assert [settings[k] for k in ("strength", "steps", "guidance_scale", "repeats", "start_timestep")] == [
        0.5, 4, 2.0, 3, 251]
    assert attack.queries_per_sample() == 3 * 2 * 2  # repeats x steps [251, 1] x (cond + uncond)


def reference_ssim(x: np.ndarray, y: np.ndarray, win: int = 7) -> float:
    """skimage's structural_similarity written out window by window ([H, W, C] in [0, 1], data_range 1)."""
    h, w, c = x.shape
    values = []
    for ch in range(c):
        for i in range(h - win + 1):
            for j in range(w - win + 1):
                a, b = x[i:i + win, j:j + win, ch].ravel(), y[i:i + win, j:j + win, ch].ravel()
                ma, mb = a.mean(), b.mean()
                va, vb = a.var(ddof=1), b.var(ddof=1)
                cov = ((a - ma) * (b - mb)).sum() / (a.size - 1)
                values.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return float(np.mean(values))


def test_ssim_equals_the_windowed_formula():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 11, 9)))
    b = (a + torch.from_numpy(rng.normal(0, 0.3, (2, 3, 11, 9)))).clamp(-1, 1)
    got = ssim(a, b)
    for i in range(2):
        x, y = ((a[i] + 1) / 2).permute(1, 2, 0).numpy(), ((b[i] + 1) / 2).permute(1, 2, 0).numpy()
        assert got[i].item() == pytest.approx(reference_ssim(x, y), rel=1e-10)
    torch.testing.assert_close(ssim(a, a), torch.ones(2, dtype=torch.float64))
    small = a[:, :, :6, :6]  # smaller than the window: the largest odd window that fits (5)
    assert ssim(small, b[:, :, :6, :6])[0].item() == pytest.approx(
        reference_ssim(((small[0] + 1) / 2).permute(1, 2, 0).numpy(),
                       ((b[0, :, :6, :6] + 1) / 2).permute(1, 2, 0).numpy(), win=5), rel=1e-10)


def test_rediffuse_schedule_and_options():
    assert variation_timesteps(10, 10) == [10] and variation_timesteps(25, 10) == [25, 15, 5]
    assert variation_timesteps(50, 0) == [50]  # interval 0: one step from t to the clean latent
    attack = ReDiffuseAttack.from_config(EvalConfig(rediffuse_timesteps=[30], rediffuse_interval=10,
                                                    rediffuse_variations=4), CPU)
    assert attack.queries_per_sample() == 4 * 3
    assert ReDiffuseAttack.from_config(EvalConfig(), CPU).queries_per_sample() == 10 * (1 + 1)  # t 10 and 50
    guided_attack = ReDiffuseAttack.from_config(EvalConfig(rediffuse_guidance_scale=7.5), CPU)
    assert guided_attack.queries_per_sample() == 10 * 2 * 2  # the authors' CFG: a conditional and an empty pass
    for bad, key in (({"rediffuse_timesteps": [0]}, "rediffuse_timesteps"),
                     ({"rediffuse_timesteps": [10, 10]}, "rediffuse_timesteps"),
                     ({"rediffuse_timesteps": []}, "rediffuse_timesteps"),
                     ({"rediffuse_interval": -1}, "rediffuse_interval"),
                     ({"rediffuse_variations": 0}, "rediffuse_variations"),
                     ({"rediffuse_guidance_scale": 0.5}, "rediffuse_guidance_scale")):
        with pytest.raises(ConfigError, match=key):
            EvalConfig(pretrained_model_name_or_path="model", split_manifest="split.json", **bad).validate()


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rediffuse_equals_hand_computation(world, samples, latents, scale):
    """Two variations noised to t = 30 and brought back in DDIM steps of 20 (30, 10, clean), with the caption
    (guided by the empty caption at scale 3), decoded and averaged; the distances of that average to the
    VAE-decoded query."""
    bundle = world["bundle"]
    probe = ReDiffuseProbe(timesteps=[30], interval=20, variations=2, guidance_scale=scale)
    ctx = QueryContext(model_context(bundle, samples), [3, 4], latents[[3, 4]])
    out = probe.compute(ctx)
    passes = 1 if scale == 1.0 else 2
    assert ctx.queries == 2 * 2 * 2 * passes and torch.all(out[COST_OUTPUT] == 4.0 * passes)
    a = float(bundle.noise_scheduler.alphas_cumprod[30])
    cond, uncond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a photo", ""]).split(1)
    rebuilt, decoded = [], []
    for draw in range(2):
        z = math.sqrt(a) * latents[[3, 4]] + math.sqrt(1 - a) * ctx.noise("rediffuse", draw)
        z0_hat = hand_ddim(bundle.unet, z, [30, 10], cond, uncond, scale, bundle.noise_scheduler.alphas_cumprod.double())
        rebuilt.append(z0_hat)
        decoded.append(bundle.vae.decode(z0_hat / bundle.vae.config.scaling_factor).sample.clamp(-1, 1))
    image, latent = (decoded[0] + decoded[1]) / 2, (rebuilt[0] + rebuilt[1]) / 2
    query = bundle.vae.decode(latents[[3, 4]] / bundle.vae.config.scaling_factor).sample.clamp(-1, 1)  # the VAE's view
    torch.testing.assert_close(out["t=30 pixel"], ((image - query) ** 2).flatten(1).mean(1).double(), rtol=1e-4,
                               atol=1e-8)
    torch.testing.assert_close(out["t=30 latent"], ((latent - latents[[3, 4]]) ** 2).flatten(1).mean(1).double(),
                               rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out["t=30 dssim"], 1 - ssim(query, image), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_rediffuse_timesteps_are_single_t_runs_side_by_side(world, samples, latents):
    """Several t share the paired noise: each t's outputs are those of a probe at that t alone (so adding a t to
    the suite leaves the others' numbers as they were); the cost is the sum of theirs."""
    bundle = world["bundle"]
    both = ReDiffuseProbe(timesteps=[10, 50], variations=2)
    ctx = QueryContext(model_context(bundle, samples), [0, 1], latents[[0, 1]])
    out = both.compute(ctx)
    assert ctx.queries == 2 * 2 * (1 + 1) and torch.all(out[COST_OUTPUT] == 4.0)  # 2 samples, 2 draws, 2 t
    for t in (10, 50):
        alone = ReDiffuseProbe(timesteps=[t], variations=2).compute(
            QueryContext(model_context(bundle, samples), [0, 1], latents[[0, 1]]))
        for distance in ("dssim", "pixel", "latent"):
            assert torch.equal(out[f"t={t} {distance}"], alone[f"t={t} {distance}"])
    assert not torch.equal(out["t=10 latent"], out["t=50 latent"])


@torch.no_grad()
def test_rediffuse_timesteps_sharing_a_ddim_step_query_it_apart(world, samples, latents):
    """With an interval two t can pass the same step (t = 30 in steps of 20 goes through t = 10): each chain
    asks the UNet at its own latent there, so each t's outputs are still those of that t alone, and both
    queries are counted."""
    bundle = world["bundle"]
    both = ReDiffuseProbe(timesteps=[10, 30], interval=20, variations=2)
    ctx = QueryContext(model_context(bundle, samples), [0, 1], latents[[0, 1]])
    out = both.compute(ctx)
    assert ctx.queries == 2 * 2 * (1 + 2)  # 2 samples, 2 draws, steps [10] and [30, 10]
    for t in (10, 30):
        alone = ReDiffuseProbe(timesteps=[t], interval=20, variations=2).compute(
            QueryContext(model_context(bundle, samples), [0, 1], latents[[0, 1]]))
        for distance in ("dssim", "pixel", "latent"):
            assert torch.equal(out[f"t={t} {distance}"], alone[f"t={t} {distance}"])


def test_rediffuse_per_timestep_rows_are_the_single_t_classifiers():
    """Each ``t=<t> classifier`` extra row is the classifier a ReDiffuse at that t alone fits on D_aux (that t's
    three distances, its own model, members as members); a single t adds no such row."""
    rng = np.random.default_rng(0)
    y = np.repeat([1, 0], 12)

    def outputs(timesteps):
        out = {COST_OUTPUT: np.full(24, 4.0)}
        for t in timesteps:
            for k, d in enumerate(DISTANCES):
                out[f"t={t} {d}"] = np.exp(rng.normal(0, 1, 24) - (0.3 + k * 0.4 + t / 50) * y)
        return out

    def scored(timesteps, probe_outputs):
        attack = ReDiffuseAttack(ReDiffuseProbe(timesteps=timesteps, variations=2), seed=0)
        inputs = AttackInputs(FeatureSet(np.zeros((24, 1, 1)), (1,), probes={"rediffuse": probe_outputs}))
        attack.fit(inputs, y)
        return {s.variant: s for s in attack.score(inputs)}

    both = outputs([10, 50])
    rows = scored([10, 50], both)
    for t in (10, 50):
        alone = scored([t], {k: v for k, v in both.items() if k.startswith(f"t={t} ") or k == COST_OUTPUT})
        assert not any(v.endswith(" classifier") for v in alone)
        np.testing.assert_allclose(rows[f"t={t} classifier"].scores, alone["classifier"].scores, rtol=1e-3)


def distance_inputs(n: int, seed: int, floor_zero: bool = False,
                    timesteps: tuple[int, ...] = (10,)) -> tuple[AttackInputs, np.ndarray]:
    """ReDiffuse outputs (and the cost row) for n members then n non-members: members' distances smaller."""
    rng = np.random.default_rng(seed)
    y = np.repeat([1, 0], n)
    out = {COST_OUTPUT: np.full(2 * n, 4.0)}
    for t in timesteps:
        for k, d in enumerate(DISTANCES):
            out[f"t={t} {d}"] = np.exp(rng.normal(0, 0.5, 2 * n) - (1.0 + k) * y) * 10.0 ** k
    if floor_zero:
        out["t=10 pixel"][0] = 0.0  # an exact reconstruction
    return AttackInputs(FeatureSet(np.zeros((2 * n, 1, 1)), (1,), probes={"rediffuse": out})), y


def fitted_distance_attack(aux: AttackInputs, y: np.ndarray) -> ReDiffuseAttack:
    attack = ReDiffuseAttack(ReDiffuseProbe(timesteps=[10], variations=2), seed=0)
    attack.fit(aux, y)
    return attack


def test_distance_attack_scores_small_distances_as_members():
    """Small distance = member in every row: the classifier's score and p(member), and each distance's threshold
    row (score -d, its threshold fitted on D_aux, member iff score >= threshold); the cost is no feature."""
    from library.eval.metrics import roc_auc

    aux, aux_y = distance_inputs(20, 0)
    test, test_y = distance_inputs(20, 1)
    attack = fitted_distance_attack(aux, aux_y)
    rows = {s.variant: s for s in attack.score(test)}
    assert set(rows) == {"classifier", *(f"t=10 {d}" for d in DISTANCES)}
    classifier = rows.pop("classifier")
    assert roc_auc(test_y, classifier.scores) > 0.8 and roc_auc(test_y, classifier.member_probs) > 0.8
    assert classifier.info["features"] == [f"-log t=10 {d}" for d in sorted(DISTANCES)]
    distances = test.target.probe("rediffuse")
    for name, row in rows.items():
        np.testing.assert_array_equal(row.scores, -distances[name])
        predicted = row.scores >= row.threshold
        assert predicted[test_y == 1].mean() > 0.7 and predicted[test_y == 0].mean() < 0.3, name


def test_distance_classifier_is_standardised_and_an_exact_match_stays_finite():
    """The logistic regression (C = 1) sees standardised -log distances: rescaling a distance changes no score,
    and a distance of 0 (an exact match) gives a finite score, not an infinite log."""
    aux, aux_y = distance_inputs(15, 2, floor_zero=True)
    attack = fitted_distance_attack(aux, aux_y)
    scores = attack.score(aux)[0].scores
    assert np.isfinite(scores).all()
    outputs = dict(aux.target.probe("rediffuse"))
    outputs["t=10 latent"] = outputs["t=10 latent"] * 1e6
    rescaled = AttackInputs(FeatureSet(np.zeros((30, 1, 1)), (1,), probes={"rediffuse": outputs}))
    np.testing.assert_allclose(fitted_distance_attack(rescaled, aux_y).score(rescaled)[0].scores, scores, rtol=1e-6)
    assert attack.model[-1].C == 1.0
    with pytest.raises(RuntimeError, match="before fit"):
        ReDiffuseAttack(ReDiffuseProbe(timesteps=[10], variations=2)).score(aux)


def test_rediffuse_headline_is_the_classifier_over_every_t():
    """With several t the one headline is the classifier over all of them; each t's own classifier and each
    distance are labelled extras (a per-t headline would be a choice made after seeing D_te)."""
    aux, y = distance_inputs(10, 3, timesteps=(10, 50))
    attack = ReDiffuseAttack(ReDiffuseProbe(timesteps=[10, 50], variations=2), seed=0)
    attack.fit(aux, y)
    assert [s.variant for s in attack.score(aux) if s.headline] == ["classifier"]


@torch.no_grad()
def test_blind_features_ignore_the_model(world, samples, latents):
    bundle, probe = world["bundle"], BlindProbe()
    base = probe.compute(QueryContext(model_context(bundle, samples), [0, 1, 2], latents[[0, 1, 2]]))["features"]
    with applied_lora(bundle, world["lora"], 1.0, CPU, torch.float32) as network:
        assert network is not None
        lora_ctx = QueryContext(model_context(bundle, samples, seed=7), [0, 1, 2], latents[[0, 1, 2]])
        tuned = probe.compute(lora_ctx)["features"]
    assert torch.equal(base, tuned) and base.shape == (3, len(BLIND_FEATURES))
    images = (lora_ctx.images().double() + 1) / 2
    names = list(BLIND_FEATURES)
    torch.testing.assert_close(base[:, names.index("mean_g")], images[:, 1].mean(dim=(1, 2)))
    assert base[:, names.index("caption_chars")].tolist() == [7.0] * 3  # "a photo"
    assert base[:, names.index("caption_words")].tolist() == [2.0] * 3
    hist = base[:, [names.index(f"hist_{b}") for b in range(8)]]
    torch.testing.assert_close(hist.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert probe.queries_per_sample() == 0.0


def test_blind_features_equal_hand_computation():
    """Each blind statistic of a drawn image, written out: the floor is only as good as what its features see."""
    base = 0.05 * np.arange(8.0)[None, :].repeat(8, axis=0)  # horizontal steps of 0.05: below the edge threshold
    base[:, 4:] += 0.3  # one vertical edge: a step of 0.35
    image = np.stack([base, 0.5 * base, np.full((8, 8), 0.2)])  # r, g, b in [0, 1]
    x = np.stack([image, image.transpose(0, 2, 1)])  # the second: the same with its edge horizontal
    captions = ["a photo", "two  words here"]
    got = blind_features(torch.from_numpy(2.0 * x - 1.0), captions).numpy()
    grey = x.mean(axis=1)
    dx, dy = np.diff(grey, axis=2), np.diff(grey, axis=1)
    edges = (np.abs(dx[:, :-1, :]) > 0.1) | (np.abs(dy[:, :, :-1]) > 0.1)
    expected = np.concatenate([
        x.mean(axis=(2, 3)), x.std(axis=(2, 3), ddof=1),
        np.stack([np.histogram(g, bins=8, range=(0.0, 1.0))[0] / g.size for g in grey]),
        (dx ** 2).mean(axis=(1, 2))[:, None], (dy ** 2).mean(axis=(1, 2))[:, None], edges.mean(axis=(1, 2))[:, None],
        grey.reshape(2, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(2, 16), [[7, 2], [15, 3]]], axis=1)
    assert got.shape == (2, len(BLIND_FEATURES))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert got[0, BLIND_FEATURES.index("edge_density")] == 7 / 49  # the 0.35 step counts, the 0.05 ones do not


def test_blind_attack_refuses_one_class_labels_and_scoring_before_fit():
    """The floor row is a classifier fitted on D_aux: it needs both classes, and scores nothing unfitted."""
    features = np.random.default_rng(0).normal(size=(6, len(BLIND_FEATURES)))
    inputs = AttackInputs(FeatureSet(np.zeros((6, 1, 1)), (1,), probes={"blind": {"features": features}}))
    attack = BlindAttack()
    with pytest.raises(RuntimeError, match="before fit"):
        attack.score(inputs)
    with pytest.raises(ValueError, match="both members and non-members"):
        attack.fit(inputs, np.ones(6))


def test_end_to_end_rows_costs_and_floor(world):
    out = world["root"] / "eval_images"
    rc = evaluate_mia.main(base_args(world, out, "--network_weights", str(world["lora"]), "--attacks", "blackbox",
                                     "reconstruction", "rediffuse", "blind", "--blackbox_num_images", "4",
                                     "--blackbox_steps", "4", "--rediffuse_variations", "2"))
    # (rediffuse at its default t 10 and 50: one DDIM step each)
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["model"], r["attack"], r["variant"]): r for r in report["results"]}
    for model in ("base", "overfit"):
        for attack in ("blackbox", "reconstruction", "rediffuse"):
            row = rows[(model, attack, "classifier")]
            assert row["headline"] and row["kind"] == "classifier" and not row["floor"]
            if attack != "rediffuse":
                assert {(model, attack, v) for v in ("pixel", "latent")} <= set(rows)
        for t in (10, 50):  # the paper's own attack, each t's distances and classifier: labelled extras
            for variant in ("dssim", "pixel", "latent", "classifier"):
                assert not rows[(model, "rediffuse", f"t={t} {variant}")]["headline"]
        oracle = [r for r in oracle_extra_rows(report) if r["model"] == model and r["attack"] == "rediffuse"]
        assert [r["variant"] for r in oracle] == [max(("t=10 classifier", "t=50 classifier"),
                                                      key=lambda v: rows[(model, "rediffuse", v)]["auc"])]
        blind = rows[(model, "blind", "classifier")]
        assert blind["floor"] and blind["headline"]
        assert blind["auc_ci"][0] <= 0.5 <= blind["auc_ci"][1], blind  # random i.i.d. images: chance
    n = len(world["manifest"].member_aux + world["manifest"].nonmember_aux + world["manifest"].member_test
             + world["manifest"].nonmember_test)
    settings = report["attacks"]
    assert settings["blackbox"]["queries_per_sample"] == pytest.approx(4 * 4 * 2 / n)  # one caption for all
    assert settings["reconstruction"]["queries_per_sample"] == 2 * 2  # [251, 1] x (cond + uncond)
    assert settings["blind"]["queries_per_sample"] == 0.0
    assert settings["rediffuse"]["queries_per_sample"] == 2 * 2  # n = 2 variations of one DDIM step at t 10 and 50
    probes = report["features"]["probes"]["overfit"]
    assert probes["blackbox"]["queries_computed"] == 4 * 4 * 2
    assert probes["reconstruction"]["queries_computed"] == n * 4
    assert probes["rediffuse"]["queries_computed"] == n * 4
    aucs = {f"{m} {a} {v}": round(r["auc"], 3) for (m, a, v), r in rows.items()}
    print("AUCs on D_te:", json.dumps(aucs, indent=1))
    assert np.isfinite(list(aucs.values())).all()
