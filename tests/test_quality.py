"""Tests of the utility reporting of evaluate_mia.py (library.eval.quality): held-out losses, --quality sample grids,
proxy (digit-feature) and Inception FD/KID, and one clear error line for missing or foreign weight files.

The Inception network here has random weights: it tests the plumbing (strict loading, feature widths, the
metrics reaching the report), not FID values; real FID needs the user's Inception weight file.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate_mia
from library.errors import ModelError
from library.eval.extractors import (
    EXTRACTORS,
    extract_features,
    inception_extractor,
    small_cnn_extractor,
)
from library.eval.fid_inception import FIDInceptionV3, load_fid_inception
from library.eval.generation import quality_prompts
from library.eval.metrics import feature_metrics, real_vs_real_floor
from library.eval.quality import heldout_losses
from library.eval.small_cnn import SmallCNN, save_small_cnn

N_IMAGES = 6


def random_inception(path: Path, seed: int = 0) -> Path:
    """A FID-Inception-shaped state dict with random weights, saved like pytorch-fid's .pth file."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        # He init keeps activations O(1) through the 94 convolutions; torch's default shrinks them into
        # subnormal floats, which are ~100x slower on CPU and make every feature ~0.
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return path


def digit_weights(path: Path) -> Path:
    """An untrained small-CNN feature net (the metric only needs some features), as the demo would save one."""
    torch.manual_seed(0)
    net = SmallCNN()
    save_small_cnn(net, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, manifest_path):
    from library.data.manifest import manifest_sha256
    from library.sd.loading import load_sd_model
    from networks.lora import create_network

    root = tmp_path_factory.mktemp("quality")
    bundle = load_sd_model(tiny_model_dir)
    network = create_network(1.0, 4, 4.0, None, bundle.text_encoder, bundle.unet, train_unet_only=True)
    with torch.no_grad():  # kohya init has lora_up = 0 (no effect); make the LoRA visibly change the samples
        generator = torch.Generator().manual_seed(0)
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    lora = root / "noisy.safetensors"
    network.save_weights(lora, metadata={"smp_lora.manifest_sha256": manifest_sha256(manifest_path)})
    return {"root": root, "model": tiny_model_dir, "manifest": manifest_path, "lora": lora,
            "inception": random_inception(root / "pt_inception.pth")}


def base_args(world, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(world["model"]), "--split_manifest", str(world["manifest"]),
        "--output_dir", str(out), "--resolution", "32", "--timesteps", "5", "50", "--num_noise_draws", "1",
        "--batch_size", "64", "--attacks", "loss", "--n_bootstrap", "0", "--no-plots", "--no-progress_bar",
        "--no_cache", *extra,
    ]


def run_error(capsys, argv) -> str:
    rc = evaluate_mia.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def evaluated(world):
    out = world["root"] / "eval"
    extra = ["--network_weights", str(world["lora"]), "--quality", "--quality_num_images", str(N_IMAGES),
             "--quality_steps", "2", "--quality_kid_subsets", "10", "--inception_weights", str(world["inception"]),
             "--digit_feature_weights", str(digit_weights(world["root"] / "digits.safetensors")),
             "--utility_reference", "noisy"]
    rc = evaluate_mia.main(base_args(world, out, *extra))
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def test_quality_writes_grids_and_metrics(evaluated):
    out, report = evaluated
    from PIL import Image

    assert set(report["utility"]) == {"base", "noisy"}
    grids = [out / "samples_base.png", out / "samples_noisy.png"]
    for grid in grids:
        assert grid.is_file() and Image.open(grid).size == (3 * 32, 2 * 32)  # 6 images, 3 columns
    # Same prompts and seeds for every model: the samples differ only because the LoRA is applied.
    assert np.asarray(Image.open(grids[0])).tolist() != np.asarray(Image.open(grids[1])).tolist()
    quality = report["quality"]
    assert quality["num_images"] == N_IMAGES and quality["reference"] == "members"
    assert quality["n_reference"] == 24 and quality["kid_subset_size"] == N_IMAGES
    for model in ("base", "noisy"):
        row = report["utility"][model]
        for key in ("fid_2048", "kid_2048", "kid_2048_std", "fid_768", "kid_768", "fid_192", "fid_64"):
            assert row[key] is not None and np.isfinite(row[key]), (model, key)
        assert row["fid_2048"] > 0
    assert {"fid_2048", "kid_2048", "fid_768"} <= set(quality["real_vs_real_floor"])
    md = (out / "report.md").read_text()
    assert "## Utility (per model)" in md and "fid_2048" in md and "samples_noisy.png" in md
    for model in ("base", "noisy"):
        assert np.isfinite(report["utility"][model]["proxy_fd_digits"])
        assert report["utility"][model]["proxy_kid_digits"] is not None
    assert "PROXY" in report["utility_metrics"]["proxy_fd_digits"] and "proxy_fd_digits" in md
    assert "fid" not in json.dumps({k: v for k, v in report["utility"]["base"].items() if k.startswith("proxy")})
    # The digit classifier also reads the samples back: conditional accuracy over the digit prompts, and U.
    accuracy = {m: report["utility"][m]["conditional_accuracy"] for m in ("base", "noisy")}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert report["utility"]["noisy"]["conditional_accuracy_n"] == N_IMAGES
    assert quality["utility_reference"] == "noisy"
    if accuracy["base"] != accuracy["noisy"]:
        assert report["utility"]["noisy"]["utility_retained"] == pytest.approx(1.0)
        assert report["utility"]["base"]["utility_retained"] == pytest.approx(0.0)
    assert "conditional_accuracy" in md


