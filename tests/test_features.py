"""library.train.proxy_features: fixed (paired) proxy noise, base calibration, and the proxy options end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from library.config import parse_config
from library.errors import ConfigError
from library.train.config import TrainConfig
from library.train.proxy_features import BaseFeatureCache, ProxyFeatures, fixed_draw
from library.train.trainer import train


def test_fixed_draw_depends_on_the_key_only():
    alone = fixed_draw(["b.png"], [50, 200], (4, 8, 8), seed=3)
    batch = fixed_draw(["a.png", "b.png"], [50, 200], (4, 8, 8), seed=3)
    assert batch.timesteps.tolist() == [50, 200, 50, 200]
    assert torch.equal(alone.noise, batch.noise[2:])  # b's noise does not depend on its batch
    assert not torch.equal(batch.noise[0], batch.noise[2])  # another image, other noise
    assert not torch.equal(batch.noise[0], batch.noise[1])  # another t, other noise
    other_seed = fixed_draw(["b.png"], [50, 200], (4, 8, 8), seed=4)
    assert not torch.equal(alone.noise, other_seed.noise)


def test_fixed_one_t_kinds_draw_a_t_per_key_within_range():
    draw = fixed_draw([f"{i}.png" for i in range(32)], None, (4, 8, 8), seed=0, min_timestep=100, max_timestep=300)
    assert draw.timesteps.shape == (32,) and draw.timesteps.min() >= 100 and draw.timesteps.max() < 300
    assert len(set(draw.timesteps.tolist())) > 1
    again = fixed_draw(["5.png"], None, (4, 8, 8), seed=0, min_timestep=100, max_timestep=300)
    assert again.timesteps.item() == draw.timesteps[5].item() and torch.equal(again.noise[0], draw.noise[5])


def test_fixed_one_t_draws_never_reach_the_exclusive_max_timestep():
    """[min, max) as for training's own t: max_timestep is the first t the proxy must not see (a band's end)."""
    draw = fixed_draw([f"{i}.png" for i in range(64)], None, (1, 2, 2), seed=0, min_timestep=100, max_timestep=102)
    assert set(draw.timesteps.tolist()) == {100, 101}


def test_fixed_proxy_noise_draws_its_t_inside_the_configured_band():
    """A banded proxy (--attacker_min/max_timestep) with fixed noise must not see timesteps outside its band."""
    proxy = ProxyFeatures(kind="t_loss", noise="fixed", min_timestep=400, max_timestep=410)
    draw = proxy.draw(torch.zeros(32, 1, 2, 2), [f"{i}.png" for i in range(32)], None)
    assert draw.timesteps.min() >= 400 and draw.timesteps.max() < 410


def test_fixed_noise_needs_exactly_one_key_per_sample():
    """Too few keys would pair the wrong samples with the fixed noise (or drop rows) instead of failing."""
    proxy = ProxyFeatures(kind="loss", noise="fixed")
    with pytest.raises(ValueError, match="one key per sample"):
        proxy.draw(torch.zeros(2, 4, 8, 8), ["a.png"], None)
    with pytest.raises(ValueError, match="one key per sample"):
        proxy.draw(torch.zeros(2, 4, 8, 8), None, None)


@pytest.mark.parametrize("kwargs, message", [
    ({"calibration": "base", "noise": "fixed", "kind": "error_map"}, "works on losses: use attacker_features t_loss"),
    ({"noise": "paired"}, "'attacker_noise' must be one of"),
])
def test_impossible_combinations_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProxyFeatures(**kwargs)


@pytest.mark.parametrize("calibration, normalization", [("base", "log_standardize"), ("both", "log_standardize"),
                                                        ("base", "log")])  # plain log takes the log too
def test_calibration_with_a_log_normalisation_is_refused(tiny_train_args, calibration, normalization):
    with pytest.raises(ConfigError, match=f"'attacker_calibration = {calibration}'.*use standardize"):
        parse_config(TrainConfig, tiny_train_args + ["--attacker_features", "multi_t_loss", "--attacker_noise",
                                                     "fixed", "--attacker_calibration", calibration,
                                                     "--attacker_normalization", normalization])


def test_multi_t_features_are_batch_independent_and_calibrate_to_zero_on_the_base(tiny_model_dir):
    """With fixed noise a sample's features do not depend on its batch; calibrated against the base model,
    the base model itself gives exactly zero and a LoRA gives something else."""
    from library.sd.loading import load_sd_model
    from library.sd.text import encode_prompts
    from networks.lora import create_network

    bundle = load_sd_model(tiny_model_dir)
    network = create_network(1.0, 4, 4.0, None, bundle.text_encoder, bundle.unet, train_unet_only=True)
    network.apply_to(None, bundle.unet, apply_text_encoder=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(std=0.5)  # a LoRA that changes the UNet
    features = ProxyFeatures(kind="multi_t_loss", timesteps=(10, 100, 400), noise="fixed", calibration="base")
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    keys = ["x.png", "y.png", "z.png"]
    with torch.no_grad():
        cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a digit"] * 3)

    def raw(rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return features.raw(bundle.unet, bundle.noise_scheduler, latents[rows], cond[rows],
                                [keys[i] for i in rows], None)

    lora_values = raw([0, 1, 2])
    assert lora_values.shape == (3, 3)
    torch.testing.assert_close(raw([2]), lora_values[2:], rtol=1e-5, atol=1e-7)

    def base_model():
        class Off:
            def __enter__(self):
                network.set_multiplier(0.0)

            def __exit__(self, *exc):
                network.set_multiplier(1.0)
        return Off()

    cache = BaseFeatureCache()
    cache.fill(keys, lambda chunk: raw([keys.index(k) for k in chunk]), base_model, batch_size=2)
    assert len(cache) == 3 and network.multiplier == 1.0
    with base_model():
        # Equal up to float rounding, not bitwise: the cache was filled in chunks of 2 and 1, and CPU GEMMs
        # with a small M (the UNet's time-embedding Linear on a (B, 320) input) pick a batch-size-dependent
        # kernel, so a row's value can differ by an ulp between a batch of 3 and one of 2.
        torch.testing.assert_close(raw([0, 1, 2]) - cache.lookup(keys), torch.zeros(3, 3), rtol=0, atol=1e-6)
    assert (lora_values - cache.lookup(keys)).abs().min() > 0
    with pytest.raises(KeyError, match="w.png"):
        cache.lookup(["w.png"])


@pytest.mark.parametrize("noise", ["fixed", "fresh"])
def test_calibrated_multi_t_smp_trains_records_its_options_and_restarts_the_proxy(tiny_train_args, noise):
    args = tiny_train_args + [
        "--attacker_batch_size", "2", "--privacy_lambda", "1", "--attacker_features", "multi_t_loss",
        "--attacker_timesteps", "20", "100", "--attacker_noise", noise, "--attacker_calibration", "base",
        "--attacker_normalization", "standardize", "--attacker_restart", "reinit",
        "--attacker_restart_every_n_epochs", "1", "--max_train_steps", "6", "--train_batch_size", "12",
    ]
    result = train(parse_config(TrainConfig, args), "smp_lora")
    assert torch.isfinite(torch.tensor(result.final_logs["loss"]))
    with safe_open(result.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["smp_lora.attacker_noise"] == noise and meta["smp_lora.attacker_calibration"] == "base"
    assert meta["smp_lora.attacker_restart"] == "reinit/1"
    import json

    epochs = json.loads(result.record_path.read_text())["epochs"]
    assert [e["attacker_restarts"] for e in epochs] == list(range(1, len(epochs) + 1))
    assert all("proxy_acc_test" in e for e in epochs)


def test_t_loss_features_are_t_and_loss_and_calibrate_the_loss_only():
    from library.sd.diffusion import per_sample_loss
    from library.train.proxy_features import features_from_errors

    errors = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 250, 999])
    features = features_from_errors(errors, "t_loss", 3, t)
    torch.testing.assert_close(features, torch.stack([t / 1000.0, per_sample_loss(errors)], dim=1))
    with pytest.raises(ValueError, match="timesteps"):
        features_from_errors(errors, "t_loss", 3)
    proxy = ProxyFeatures(kind="t_loss", calibration="base")
    assert proxy.dim((4, 8, 8)) == 2 and proxy.reuses_training_forward
    base = features.clone()
    base[:, 1] -= 0.25
    torch.testing.assert_close(proxy.calibrate(features, base), torch.stack([t / 1000.0, torch.full((3,), 0.25)], 1))
    assert not ProxyFeatures(kind="multi_t_loss", calibration="base").reuses_training_forward
    assert not ProxyFeatures(kind="loss", calibration="base").reuses_training_forward  # its G needs its own pass


def test_base_calibration_is_the_lora_value_minus_the_base_value():
    """The calibrated signal is loss(LoRA) - loss(base): members fall below 0; the reverse sign flips what h_w learns."""
    multi = ProxyFeatures(kind="multi_t_loss", timesteps=(10, 100), noise="fixed", calibration="base")
    raw = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(multi.calibrate(raw, raw + 0.5), torch.full((2, 2), -0.5))


def test_only_one_fresh_t_per_sample_reuses_the_training_forward():
    """L_ada's forward has one fresh t per sample: multi-t features and fixed noise need their own UNet pass."""
    assert ProxyFeatures(kind="loss").reuses_training_forward
    assert ProxyFeatures(kind="error_map").reuses_training_forward
    assert not ProxyFeatures(kind="multi_t_loss").reuses_training_forward
    assert not ProxyFeatures(kind="loss", noise="fixed").reuses_training_forward


