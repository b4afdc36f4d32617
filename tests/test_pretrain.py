"""Pre-training of the tiny base model: end to end on digits, the saved folder, and that training helps.

One module-scoped run with a small but real budget (VAE 40 steps, UNet 150 steps on 200 digits, ~25 s on a
busy 2-core box) feeds the assertions about what pre-training achieves, measured on 60 held-out digits.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from library.cli import run_cli
from library.data.dataset import ImageCaption
from library.demo import pretrain as P
from library.errors import ConfigError, ModelError
from library.runtime import torch_threads

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_base.py"


def _script_main():
    spec = importlib.util.spec_from_file_location("pretrain_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def split_with_pretrain(tmp_path_factory):
    """260 digits: 4 x 15 membership images + 200 pretrain images (the held-out set is the 60 others)."""
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.demo.digits import write_digits_dataset

    root = tmp_path_factory.mktemp("pretrain_digits")
    write_digits_dataset(root / "images", limit=260)
    sizes = {"member_aux": 15, "member_test": 15, "nonmember_aux": 15, "nonmember_test": 15}
    manifest = make_split(scan_dataset(root / "images"), sizes=sizes, seed=0, pretrain="rest",
                          dataset_root=root / "images")
    path = root / "split.json"
    write_manifest(manifest, path)
    return path, manifest


@pytest.fixture(scope="module")
def held_out(split_with_pretrain):
    _, manifest = split_with_pretrain
    entries = manifest.members() + manifest.nonmembers()
    return [ImageCaption(manifest.abs_path(e), e.caption) for e in entries]


@pytest.fixture(scope="module")
def pretrained_dir(split_with_pretrain, tmp_path_factory):
    """Pre-train through the CLI script, as the demo does."""
    main = _script_main()
    manifest_path, _ = split_with_pretrain
    out = tmp_path_factory.mktemp("base") / "model"
    argv = ["--manifest", str(manifest_path), "--output_dir", str(out), "--seed", "0", "--threads", "1",
            "--vae_steps", "40", "--vae_batch_size", "8", "--unet_steps", "150", "--batch_size", "16"]
    assert run_cli(main, argv) == 0
    return out


def test_saved_folder_loads_and_differs_from_fresh_stack(pretrained_dir):
    from library.demo.tiny import SD_SCALING_FACTOR, build_tiny_stack
    from library.sd.loading import load_sd_model

    bundle = load_sd_model(pretrained_dir)
    fresh = build_tiny_stack(0)
    record = json.loads((pretrained_dir / P.PRETRAIN_RECORD).read_text())
    assert record["num_images"] == 200 and record["unet_steps"] == 150 and record["vae_steps"] == 40
    # The scaling factor was measured (1/std of the latents), stored in the VAE config and survives the save.
    assert bundle.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert bundle.vae.config.scaling_factor != SD_SCALING_FACTOR
    fresh_unet = fresh.unet.state_dict()
    changed = [k for k, v in bundle.unet.state_dict().items() if not torch.equal(v, fresh_unet[k])]
    assert len(changed) > 0.9 * len(fresh_unet), "every UNet parameter should have been trained"
    # The text encoder is trained jointly by default (a frozen random one gets ignored by the UNet).
    fresh_te = fresh.text_encoder.state_dict()
    assert any(not torch.equal(v, fresh_te[k]) for k, v in bundle.text_encoder.state_dict().items())
    assert not any(p.requires_grad for p in bundle.unet.parameters())


def test_pretraining_lowers_reconstruction_and_denoising_loss(pretrained_dir, held_out):
    from library.demo.tiny import build_tiny_stack
    from library.sd.loading import load_sd_model

    bundle = load_sd_model(pretrained_dir)
    fresh = build_tiny_stack(0)
    pixels = P.load_pixels(held_out)
    captions = [r.caption for r in held_out]

    recon_before = P.reconstruction_mse(fresh.vae, pixels)
    recon_after = P.reconstruction_mse(bundle.vae, pixels)
    print(f"held-out VAE recon MSE: fresh {recon_before:.4f} -> pretrained {recon_after:.4f}")
    assert recon_after < 0.25 * recon_before

    # Same latents (the trained VAE's) and the same seeded noise draws for both UNets: a paired comparison.
    latents = P.scaled_latents(bundle.vae, pixels)
    assert 0.7 < float(latents.std()) < 1.4, "the measured scaling factor should give ~unit-variance latents"
    fresh.vae = bundle.vae
    loss_before = P.denoising_loss(fresh, latents, captions, draws=4)
    loss_after = P.denoising_loss(bundle, latents, captions, draws=4)
    print(f"held-out denoising loss: fresh UNet {loss_before:.4f} -> pretrained {loss_after:.4f}")
    assert loss_after < 0.5 * loss_before


def test_cli_skips_existing_output_and_rejects_manifest_without_pretrain(pretrained_dir, manifest_path, capsys,
                                                                         tmp_path):
    main = _script_main()
    before = (pretrained_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert run_cli(main, ["--manifest", str(manifest_path), "--output_dir", str(pretrained_dir)]) == 0
    assert "skipping" in capsys.readouterr().out
    assert (pretrained_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before

    # conftest's manifest has no pretrain list: one clear error line, exit status 2.
    assert run_cli(main, ["--manifest", str(manifest_path), "--output_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pretrain" in err and err.count("\n") == 1


def test_pretraining_is_deterministic_and_seeded(held_out):
    records = held_out[:20]
    kwargs = dict(vae_steps=2, unet_steps=3, batch_size=4, vae_batch_size=4, threads=1, log=lambda _: None)
    a, report_a = P.pretrain_base_bundle(records, seed=3, **kwargs)
    b, report_b = P.pretrain_base_bundle(records, seed=3, **kwargs)
    c, _ = P.pretrain_base_bundle(records, seed=4, **kwargs)
    for name in ("unet", "vae"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert report_a.scaling_factor == report_b.scaling_factor
    assert report_a.unet_loss_last == report_b.unet_loss_last

    # --freeze_text_encoder keeps the text encoder at its seeded init.
    from library.demo.tiny import build_tiny_stack

    frozen, report = P.pretrain_base_bundle(records, seed=3, train_text_encoder=False, **kwargs)
    fresh_te = build_tiny_stack(3).text_encoder.state_dict()
    assert not report.train_text_encoder
    assert all(torch.equal(v, fresh_te[k]) for k, v in frozen.text_encoder.state_dict().items())


def test_refuses_existing_output_before_training_and_bad_settings(tmp_path, held_out):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    calls = []
    with pytest.raises(ModelError, match="already exists"):
        P.pretrain_base_model(held_out[:4], occupied, log=calls.append)
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        P.pretrain_base_model(held_out[:4], occupied, overwrite=True, log=calls.append)
    assert calls == [], "nothing should have been trained"
    with pytest.raises(ConfigError, match="caption_dropout"):
        P.pretrain_base_bundle(held_out[:4], caption_dropout=1.5)
    with pytest.raises(ConfigError, match="unet_steps"):
        P.pretrain_base_bundle(held_out[:4], unet_steps=-1)
    with pytest.raises(ConfigError, match="threads"):
        with torch_threads(0):
            pass


# ------------------------------------------------------------------------------------------------ unit level


def _records(captions: list[str]) -> list[ImageCaption]:
    """Records for the checks that refuse before any image is read (the paths are never opened)."""
    return [ImageCaption(Path(f"unused{i}.png"), c, 1) for i, c in enumerate(captions)]


def test_settings_at_the_edges_are_refused_before_training():
    """A bool step count, a zero batch size of either network, dropout 1 (no caption ever seen), a zero learning
    rate of either network or one empty caption would train a useless base: each is one clear error."""
    from library.errors import DataError

    records = _records(["a handwritten digit one", "a handwritten digit two"])
    for bad, says in [({"unet_steps": True}, "unet_steps"), ({"batch_size": 0}, "batch sizes"),
                      ({"vae_batch_size": 0}, "batch sizes"), ({"caption_dropout": 1.0}, "caption_dropout"),
                      ({"lr": 0.0}, "learning rates"), ({"vae_lr": -1e-3}, "learning rates")]:
        with pytest.raises(ConfigError, match=says):
            P.pretrain_base_bundle(records, log=lambda _: None, **bad)
    with pytest.raises(DataError, match="empty caption"):
        P.pretrain_base_bundle(records + _records([" "]), log=lambda _: None)
    with pytest.raises(DataError, match="pretrain set is empty"):
        P.load_pixels([])


def test_index_batches_show_every_image_once_per_epoch_and_carry_the_tail():
    from library.demo.pretrain_common import index_batches

    batches = list(index_batches(5, 2, 5, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2] * 5
    flat = torch.cat(batches).tolist()
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))


def test_learning_rate_warms_up_over_5_percent_then_decays_by_cosine_to_a_tenth():
    from library.demo.pretrain_common import warmup_cosine_lr

    lrs = [warmup_cosine_lr(step, 105, 1.0) for step in range(106)]  # 5 warm-up steps, then 100 of decay
    assert lrs[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    assert lrs[55] == pytest.approx(0.55) and lrs[105] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[5:], lrs[6:]))


def test_progress_lines_report_the_mean_since_the_last_line_and_the_final_step():
    from library.demo.pretrain_common import Progress

    lines: list[str] = []
    progress = Progress("vae", 31, lines.append)  # a line every 3 steps, plus the last
    for step in range(31):
        progress.update(step, float(step))
    assert len(lines) == 11
    assert "step 6/31  loss 4.0000" in lines[1] and "step 31/31  loss 30.0000" in lines[-1]


def test_window_means_average_the_first_and_last_tenth():
    """pretrain.json's first/last losses: the first and last 10% of the steps, at least one each."""
    from library.demo.pretrain_common import window_means

    assert window_means([float(v) for v in range(20)]) == (0.5, 18.5)
    assert window_means([3.0, 1.0]) == (3.0, 1.0)
    assert all(v != v for v in window_means([]))  # NaN: no steps run