def test_heldout_losses_are_reported(evaluated):
    out, report = evaluated
    for model in ("base", "noisy"):
        row = report["utility"][model]
        assert row["loss_member_test"] > 0 and row["loss_nonmember_test"] > 0
        assert row["loss_gap"] == pytest.approx(row["loss_nonmember_test"] - row["loss_member_test"])
    assert "loss_member_test" in report["utility_metrics"]
    md = (out / "report.md").read_text()
    assert "| model | loss_member_test | loss_nonmember_test | loss_gap | loss_nonmember_test_t" in md
    timesteps = report["config"]["timesteps"]
    for model in ("base", "noisy"):  # one held-out loss per evaluation timestep, their mean the overall one
        per_t = [report["utility"][model][f"loss_nonmember_test_t{t}"] for t in timesteps]
        assert sum(per_t) / len(per_t) == pytest.approx(report["utility"][model]["loss_nonmember_test"])
    from library.eval.quality import worse_than_base

    flagged = worse_than_base(report["utility"])  # report.md says so exactly for the flagged models
    assert ("`noisy` denoises worse than the base model" in md) == ("noisy" in flagged)
    assert f"loss_nonmember_test_t{timesteps[0]}" in report["utility_metrics"]


# ---------------------------------------------------------------------------------------------- units


def test_heldout_losses_average_the_right_samples():
    losses = torch.tensor([1.0, 2.0, 10.0, 20.0, 100.0]).view(5, 1, 1).expand(5, 2, 3).clone()
    feats = {"m": SimpleNamespace(losses=losses)}
    splits = ["member_aux", "member_test", "member_test", "nonmember_test", "nonmember_aux"]
    row = heldout_losses(feats, splits)["m"]
    assert row == {"loss_member_test": 6.0, "loss_nonmember_test": 20.0, "loss_gap": 14.0}


def test_heldout_losses_per_timestep_read_each_column_of_the_non_members():
    # two timesteps: the non-member's losses are 20 at t=50 and 40 at t=200, others differ at every t
    losses = torch.tensor([[1.0, 3.0], [20.0, 40.0], [100.0, 300.0]]).view(3, 2, 1).expand(3, 2, 4).clone()
    row = heldout_losses({"m": SimpleNamespace(losses=losses)}, ["member_test", "nonmember_test", "nonmember_aux"],
                         timesteps=[50, 200])["m"]
    assert row["loss_nonmember_test_t50"] == 20.0 and row["loss_nonmember_test_t200"] == 40.0
    assert row["loss_nonmember_test"] == 30.0  # the mean over t is unchanged
    with pytest.raises(ValueError, match="3 timesteps named for 2 loss columns"):
        heldout_losses({"m": SimpleNamespace(losses=losses)}, ["member_test"] * 3, timesteps=[1, 2, 3])


def test_frechet_distance_of_a_set_with_itself_is_zero(world):
    extractor = inception_extractor(world["inception"], torch.device("cpu"))
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    feats = extract_features(extractor, images, torch.device("cpu"))
    assert {k: v.shape for k, v in feats.items()} == {"64": (5, 64), "192": (5, 192), "768": (5, 768),
                                                      "2048": (5, 2048)}
    same = feature_metrics(extractor.metrics, feats, feats, n_subsets=5)
    for key in ("fid_2048", "fid_768", "fid_192", "fid_64"):
        assert same[key] == pytest.approx(0.0, abs=1e-6), key
    other = extract_features(extractor, torch.rand(5, 3, 32, 32) * 2 - 1, torch.device("cpu"))
    assert feature_metrics(extractor.metrics, feats, other, n_subsets=5)["fid_2048"] > 1e-4
    assert set(real_vs_real_floor(extractor.metrics, feats, n_subsets=5)) >= {"fid_2048", "kid_2048"}


