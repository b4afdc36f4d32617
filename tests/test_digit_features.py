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


def test_demo_captions_read_a_handwritten_digit_name():
    """The demo's captions are its training data: another wording changes every seeded demo result."""
    assert [digit_caption(label) for label in (0, 7, 9)] == [
        "a handwritten digit zero", "a handwritten digit seven", "a handwritten digit nine"]


def test_only_single_numerals_name_a_digit():
    """A caption's other numbers (an index, a year) are not digits: "12" must not become a label."""
    assert D.digit_label("a handwritten digit seven, sample 12 of 2024") == 7
    with pytest.raises(DataError, match="names no digit"):
        D.digit_label("a handwritten digit, sample 12")


def test_the_extractors_lenient_parser_gives_none_unless_one_digit_is_named():
    """Conditional accuracy skips prompts naming no digit or two; it must not score them against either."""
    from library.data.digit_captions import digit_label_or_none

    assert digit_label_or_none("digit 7, a seven") == 7
    assert digit_label_or_none("a three next to a five") is None
    assert digit_label_or_none("a photo of a cat") is None


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


def test_accuracies_and_feature_statistics_come_from_the_documented_images(trained, digits):
    """Held-out accuracy on the held-out images only, train accuracy on the training images only, and the feature
    normalisation (mean / std that features() removes) from the training images' raw features: the seeded split is
    ``torch.randperm(N)`` under the seed, its first round(0.15 N) images held out."""
    result, _ = trained
    pixels, labels = digits
    order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0))
    held, train = order[:result.num_heldout], order[result.num_heldout:]
    assert result.heldout_accuracy == D.accuracy(result.net, pixels[held], labels[held])
    assert result.train_accuracy == D.accuracy(result.net, pixels[train], labels[train])
    raw = result.net.raw_features(pixels[train])
    assert torch.allclose(result.net.feature_mean, raw.mean(0), atol=1e-5)
    assert torch.allclose(result.net.feature_std, raw.std(0).clamp_min(1e-6), atol=1e-5)


def test_random_shift_moves_up_to_two_pixels_each_way_over_a_black_background():
    image = torch.full((400, 1, 5, 5), -1.0)
    image[:, :, 2, 2] = 1.0  # one white pixel in the middle
    shifted = D._random_shift(image, torch.Generator().manual_seed(0))
    assert shifted.shape == image.shape and bool(((shifted == -1) | (shifted == 1)).all())  # padding is black (-1)
    where = {tuple(int(i) for i in (s[0] == 1).nonzero()[0]) for s in shifted}
    assert where == {(y, x) for y in range(5) for x in range(5)}  # every shift in [-2, 2] x [-2, 2], no other


def test_the_input_checks_sit_where_documented(digits):
    """Labels 0..9 (10 is out), a hold-out fraction strictly inside (0, 1), at least one image held out and at least
    10 left to train on."""
    from library.errors import ConfigError

    pixels, labels = digits
    with pytest.raises(DataError, match="0..9"):
        D.train_digit_feature_net(pixels[:50], torch.full((50,), 10), epochs=1)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        D.train_digit_feature_net(pixels[:50], labels[:50], epochs=1, holdout_fraction=0.0)
    with pytest.raises(DataError, match="too few .*: 9 left after holding out 2 \\(need at least 10"):
        D.train_digit_feature_net(pixels[:11], labels[:11], epochs=1)  # round(11 * 0.15) = 2 held out
    quiet = dict(epochs=1, batch_size=64, threads=1, log=lambda _: None)
    assert D.train_digit_feature_net(pixels[:12], labels[:12], **quiet).num_train == 10  # 10 to train on: enough
    tiny_fraction = D.train_digit_feature_net(pixels[:20], labels[:20], holdout_fraction=0.01, **quiet)
    assert tiny_fraction.num_heldout == 1 and tiny_fraction.heldout_accuracy in (0.0, 1.0)  # never none held out


def test_a_batch_of_another_rank_is_refused_even_with_three_channels():
    """(N, 3, W) or (N, 3, H, W, 1) must be the one-line shape error, not a crash deep inside interpolation."""
    from library.eval.small_cnn import SmallCNN

    for shape in ((2, 3, 32), (2, 3, 32, 32, 1), (2, 1, 32)):
        with pytest.raises(DataError, match="shaped"):
            SmallCNN.prepare(torch.zeros(shape))