def test_scaling_factor_is_one_over_the_latent_std_to_five_digits():
    from library.demo.pretrain_vae import latent_scaling_factor
    from library.errors import ModelError

    factor, mean, std = latent_scaling_factor(torch.tensor([1.0, 3.0, 5.0, 7.0]))
    assert (factor, mean) == (0.3873, 4.0) and std == pytest.approx(2.5819889)
    with pytest.raises(ModelError, match="std 0.0"):
        latent_scaling_factor(torch.zeros(4))


@pytest.fixture
def tiny_stack():
    from library.demo.tiny import build_tiny_stack

    return build_tiny_stack(0)


def test_latents_are_posterior_means_times_the_configured_factor_batch_independent(tiny_stack):
    """The UNet trains and is scored on these: no posterior sample, no batch boundary may change them."""
    vae = tiny_stack.vae
    pixels = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    means = P.posterior_means(vae, pixels, batch_size=2)
    assert torch.equal(means, P.posterior_means(vae, pixels, batch_size=2))
    vae.register_to_config(scaling_factor=0.5)
    assert torch.allclose(P.scaled_latents(vae, pixels), means * 0.5, atol=1e-6)
    assert P.reconstruction_mse(vae, pixels, batch_size=2) == pytest.approx(P.reconstruction_mse(vae, pixels), rel=1e-5)


