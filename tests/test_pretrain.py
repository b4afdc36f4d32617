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
