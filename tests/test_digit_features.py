"""The digit classifier behind the proxy FID/KID: caption labels, training, features, files, CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from library.cli import run_cli
from library.demo import digit_classifier as D
from library.demo.digits import DIGIT_NAMES, digit_caption
from library.errors import DataError, ModelError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digit_features.py"


def _script_main():
    spec = importlib.util.spec_from_file_location("train_digit_features", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ------------------------------------------------------------------------------------------ captions


def test_caption_parser_handles_all_ten_digits():
    for label in range(10):
        assert D.digit_label(digit_caption(label)) == label
        assert D.digit_label(f"A photo of the number {DIGIT_NAMES[label].upper()}.") == label
        assert D.digit_label(f"digit {label}") == label
    assert D.digit_label("seven, a handwritten seven") == 7  # repeats of one digit are fine


@pytest.mark.parametrize("caption", ["a photo of a cat", "", "someone wrote a digit"])
def test_caption_parser_rejects_captions_without_a_digit(caption):
    with pytest.raises(DataError, match="names no digit"):
        D.digit_label(caption)


def test_caption_parser_rejects_two_digits():
    with pytest.raises(DataError, match="several digits"):
        D.digit_label("a three next to a five")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def digits():
    """600 sklearn digits as 32 px RGB in [-1, 1], labels from their captions (written + read like the demo)."""
    import tempfile

    from library.demo.digits import write_digits_dataset

    with tempfile.TemporaryDirectory() as folder:
        records = write_digits_dataset(Path(folder) / "d", limit=600)
        return D.load_digit_images(records)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    pixels, labels = digits
    out = tmp_path_factory.mktemp("digit_net") / "net.safetensors"
    result = D.train_digit_feature_net(pixels, labels, seed=0, epochs=8, out_path=out, threads=1)
    return result, out


def test_classifier_is_clearly_above_chance_on_held_out_digits(trained):
    result, _ = trained
    print(f"digit classifier: held-out accuracy {result.heldout_accuracy:.4f} on {result.num_heldout} images, "
          f"train {result.train_accuracy:.4f} on {result.num_train}, {result.seconds:.1f}s")
    assert result.num_heldout == 90 and result.num_train == 510
    assert result.heldout_accuracy > 0.8  # chance is 0.1


def test_features_have_the_documented_shape_and_survive_a_round_trip(trained, digits):
    result, path = trained
    pixels, _ = digits
    feats = D.extract_features(result.net, pixels[:70])
    assert feats.shape == (70, D.FEATURE_DIM) == (70, result.net.num_features)
    assert torch.isfinite(feats).all() and float(feats.std(0).min()) > 0, "no dead feature dimensions"

    loaded = D.load_digit_feature_net(path)
    assert torch.equal(D.extract_features(loaded, pixels[:70]), feats)
    assert float(loaded.metadata["heldout_accuracy"]) == pytest.approx(result.heldout_accuracy, abs=1e-6)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # Grey input and other sizes are adapted; a wrong layout is a clear error.
    grey = pixels[:4, :1]
    assert torch.allclose(loaded.features(grey), loaded.features(pixels[:4]), atol=1e-6)
    assert loaded.features(torch.nn.functional.interpolate(pixels[:4], size=64)).shape == (4, D.FEATURE_DIM)
    with pytest.raises(DataError, match="shaped"):
        loaded.features(pixels[0])


def test_training_is_deterministic(digits):
    pixels, labels = digits
    quiet = dict(epochs=1, threads=1, log=lambda _: None)
    a = D.train_digit_feature_net(pixels[:100], labels[:100], seed=5, **quiet).net.state_dict()
    b = D.train_digit_feature_net(pixels[:100], labels[:100], seed=5, **quiet).net.state_dict()
    c = D.train_digit_feature_net(pixels[:100], labels[:100], seed=6, **quiet).net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("epochs", [4, 5, 6])
def test_any_step_count_trains(digits, epochs):
    """One batch per epoch: 5 steps in all is a one-step warm-up, where torch's OneCycleLR divided by zero."""
    pixels, labels = digits
    result = D.train_digit_feature_net(pixels[:40], labels[:40], seed=0, epochs=epochs, batch_size=64, threads=1,
                                       log=lambda _: None)
    assert all(torch.isfinite(v).all() for v in result.net.state_dict().values() if v.is_floating_point())


def test_loading_a_foreign_or_missing_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="does not exist"):
        D.load_digit_feature_net(tmp_path / "missing.safetensors")
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"ss_network_dim": "4"})
    with pytest.raises(ModelError, match="not a digit feature network"):
        D.load_digit_feature_net(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot read"):
        D.load_digit_feature_net(garbage)


def test_bad_labels_are_rejected(digits):
    pixels, labels = digits
    with pytest.raises(DataError, match="0..9"):
        D.train_digit_feature_net(pixels[:50], torch.full((50,), 12), epochs=1)
    with pytest.raises(DataError, match="labels"):
        D.train_digit_feature_net(pixels[:50], labels[:40], epochs=1)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_trains_then_skips(digits_dir, tmp_path, capsys):
    main = _script_main()
    out = tmp_path / "features.safetensors"
    argv = ["--dataset_dir", str(digits_dir), "--output", str(out), "--epochs", "1", "--threads", "1"]
    assert run_cli(main, argv) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert D.load_digit_feature_net(out).num_features == D.FEATURE_DIM
    stamp = out.stat().st_mtime_ns
    assert run_cli(main, argv) == 0
    assert "skipping" in capsys.readouterr().out and out.stat().st_mtime_ns == stamp


def test_cli_error_for_manifest_without_pretrain(manifest_path, tmp_path, capsys):
    main = _script_main()
    assert run_cli(main, ["--manifest", str(manifest_path), "--output", str(tmp_path / "f.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pretrain" in err