def test_vae_training_records_the_reconstruction_mse_and_optimises_the_kl_too(tiny_stack):
    """pretrain.json's VAE numbers are reconstruction MSEs (not MSE + KL), while the KL term does steer training;
    a NaN loss is refused, and the VAE is left frozen in eval mode."""
    from library.demo.tiny import build_tiny_stack
    from library.errors import ModelError

    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    kwargs = dict(steps=2, batch_size=4, lr=1e-3, log=lambda _: None)
    plain = P.train_vae(tiny_stack.vae, pixels, kl_weight=0.0, generator=torch.Generator().manual_seed(1), **kwargs)
    vae = build_tiny_stack(0).vae
    with_kl = P.train_vae(vae, pixels, kl_weight=1e3, generator=torch.Generator().manual_seed(1), **kwargs)
    assert plain[0] == with_kl[0] and plain[1] != with_kl[1]
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    with pytest.raises(ModelError, match="diverged"):
        P.train_vae(vae, pixels * float("nan"), kl_weight=0.0, generator=torch.Generator(), **kwargs)


def test_caption_states_give_each_caption_its_own_state_and_empty_last(tiny_stack):
    from library.sd.text import encode_prompts

    captions = ["a handwritten digit two", "a handwritten digit one", "a handwritten digit two"]
    states, rows = P.caption_states(tiny_stack, captions)
    expected = encode_prompts(tiny_stack.tokenizer, tiny_stack.text_encoder, captions + [""])
    assert len(states) == 3 and torch.allclose(states[rows], expected[:3], atol=1e-5)
    assert torch.allclose(states[-1], expected[-1], atol=1e-5)