def test_extractor_registry(world, tmp_path):
    """Both extractors are registered in evaluation (worker processes import nothing else), with their flags."""
    assert {name: entry.weights_option for name, entry in EXTRACTORS.items()} == {
        "digits": "digit_feature_weights", "inception": "inception_weights"}
    digits = EXTRACTORS["digits"].load(digit_weights(tmp_path / "d.safetensors"), torch.device("cpu"))
    assert digits.name == "digits" and digits.metrics == {"digits": ("proxy_fd_digits", "proxy_kid_digits")}
    assert "PROXY" in digits.description
    feats = extract_features(digits, torch.rand(3, 3, 32, 32) * 2 - 1, torch.device("cpu"))
    assert feats["digits"].shape == (3, 64) and feats["digits"].dtype == np.float64
    assert small_cnn_extractor("glyphs", "a glyph classifier", tmp_path / "d.safetensors",
                               torch.device("cpu")).metrics == {"glyphs": ("proxy_fd_glyphs", "proxy_kid_glyphs")}


def test_prompts_cycle_the_test_captions_deterministically():
    entry = lambda c: SimpleNamespace(caption=c)  # noqa: E731
    manifest = SimpleNamespace(member_test=[entry("a"), entry("b")], nonmember_test=[entry("c")])
    assert quality_prompts(manifest, 5) == ["a", "b", "c", "a", "b"]


def test_inception_weight_files_are_checked(world, tmp_path):
    model = load_fid_inception(world["inception"])
    assert not model.training and sum(p.numel() for p in model.parameters()) > 20_000_000
    from safetensors.torch import save_file

    # A safetensors copy without BatchNorm's num_batches_tracked counters loads too (they do nothing in eval).
    lean = tmp_path / "inception.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, str(lean))
    assert torch.equal(load_fid_inception(lean).fc.weight, model.fc.weight)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable weight file"):
        load_fid_inception(corrupt)
    foreign = tmp_path / "imagenet_inception.pth"  # like torchvision's: 1000 classes, AuxLogits
    state = FIDInceptionV3().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    torch.save(state, foreign)
    with pytest.raises(ModelError, match="not the FID Inception-v3 weights"):
        load_fid_inception(foreign)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_inception_file_is_one_line(world, tmp_path, capsys):
    missing = tmp_path / "nope.pth"
    err = run_error(capsys, base_args(world, tmp_path / "out", "--quality", "--inception_weights", str(missing)))
    assert "nope.pth" in err and "file not found" in err and "inception_weights" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_quality_flag_combinations_are_checked(world, tmp_path, capsys):
    err = run_error(capsys, base_args(world, tmp_path / "out", "--inception_weights", str(world["inception"])))
    assert "--quality" in err
    err = run_error(capsys, base_args(world, tmp_path / "out", "--quality", "--quality_features", "digits"))
    assert "digit_feature_weights" in err
    err = run_error(capsys, base_args(world, tmp_path / "out", "--utility_reference", "base"))
    assert "'utility_reference' is only used with --quality" in err


def test_conditional_accuracy_reads_the_prompt_class_and_skips_prompts_without_one():
    from library.eval.extractors import FeatureExtractor
    from library.eval.quality import conditional_accuracy

    predicted = torch.tensor([5, 6, 0, 7])  # what the "classifier" reads in images 0..3
    extractor = FeatureExtractor("fake", "", lambda x: {}, {}, batch_size=3,
                                 classify=lambda images: predicted[images[:, 0, 0, 0].long()],
                                 label_of=lambda prompt: None if prompt == "a cat" else int(prompt))
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    out = conditional_accuracy(extractor, images, ["5", "a cat", "1", "7"], torch.device("cpu"))
    assert out == {"conditional_accuracy": pytest.approx(2 / 3), "conditional_accuracy_n": 3}
    assert conditional_accuracy(extractor, images[:1], ["a cat"], torch.device("cpu"))["conditional_accuracy"] is None