def test_both_calibration_puts_the_raw_loss_beside_the_calibrated_one():
    """``both``: t_loss gives (t, loss, loss - base); the other loss kinds their raw columns, then the calibrated."""
    t = torch.tensor([10, 250, 999])
    losses = torch.tensor([0.5, 0.25, 0.125])
    t_loss = torch.stack([t / 1000.0, losses], dim=1)
    base = torch.stack([t / 1000.0, losses - 0.0625], dim=1)
    both = ProxyFeatures(kind="t_loss", calibration="both")
    assert both.dim((4, 8, 8)) == 3 and both.uses_base and both.reuses_training_forward
    torch.testing.assert_close(both.calibrate(t_loss, base),
                               torch.stack([t / 1000.0, losses, torch.full((3,), 0.0625)], dim=1))
    multi = ProxyFeatures(kind="multi_t_loss", timesteps=(10, 100), noise="fixed", calibration="both")
    assert multi.dim((4, 8, 8)) == 4 and multi.caches_base
    raw = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(multi.calibrate(raw, raw - 1.0), torch.tensor([[1.0, 2.0, 1.0, 1.0],
                                                                              [3.0, 4.0, 1.0, 1.0]]))
    assert ProxyFeatures(kind="loss", calibration="both").dim((4, 8, 8)) == 2
    assert not ProxyFeatures(kind="loss").uses_base
    with pytest.raises(ConfigError, match="'attacker_calibration = both' works on losses"):
        ProxyFeatures(kind="error_map", calibration="both")