def test_features_in_batches_are_those_of_one_pass_every_image_included():
    """Proxy FID/KID reads every image's features: a batch boundary must neither drop nor change one."""
    from library.eval.small_cnn import SmallCNN, small_cnn_features

    torch.manual_seed(0)
    net, images = SmallCNN(), torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        batched, whole = small_cnn_features(net, images, batch_size=2), net.eval().features(images)
    assert batched.shape == whole.shape == (5, net.num_features)
    assert torch.allclose(batched, whole, atol=1e-6)  # not bit-equal: conv kernels depend on the batch size
    assert small_cnn_features(net, images[:0]).shape == (0, net.num_features)


def test_feature_standardisation_leaves_the_classifier_alone():
    """The stored feature mean/std rescale proxy-FID features only: the network's predictions must not move."""
    from library.eval.small_cnn import SmallCNN

    torch.manual_seed(0)
    net, images = SmallCNN().eval(), torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        logits, features = net(images), net.features(images)
        net.feature_mean.uniform_(-1, 1)
        net.feature_std.uniform_(0.5, 2)
        assert torch.equal(net(images), logits)
        assert torch.allclose(net.features(images) * net.feature_std + net.feature_mean, features, atol=1e-5)


def test_accuracy_is_the_fraction_right_across_batches_and_nan_for_no_images():
    """Held-out accuracy in the network's metadata: every image counted once, and no images is "unknown", not 0."""
    from library.eval.small_cnn import SmallCNN

    torch.manual_seed(0)
    net, images = SmallCNN(), torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        predicted = net.eval()(images).argmax(1)
    wrong_first = predicted.clone()
    wrong_first[0] = (wrong_first[0] + 1) % 10
    assert D.accuracy(net, images, predicted, batch_size=3) == 1.0
    assert D.accuracy(net, images, wrong_first, batch_size=3) == 0.75
    nan = D.accuracy(net, images[:0], predicted[:0])
    assert nan != nan


def test_zero_epochs_or_batch_size_is_a_config_error():
    """Either trains nothing: one clear error, not an untrained classifier left to judge the utility."""
    from library.errors import ConfigError

    pixels, labels = torch.zeros(20, 3, 32, 32), torch.arange(20) % 10
    for bad in ({"epochs": 0}, {"batch_size": 0}):
        with pytest.raises(ConfigError, match="at least 1"):
            D.train_digit_feature_net(pixels[:20], labels[:20], **bad)


def test_the_seed_draws_the_initial_weights_and_the_file_records_the_run(tmp_path):
    """With lr 0 the trained net is its seeded initialisation; the saved metadata says seed, epochs and sizes, and
    the returned net is frozen in eval mode (no dropout when the caller runs it)."""
    from library.eval.small_cnn import SmallCNN

    pixels, labels = torch.rand(20, 3, 32, 32) * 2 - 1, torch.arange(20) % 10
    out = tmp_path / "net.safetensors"
    result = D.train_digit_feature_net(pixels, labels, seed=5, epochs=1, lr=0.0, out_path=out, threads=1,
                                       log=lambda _: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        init = dict(SmallCNN().named_parameters())
    assert all(torch.equal(p, init[name]) for name, p in result.net.named_parameters())
    assert not result.net.training
    metadata = D.load_digit_feature_net(out).metadata
    assert {k: metadata[k] for k in ("seed", "epochs", "num_train", "num_heldout")} == {
        "seed": "5", "epochs": "1", "num_train": "17", "num_heldout": "3"}


def test_a_feature_constant_over_the_training_images_stays_finite():
    """A dead (constant) feature must not turn proxy-FID features into inf/NaN through a zero std."""
    from library.eval.small_cnn import SmallCNN

    torch.manual_seed(0)
    net, same = SmallCNN().eval(), torch.zeros(3, 3, 32, 32)
    D._set_feature_statistics(net, same)  # every raw feature is constant over identical images
    assert float(net.feature_std.min()) > 0 and torch.isfinite(net.features(same)).all()