def test_utility_retained_is_the_share_of_the_reference_gain(capsys):
    from library.eval.quality import add_utility_retained

    utility = {"base": {"conditional_accuracy": 0.2}, "lora": {"conditional_accuracy": 0.9},
               "smp": {"conditional_accuracy": 0.55}, "other": {"proxy_fd_digits": 3.0}}
    add_utility_retained(utility, "lora", "conditional_accuracy")
    assert utility["base"]["utility_retained"] == 0.0 and utility["lora"]["utility_retained"] == 1.0
    assert utility["smp"]["utility_retained"] == pytest.approx(0.5)
    assert "utility_retained" not in utility["other"]
    flat = {"base": {"conditional_accuracy": 0.5}, "lora": {"conditional_accuracy": 0.5}}
    add_utility_retained(flat, "lora", "conditional_accuracy")  # no gain over the base: U undefined, left out
    assert "utility_retained" not in flat["lora"]
    # a reference worse than the base: U's sign flipped (another model worse than the base "kept 50 % of the gain")
    worse = {"base": {"conditional_accuracy": 0.54}, "lora": {"conditional_accuracy": 0.46},
             "other": {"conditional_accuracy": 0.5}}
    capsys.readouterr()
    add_utility_retained(worse, "lora", "conditional_accuracy")
    assert not any("utility_retained" in row for row in worse.values())
    assert "U is left out: the reference 'lora' has conditional_accuracy 0.46, no gain" in capsys.readouterr().err


def test_utility_reference_defaults_to_the_one_plain_lora_and_checks_a_given_name():
    from library.errors import ConfigError
    from library.eval.quality import utility_reference
    from library.eval.records import ModelSpec

    def spec(name, method):
        return ModelSpec(name, Path(f"{name}.safetensors"), metadata={"smp_lora.method": method})

    config = SimpleNamespace(utility_reference=None)  # the one field it reads
    assert utility_reference(config, [ModelSpec("base"), spec("a", "lora"), spec("b", "smp_lora")]) == "a"
    assert utility_reference(config, [spec("a", "lora"), spec("b", "lora")]) is None  # ambiguous: no U
    config.utility_reference = "b"
    assert utility_reference(config, [spec("a", "lora"), spec("b", "smp_lora")]) == "b"
    config.utility_reference = "typo"
    with pytest.raises(ConfigError, match="'utility_reference' 'typo' is not an evaluated model"):
        utility_reference(config, [spec("a", "lora")])


def test_check_utility_reference_says_why_several_plain_loras_leave_u_out(capsys):
    from library.errors import ConfigError
    from library.eval.quality import check_utility_reference
    from library.eval.records import ModelSpec

    def spec(name, method):
        return ModelSpec(name, Path(f"{name}.safetensors"), metadata={"smp_lora.method": method})

    config = SimpleNamespace(utility_reference=None)
    check_utility_reference(config, [ModelSpec("base"), spec("a", "lora"), spec("b", "smp_lora")])
    assert capsys.readouterr().err == ""  # one plain LoRA: it is the reference
    check_utility_reference(config, [ModelSpec("base"), spec("a", "lora"), spec("b", "lora")])
    err = capsys.readouterr().err
    assert err.startswith("warning: U (utility retained) is left out: 2 plain-LoRA files (a, b)") and "--utility_reference" in err
    config.utility_reference = "b"
    check_utility_reference(config, [ModelSpec("base"), spec("a", "lora"), spec("b", "lora")])
    assert capsys.readouterr().err == ""
    config.utility_reference = "typo"
    with pytest.raises(ConfigError, match="'utility_reference' 'typo'"):
        check_utility_reference(config, [spec("a", "lora")])


def test_a_model_that_denoises_some_t_worse_than_the_base_is_flagged():
    from library.eval.quality import worse_than_base

    utility = {"base": {"loss_nonmember_test_t50": 0.172, "loss_nonmember_test_t350": 0.122},
               "fine": {"loss_nonmember_test_t50": 0.181, "loss_nonmember_test_t350": 0.101},  # +5 %: within
               "lost": {"loss_nonmember_test_t50": 0.281, "loss_nonmember_test_t350": 0.112}}
    assert worse_than_base(utility) == {"lost": [("50", 0.281, 0.172)]}
    assert worse_than_base(utility, tolerance=0.04) == {"fine": [("50", 0.181, 0.172)], "lost": [("50", 0.281, 0.172)]}
    assert worse_than_base({"lost": utility["lost"]}) == {}  # no base row: nothing to compare with