@pytest.mark.parametrize("features", [["--attacker_features", "t_loss", "--attacker_max_timestep", "500"],
                                      ["--attacker_features", "loss", "--attacker_noise", "fixed"]])
def test_both_calibration_trains_on_raw_and_calibrated_columns_and_records_it(tiny_train_args, features, monkeypatch):
    """The proxy gets the raw and the calibrated columns (t_loss: 3, loss: 2; h_w's input size and normaliser
    follow), the raw column is not replaced by the calibrated one, and the LoRA's metadata says ``both``."""
    args = tiny_train_args + features + ["--attacker_batch_size", "2", "--privacy_lambda", "1",
                                         "--attacker_calibration", "both", "--attacker_normalization", "standardize",
                                         "--max_train_steps", "3", "--attacker_eval_every_n_epochs", "1000"]
    import library.train.methods.adversarial as adversarial_module

    seen = []
    real_calibrate = adversarial_module.ProxyFeatures.calibrate

    def spying_calibrate(self, raw, base):
        out = real_calibrate(self, raw, base)
        seen.append(out.detach())
        return out

    monkeypatch.setattr(adversarial_module.ProxyFeatures, "calibrate", spying_calibrate)
    result = train(parse_config(TrainConfig, args), "smp_lora")
    assert torch.isfinite(torch.tensor(result.final_logs["loss"]))
    width = 3 if "t_loss" in features else 2
    assert seen and all(f.shape[1] == width for f in seen)
    assert any(not torch.equal(f[:, -2], f[:, -1]) for f in seen)  # the base term is not zero
    with safe_open(result.weights_path, "pt") as handle:
        assert handle.metadata()["smp_lora.attacker_calibration"] == "both"