def test_unet_training_drops_captions_to_empty_and_trains_the_text_encoder(tiny_stack):
    """A dropped caption must become "" (the unconditional input guidance needs), not another caption; the text
    encoder is trained unless frozen; both end frozen in eval mode; a NaN loss is refused."""
    from library.demo.tiny import build_tiny_stack
    from library.errors import ModelError

    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(steps=1, batch_size=4, lr=1e-3, train_text_encoder=False, log=lambda _: None)
    all_dropped = P.train_unet(tiny_stack, latents, ["a handwritten digit one"] * 4, caption_dropout=0.999,
                               generator=torch.Generator().manual_seed(0), **kwargs)
    unconditional = P.train_unet(build_tiny_stack(0), latents, [""] * 4, caption_dropout=0.0,
                                 generator=torch.Generator().manual_seed(0), **kwargs)
    assert all_dropped == pytest.approx(unconditional, rel=1e-6)

    bundle = build_tiny_stack(0)
    before = {k: v.clone() for k, v in bundle.text_encoder.state_dict().items()}
    P.train_unet(bundle, latents, ["a handwritten digit one"] * 4, caption_dropout=0.1,
                 generator=torch.Generator().manual_seed(0), **{**kwargs, "train_text_encoder": True})
    assert any(not torch.equal(v, before[k]) for k, v in bundle.text_encoder.state_dict().items())
    for module in (bundle.unet, bundle.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    with pytest.raises(ModelError, match="diverged"):
        P.train_unet(bundle, latents * float("nan"), [""] * 4, caption_dropout=0.0, generator=torch.Generator(),
                     **kwargs)


def test_denoising_loss_is_the_mean_over_every_latent_and_draw(tiny_stack):
    """The paired held-out score: batch boundaries change nothing, and each draw is a fresh (t, noise) draw."""
    from library.sd.diffusion import denoising_errors, draw_noise, per_sample_loss

    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    captions = ["a handwritten digit one", "a handwritten digit two"] * 2 + ["a handwritten digit three"]
    one = P.denoising_loss(tiny_stack, latents, captions, seed=7, draws=1, batch_size=2)
    states, rows = P.caption_states(tiny_stack, captions)
    draw = draw_noise(latents, torch.Generator().manual_seed(7))
    with torch.no_grad():
        direct = float(per_sample_loss(denoising_errors(tiny_stack.unet, tiny_stack.noise_scheduler, latents,
                                                        states[rows], draw)).mean())
    assert one == pytest.approx(direct, rel=1e-5)
    assert P.denoising_loss(tiny_stack, latents, captions, seed=7, draws=2) != pytest.approx(one, rel=1e-6)


def test_the_driver_hands_each_phase_its_settings_and_records_what_it_measured(digits_dir, tmp_path, monkeypatch):
    """With both training loops stubbed: each phase gets its own batch size, lr, seeded generator and the scaled
    latents; pretrain.json records first/last windows the right way round; --overwrite replaces the folder."""
    from library.data.dataset import scan_dataset
    from library.demo.tiny import build_tiny_stack

    calls: dict[str, dict] = {}

    def fake_vae(vae, pixels, **kw):
        calls["vae"] = kw
        return [float(v) for v in range(10, 0, -1)]

    def fake_unet(bundle, latents, captions, **kw):
        calls["unet"] = {**kw, "latents": latents, "bundle": bundle}
        return [float(v) for v in range(20, 10, -1)]

    monkeypatch.setattr(P, "train_vae", fake_vae)
    monkeypatch.setattr(P, "train_unet", fake_unet)
    records = scan_dataset(digits_dir)[:8]
    settings = dict(seed=3, vae_steps=7, unet_steps=9, batch_size=5, vae_batch_size=6, lr=1e-3, vae_lr=4e-3,
                    kl_weight=1e-4, caption_dropout=0.2, train_text_encoder=False, threads=1)
    out = P.pretrain_base_model(records, tmp_path / "m", log=lambda _: None, **settings)
    vae, unet = calls["vae"], calls["unet"]
    assert (vae["steps"], vae["batch_size"], vae["lr"], vae["kl_weight"]) == (7, 6, 4e-3, 1e-4)
    assert (unet["steps"], unet["batch_size"], unet["lr"], unet["caption_dropout"]) == (9, 5, 1e-3, 0.2)
    assert not unet["train_text_encoder"]
    # Two generators from the seed, so the UNet phase does not depend on how much the VAE phase drew.
    assert (vae["generator"].initial_seed(), unet["generator"].initial_seed()) == (7, 8)
    seeded = build_tiny_stack(3).unet.state_dict()  # the stack is initialised from the run's seed too
    assert all(torch.equal(v, seeded[k]) for k, v in unet["bundle"].unet.state_dict().items())
    record = json.loads((out / P.PRETRAIN_RECORD).read_text())
    assert float(unet["latents"].std()) == pytest.approx(1.0, abs=1e-3)  # scaled by the measured factor
    assert unet["bundle"].vae.config.scaling_factor == record["scaling_factor"]
    assert (record["vae_recon_mse_first"], record["vae_recon_mse_last"]) == (10.0, 1.0)
    assert (record["unet_loss_first"], record["unet_loss_last"]) == (20.0, 11.0)
    assert (record["vae_lr"], record["unet_lr"], record["batch_size"], record["vae_batch_size"]) == (4e-3, 1e-3, 5, 6)
    assert P.pretrain_base_model(records, out, overwrite=True, log=lambda _: None, **settings) == out