def test_calibrated_t_loss_smp_reads_g_from_the_training_forward(tiny_train_args, monkeypatch):
    """--attacker_features t_loss with base calibration and fresh noise: per step one no-grad LoRA and one base
    pass for the attacker batch, then L_ada's forward and ONE no-grad base pass on its very draw for G (no second
    differentiable pass)."""
    import library.train.methods.adversarial as adversarial_module

    passes = []
    real_raw = adversarial_module.ProxyFeatures.raw

    def counting_raw(self, unet, scheduler, latents, conditioning, keys, generator, draw=None):
        passes.append((torch.is_grad_enabled(), draw))
        return real_raw(self, unet, scheduler, latents, conditioning, keys, generator, draw)

    monkeypatch.setattr(adversarial_module.ProxyFeatures, "raw", counting_raw)
    seen = {}
    real_base = adversarial_module.AdversarialLoRA._base_on_draw

    def spying_base(self, ctx, latents, keys, captions, conditioning, draw):
        seen.setdefault("draws", []).append(draw)
        return real_base(self, ctx, latents, keys, captions, conditioning, draw)

    monkeypatch.setattr(adversarial_module.AdversarialLoRA, "_base_on_draw", spying_base)
    args = tiny_train_args + ["--attacker_batch_size", "2", "--privacy_lambda", "1", "--attacker_features", "t_loss",
                              "--attacker_calibration", "base", "--attacker_normalization", "standardize",
                              "--max_train_steps", "2", "--attacker_eval_every_n_epochs", "1000"]
    result = train(parse_config(TrainConfig, args), "smp_lora")
    assert torch.isfinite(torch.tensor(result.final_logs["loss"]))
    # per step: attacker LoRA pass + base pass (same draw), then the base pass for G on L_ada's draw
    assert len(passes) == 6 and not any(grad for grad, _ in passes)
    assert all(passes[3 * i][1] is passes[3 * i + 1][1] for i in range(2))  # LoRA and base on one attacker draw
    assert all(passes[3 * i + 2][1] is seen["draws"][i] for i in range(2))  # G's base pass is on L_ada's draw


def test_banded_t_loss_proxy_sees_the_band_and_g_reads_only_its_rows(tiny_train_args, monkeypatch):
    """--attacker_max_timestep 500: the proxy's draws are all below 500, and G reads exactly the rows of L_ada's
    forward whose t is below 500 (a batch with none gets no privacy term)."""
    import library.train.methods.adversarial as adversarial_module

    proxy_draws, g_reads = [], []
    real_draw = adversarial_module.ProxyFeatures.draw
    real_training = adversarial_module.AdversarialLoRA._training_features

    def spying_draw(self, latents, keys, generator):
        draw = real_draw(self, latents, keys, generator)
        proxy_draws.append(draw.timesteps)
        return draw

    def spying_training(self, ctx, result):
        features = real_training(self, ctx, result)
        g_reads.append((result.draw.timesteps, None if features is None else features[:, 0]))
        return features

    monkeypatch.setattr(adversarial_module.ProxyFeatures, "draw", spying_draw)
    monkeypatch.setattr(adversarial_module.AdversarialLoRA, "_training_features", spying_training)
    args = tiny_train_args + ["--attacker_batch_size", "2", "--privacy_lambda", "1", "--attacker_features", "t_loss",
                              "--attacker_calibration", "base", "--attacker_normalization", "standardize",
                              "--attacker_max_timestep", "500", "--max_train_steps", "4",
                              "--attacker_eval_every_n_epochs", "1000"]
    result = train(parse_config(TrainConfig, args), "smp_lora")
    assert torch.isfinite(torch.tensor(result.final_logs["loss"]))
    assert proxy_draws and all(bool((t < 500).all()) for t in proxy_draws)
    assert len(g_reads) == 4
    for timesteps, t_column in g_reads:
        in_band = timesteps[timesteps < 500].float() / 1000
        if t_column is None:
            assert len(in_band) == 0
        else:
            assert torch.equal(t_column, in_band)


@pytest.mark.parametrize("flags, expected", [
    (["--attacker_features", "loss", "--attacker_max_timestep", "400"], "bands the t of 'attacker_features = t_loss'"),
    (["--attacker_features", "t_loss", "--attacker_max_timestep", "0"], "'attacker_max_timestep' must be in"),
])
def test_attacker_band_needs_t_loss_and_a_timestep_in_range(tiny_train_args, capsys, flags, expected):
    from library.train.cli import train_entry

    assert train_entry("smp_lora", "", tiny_train_args + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("flags, message", [
    (["--min_timestep", "100", "--attacker_max_timestep", "100"], r"must be in \(min_timestep, max_timestep\] = "
                                                                   r"\(100, 1000\], got 100"),  # an empty band
    (["--max_timestep", "500", "--attacker_max_timestep", "600"], r"= \(0, 500\], got 600"),  # t's never drawn
    (["--attacker_features", "multi_t_loss", "--attacker_max_timestep", "400"], "bands the t of 'attacker_features = "
                                                                                "t_loss'"),  # fixed ts: no band
])
def test_an_attacker_band_outside_the_training_band_or_without_t_loss_is_refused(tiny_train_args, flags, message):
    """The proxy's band is a part of the t the training draws, and only t_loss draws a t: else it would be inert."""
    features = [] if "--attacker_features" in flags else ["--attacker_features", "t_loss"]
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, tiny_train_args + features + flags)


def test_an_attacker_band_may_end_where_the_training_band_ends(tiny_train_args):
    """The band's top is inclusive: the whole training band (max_timestep) is a valid band."""
    config = parse_config(TrainConfig, tiny_train_args + ["--attacker_features", "t_loss", "--max_timestep", "500",
                                                          "--attacker_max_timestep", "500"])
    assert config.attacker_max_timestep == 500


def test_fixed_noise_proxy_gives_the_same_lora_for_a_moved_dataset(tiny_train_args, manifest_path, tmp_path):
    """The proxy's fixed noise and base-feature cache are keyed by the manifest's image hashes, not by where the
    images lie: the same split copied elsewhere (dataset folder and manifest together) trains the same LoRA."""
    import shutil

    from safetensors.torch import load_file

    moved = tmp_path / "moved"
    shutil.copytree(manifest_path.parent, moved)
    flags = ["--attacker_batch_size", "2", "--privacy_lambda", "1", "--attacker_features", "multi_t_loss",
             "--attacker_timesteps", "20", "100", "--attacker_noise", "fixed", "--attacker_calibration", "base",
             "--attacker_normalization", "standardize", "--max_train_steps", "3"]
    here = train(parse_config(TrainConfig, tiny_train_args + flags + ["--output_dir", str(tmp_path / "here")]),
                 "smp_lora")
    args = [str(moved / manifest_path.name) if a == str(manifest_path) else a for a in tiny_train_args]
    there = train(parse_config(TrainConfig, args + flags + ["--output_dir", str(tmp_path / "there")]), "smp_lora")
    a, b = load_file(here.weights_path), load_file(there.weights_path)
    for key in a:
        assert torch.equal(a[key], b[key]), key
