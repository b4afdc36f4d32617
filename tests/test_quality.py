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


# ---------------------------------------------------------------------------------------------- mutation pins
# Each test below kills mutants of quality.py / generation.py / fid_inception.py / extractors.py that changed a
# reported number and still passed the tests above (mutation testing of the utility metrics).


def test_heldout_losses_refuse_fewer_timesteps_than_loss_columns():
    """One name for two columns would otherwise report loss_nonmember_test_t<t> for the first column only."""
    losses = torch.ones(2, 2, 1)
    with pytest.raises(ValueError, match="1 timesteps named for 2 loss columns"):
        heldout_losses({"m": SimpleNamespace(losses=losses)}, ["member_test", "nonmember_test"], timesteps=[50])


def test_a_loss_exactly_at_the_tolerance_is_not_flagged():
    """``worse_than_base`` flags "more than" the tolerance: 1.5 against a base of 1.0 at tolerance 0.5 is within."""
    from library.eval.quality import worse_than_base

    utility = {"base": {"loss_nonmember_test_t50": 1.0}, "edge": {"loss_nonmember_test_t50": 1.5}}
    assert worse_than_base(utility, tolerance=0.5) == {}
    assert worse_than_base(utility, tolerance=0.25) == {"edge": [("50", 1.5, 1.0)]}


def test_conditional_accuracy_counts_prompts_of_class_zero():
    """Class 0 (the digit "0") is a class, not "no class": only None leaves a prompt out."""
    from library.eval.extractors import FeatureExtractor
    from library.eval.quality import conditional_accuracy

    extractor = FeatureExtractor("fake", "", lambda x: {}, {}, batch_size=2,
                                 classify=lambda images: images[:, 0, 0, 0].long(),
                                 label_of=lambda prompt: None if prompt == "a cat" else int(prompt))
    images = torch.tensor([0.0, 3.0, 0.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    out = conditional_accuracy(extractor, images, ["0", "0", "a cat"], torch.device("cpu"))
    assert out == {"conditional_accuracy": 0.5, "conditional_accuracy_n": 2}


def _colour_extractor(batch_size: int = 4):
    """A feature 'network' whose features are the mean colour of each image: [N, 3]."""
    from library.eval.extractors import FeatureExtractor

    return FeatureExtractor("px", "mean colour", lambda images: {"px": images.mean((2, 3))}, {"px": ("fd_px", "kid_px")},
                            batch_size=batch_size)


def _flat_manifest(monkeypatch, colours: np.ndarray):
    """A manifest of len(colours) reference entries (entry i = index i) whose images are flat ``colours[i]`` in
    [-1, 1], and D_te captions "p0".."p3"."""
    import library.data.images as images_mod

    def fake_load_image(path, resolution):
        return torch.tensor(colours[path], dtype=torch.float32).view(3, 1, 1).expand(3, resolution, resolution)

    monkeypatch.setattr(images_mod, "load_image", fake_load_image)
    entries = list(range(len(colours)))
    caption = lambda c: SimpleNamespace(caption=c)
    return SimpleNamespace(members=lambda: entries, abs_path=lambda e: e,
                           member_test=[caption("p0"), caption("p1")], nonmember_test=[caption("p2"), caption("p3")])


def test_real_features_read_every_reference_image_once_in_order(monkeypatch):
    """Chunked reading (REAL_CHUNK images at a time) keeps all references, in order, at --resolution."""
    from library.eval import quality

    colours = np.random.default_rng(0).uniform(-1, 1, size=(5, 3))
    manifest = _flat_manifest(monkeypatch, colours)
    monkeypatch.setattr(quality, "REAL_CHUNK", 2)
    config = SimpleNamespace(resolution=4)
    real = quality.real_features(config, manifest, manifest.members(), [_colour_extractor(batch_size=3)],
                                 torch.device("cpu"))
    assert set(real) == {"px"} and real["px"]["px"].shape == (5, 3)
    np.testing.assert_allclose(real["px"]["px"], colours, rtol=1e-6)


def test_run_quality_scores_the_samples_against_the_references(monkeypatch, tmp_path):
    """run_quality's numbers are feature_metrics(real = references, fake = samples) with ``--seed`` for the KID
    subsets, the real-vs-real floor of the references with the same seed (not quality_seed), a grid of the first
    GRID_MAX_IMAGES samples, and U counted in conditional accuracy (not in the Fréchet distance)."""
    from PIL import Image

    from library.eval import quality
    from library.eval.extractors import FeatureExtractor
    from library.eval.generation import pil_to_tensor
    from library.eval.records import ModelSpec
    from library.sd import sampling

    rng = np.random.default_rng(1)
    real_colours = rng.uniform(-1, 1, size=(24, 3))
    manifest = _flat_manifest(monkeypatch, real_colours)

    def samples(n_red):  # 20 flat images, the first n_red of them with a red channel above the middle
        reds = [200] * n_red + [50] * (20 - n_red)
        return [Image.new("RGB", (4, 4), (red, *(int(v) for v in rng.integers(0, 256, 2)))) for red in reds]

    generated = {"base": samples(5), "lora": samples(15), "smp": samples(10)}  # accuracy 0.25, 0.75, 0.5
    monkeypatch.setattr(quality, "generate_all", lambda config, specs, prompts, device, pool: [
        (generated[spec.name], 1.0) for spec in specs])
    tiled = []
    monkeypatch.setattr(sampling, "save_grid", lambda images, path: tiled.append(len(images)) or Path(path))
    config = SimpleNamespace(utility_reference="lora", quality_num_images=20, quality_reference="members",
                             resolution=4, quality_kid_subsets=3, seed=7, quality_seed=11, quality_sampler="ddim",
                             quality_steps=2, quality_guidance_scale=7.5)
    colour = _colour_extractor()
    extractor = FeatureExtractor("px", "", colour.extract, colour.metrics, batch_size=4, label_of=lambda p: 1,
                                 classify=lambda images: (images[:, 0, 0, 0] > 0).long())
    # A classifier that reads no class from the prompts gives no conditional accuracy (and does not fail).
    glyphs = FeatureExtractor("glyphs", "", lambda images: {"g": images.amax((2, 3))}, {"g": ("fd_g", None)},
                              classify=lambda images: torch.zeros(len(images), dtype=torch.long))
    utility = {}
    settings = quality.run_quality(config, [ModelSpec(name) for name in generated], manifest, torch.device("cpu"),
                                   [extractor, glyphs], tmp_path, utility, pool=None)
    real = {"px": real_colours}
    for name, images in generated.items():
        fake = extract_features(extractor, pil_to_tensor(images), torch.device("cpu"))
        expected = feature_metrics(extractor.metrics, real, fake, n_subsets=3, seed=7)
        assert {k: utility[name][k] for k in expected} == pytest.approx(expected, rel=1e-6), name
    assert {name: utility[name]["conditional_accuracy"] for name in generated} == {
        "base": 0.25, "lora": 0.75, "smp": 0.5}
    assert utility["smp"]["utility_retained"] == pytest.approx(0.5)
    floor = real_vs_real_floor(extractor.metrics, real, 3, 7)
    assert {k: settings["real_vs_real_floor"][k] for k in floor} == pytest.approx(floor, rel=1e-6)
    assert tiled == [16, 16, 16] and settings["grid_images"] == 16 and settings["grids"]["smp"] == "samples_smp.png"
    assert settings["kid_subset_size"] == 20 and settings["n_reference"] == 24 and settings["num_images"] == 20


def test_utility_retained_is_left_out_when_the_reference_or_the_base_lacks_the_metric():
    from library.eval.quality import add_utility_retained

    for rows in ({"base": {"conditional_accuracy": 0.2}, "lora": {}},
                 {"base": {}, "lora": {"conditional_accuracy": 0.9}}):
        add_utility_retained(rows, "lora", "conditional_accuracy")
        assert not any("utility_retained" in row for row in rows.values())


def test_only_the_per_t_losses_can_flag_a_model_worse_than_the_base():
    """A LoRA that raises conditional accuracy or the loss gap over the base is not "denoising worse" in report.md."""
    from library.eval.quality import worse_than_base

    utility = {"base": {"loss_nonmember_test_t50": 1.0, "conditional_accuracy": 0.5, "loss_gap": 0.01},
               "lora": {"loss_nonmember_test_t50": 1.0, "conditional_accuracy": 0.9, "loss_gap": 0.05}}
    assert worse_than_base(utility) == {}


def test_real_features_load_the_references_at_the_evaluated_resolution(monkeypatch):
    """The references are read at --resolution, the size of the samples they are compared with."""
    from library.eval import quality
    from library.eval.extractors import FeatureExtractor

    manifest = _flat_manifest(monkeypatch, np.zeros((3, 3)))
    side = FeatureExtractor("side", "", lambda images: {"side": torch.full((len(images), 1), images.shape[-1])},
                            {"side": ("fd_side", None)})
    real = quality.real_features(SimpleNamespace(resolution=8), manifest, manifest.members(), [side],
                                 torch.device("cpu"))
    assert real["side"]["side"].ravel().tolist() == [8, 8, 8]


def _run_quality_of_one_model(monkeypatch, tmp_path, n_images: int) -> tuple[dict, list[int]]:
    """(settings, images per tiled grid) of run_quality on one model "m" whose ``n_images`` flat samples took 1 s
    to generate, scored against 8 flat references."""
    from PIL import Image

    from library.eval import quality
    from library.eval.records import ModelSpec
    from library.sd import sampling

    manifest = _flat_manifest(monkeypatch, np.random.default_rng(3).uniform(-1, 1, size=(8, 3)))
    samples = [Image.new("RGB", (4, 4), (40 * i, 90, 200 - 30 * i)) for i in range(n_images)]
    monkeypatch.setattr(quality, "generate_all", lambda config, specs, prompts, device, pool: [(samples, 1.0)])
    tiled: list[int] = []
    monkeypatch.setattr(sampling, "save_grid", lambda images, path: tiled.append(len(images)) or Path(path))
    config = SimpleNamespace(utility_reference=None, quality_num_images=n_images, quality_reference="members",
                             resolution=4, quality_kid_subsets=2, seed=0, quality_seed=0, quality_sampler="ddim",
                             quality_steps=2, quality_guidance_scale=7.5)
    settings = quality.run_quality(config, [ModelSpec("m")], manifest, torch.device("cpu"), [_colour_extractor()],
                                   tmp_path, {}, pool=None)
    return settings, tiled


def test_a_grid_of_fewer_samples_than_its_maximum_says_how_many_it_holds(monkeypatch, tmp_path):
    """report.json's grid_images is the number of samples tiled (3 of 3), not GRID_MAX_IMAGES."""
    settings, tiled = _run_quality_of_one_model(monkeypatch, tmp_path, 3)
    assert tiled == [3] and settings["grid_images"] == 3


def test_a_models_quality_time_adds_scoring_to_generating(monkeypatch, tmp_path):
    """timing_s[model] is generation (1 s here) plus tiling and scoring its samples, the time --quality cost it."""
    settings, _ = _run_quality_of_one_model(monkeypatch, tmp_path, 3)
    assert settings["timing_s"]["m"] > 1.0


# ---------------------------------------------------------------------------------------------- generation


def test_the_quality_reference_names_its_split():
    """--quality_reference members = D_tr, nonmembers, test = D_te; anything else is a ConfigError."""
    from library.errors import ConfigError
    from library.eval.generation import reference_entries

    manifest = SimpleNamespace(members=lambda: ["m"], nonmembers=lambda: ["n"], test=lambda: ["t"])
    assert [reference_entries(manifest, r) for r in ("members", "nonmembers", "test")] == [["m"], ["n"], ["t"]]
    with pytest.raises(ConfigError, match="'quality_reference' must be one of"):
        reference_entries(manifest, "train")


def test_samples_are_scaled_like_the_reference_images(tmp_path):
    """pil_to_tensor (the samples) and load_image (the references) must agree to the bit: [N, 3, H, W], RGB
    channel order, 0..255 -> [-1, 1]; otherwise FID/KID compare two differently scaled sets."""
    from PIL import Image

    from library.data.images import load_image
    from library.eval.generation import pil_to_tensor

    array = np.random.default_rng(2).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    ours = pil_to_tensor([Image.fromarray(array), Image.fromarray(array[::-1].copy())])
    assert ours.shape == (2, 3, 6, 6) and ours.dtype == torch.float32
    assert torch.equal(ours[0], load_image(tmp_path / "x.png", 6))
    assert ours[0, :, 1, 4].tolist() == pytest.approx((array[1, 4] / 127.5 - 1.0).tolist())  # row 1, column 4
    assert pil_to_tensor([Image.new("RGB", (2, 2), (0, 255, 0))])[0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0]
    assert torch.equal(pil_to_tensor([Image.new("L", (2, 3), 255)]), torch.ones(1, 3, 3, 2))  # grey -> RGB


def test_quality_samples_use_the_quality_settings(monkeypatch):
    """generate_samples passes --quality_sampler/steps/guidance_scale/seed (not --seed), the LoRA multiplier, the
    full fine-tune's UNet, --clip_skip (1 when unset) and --max_token_length."""
    import contextlib

    import library.eval.features as features_mod
    from library.eval.generation import generate_samples
    from library.eval.records import ModelSpec
    from library.sd import sampling

    calls = {}

    @contextlib.contextmanager
    def fake_applied_lora(bundle, lora, multiplier, device, dtype, unet=None):
        calls["applied"] = (bundle, lora, multiplier, dtype, unet)
        yield None

    def fake_generate(pipe, specs, **kwargs):
        calls["generate"] = (pipe, [s.prompt for s in specs], kwargs)
        return ["image"]

    monkeypatch.setattr(features_mod, "applied_lora", fake_applied_lora)
    monkeypatch.setattr(sampling, "build_pipeline", lambda bundle, sampler: ("pipe", bundle, sampler))
    monkeypatch.setattr(sampling, "generate", fake_generate)
    config = SimpleNamespace(network_multiplier=0.7, quality_sampler="euler", resolution=24, quality_steps=3,
                             quality_guidance_scale=4.5, quality_seed=11, seed=5, clip_skip=None, max_token_length=150)
    spec = ModelSpec("ft", unet="UNET")
    out = generate_samples(config, "bundle", spec, ["a", "b"], torch.device("cpu"), torch.bfloat16)
    assert out == ["image"]
    assert calls["applied"] == ("bundle", None, 0.7, torch.bfloat16, "UNET")
    assert calls["generate"] == (("pipe", "bundle", "euler"), ["a", "b"], {
        "resolution": 24, "steps": 3, "guidance_scale": 4.5, "seed": 11, "clip_skip": 1, "max_token_length": 150})
    config.clip_skip = 2
    generate_samples(config, "bundle", spec, ["a"], torch.device("cpu"), torch.float32)
    assert calls["generate"][2]["clip_skip"] == 2


def _serial_generation(monkeypatch, generate_samples) -> SimpleNamespace:
    """library.eval.generation with the base model stubbed and ``generate_samples`` as its sampler; a serial pool."""
    import contextlib

    from library.eval import generation

    monkeypatch.setattr(generation, "load_bundle", lambda config, device: "bundle")
    monkeypatch.setattr(generation, "process_bundle", lambda config, device: "bundle")
    monkeypatch.setattr(generation, "generate_samples", generate_samples)
    return SimpleNamespace(parallel=False, in_process=contextlib.nullcontext)


def test_generate_all_keeps_the_model_order_and_the_precision(monkeypatch):
    """Images come back in the order of ``specs`` (run_quality zips them), generated in --mixed_precision, in this
    process and in a worker's job alike."""
    from library.eval import generation
    from library.eval.records import ModelSpec

    seen = []

    def fake_generate_samples(config, bundle, spec, prompts, device, dtype):
        seen.append((spec.name, dtype))
        return [spec.name]

    pool = _serial_generation(monkeypatch, fake_generate_samples)
    config = SimpleNamespace(mixed_precision="bf16")
    specs = [ModelSpec("base"), ModelSpec("a"), ModelSpec("b")]
    out = generation.generate_all(config, specs, ["p"], torch.device("cpu"), pool)
    assert [images for images, _ in out] == [["base"], ["a"], ["b"]]
    assert seen == [("base", torch.bfloat16), ("a", torch.bfloat16), ("b", torch.bfloat16)]
    config.mixed_precision = "fp16"
    images, _ = generation.generate_samples_job(generation.SampleJob(config, specs[1], ["p"], torch.device("cpu")))
    assert images == ["a"] and seen[-1] == ("a", torch.float16)


def test_generation_times_each_model_in_this_process_and_in_a_worker(monkeypatch):
    """A model's seconds (report.json timing_s) are its own generation time, serial or in a worker's job."""
    import time

    from library.eval import generation
    from library.eval.records import ModelSpec

    def slow_generate_samples(config, bundle, spec, prompts, device, dtype):
        time.sleep(0.02)
        return [spec.name]

    pool = _serial_generation(monkeypatch, slow_generate_samples)
    config = SimpleNamespace(mixed_precision="no")
    out = generation.generate_all(config, [ModelSpec("base"), ModelSpec("a")], ["p"], torch.device("cpu"), pool)
    assert [seconds >= 0.02 for _, seconds in out] == [True, True]
    _, seconds = generation.generate_samples_job(generation.SampleJob(config, ModelSpec("a"), ["p"],
                                                                      torch.device("cpu")))
    assert seconds >= 0.02


def test_worker_generation_returns_the_models_in_the_order_of_specs(monkeypatch):
    """With --jobs > 1 the samples still come back in the order of ``specs``, which run_quality zips them with."""
    from library.eval import generation
    from library.eval.records import ModelSpec

    monkeypatch.setattr(generation, "process_bundle", lambda config, device: "bundle")
    monkeypatch.setattr(generation, "generate_samples",
                        lambda config, bundle, spec, prompts, device, dtype: [spec.name])
    pool = SimpleNamespace(parallel=True, map=lambda fn, jobs: [fn(job) for job in jobs])  # WorkerPool.map's order
    specs = [ModelSpec("base"), ModelSpec("a"), ModelSpec("b")]
    out = generation.generate_all(SimpleNamespace(mixed_precision="no"), specs, ["p"], torch.device("cpu"), pool)
    assert [images for images, _ in out] == [["base"], ["a"], ["b"]]


# ---------------------------------------------------------------------------------------------- extractors


def test_extract_features_keeps_every_image_in_order_across_batches():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    feats = extract_features(_colour_extractor(batch_size=2), images, torch.device("cpu"))
    assert feats["px"].dtype == np.float64
    np.testing.assert_array_equal(feats["px"], images.mean((2, 3)).double().numpy())


def test_extractors_give_their_networks_the_images_in_minus_one_to_one(monkeypatch, tmp_path):
    """Both networks take [-1, 1] input (the FID Inception as pytorch-fid, the small CNN as trained): the
    extractors pass the images on unscaled."""
    from library.eval import fid_inception, small_cnn

    seen = []

    class Recorder:
        def to(self, device):
            return self

        def __call__(self, x):
            seen.append(x)
            return {"2048": x.mean((2, 3))}

        def features(self, x):
            seen.append(x)
            return x.mean((2, 3))

    monkeypatch.setattr(fid_inception, "load_fid_inception", lambda path: Recorder())
    monkeypatch.setattr(small_cnn, "load_small_cnn", lambda path: Recorder())
    images = torch.rand(2, 3, 4, 4) * 2 - 1
    inception_extractor(tmp_path / "i.pth", torch.device("cpu")).extract(images)
    small_cnn_extractor("digits", "", tmp_path / "d.safetensors", torch.device("cpu")).extract(images)
    assert len(seen) == 2 and all(torch.equal(x, images) for x in seen)


def test_registering_an_extractor_name_twice_is_refused():
    """A second extractor under a taken ``--quality_features`` name would silently replace the first (another
    network, the same metric names in the report)."""
    from library.eval.extractors import register_extractor

    digits = EXTRACTORS["digits"]
    with pytest.raises(ValueError, match="'digits' is registered twice"):
        register_extractor(digits)
    assert EXTRACTORS["digits"] is digits


def test_inception_reports_kid_at_2048_and_768_dims_only(monkeypatch, tmp_path):
    """The report labels kid_2048 and kid_768 (extractor_notes): a KID dropped from the metrics leaves a labelled
    row without a value; the smaller dims have FID only."""
    from library.eval import fid_inception

    monkeypatch.setattr(fid_inception, "load_fid_inception", lambda path: SimpleNamespace(to=lambda device: None))
    metrics = inception_extractor(tmp_path / "i.pth", torch.device("cpu")).metrics
    assert metrics == {"2048": ("fid_2048", "kid_2048"), "768": ("fid_768", "kid_768"), "192": ("fid_192", None),
                       "64": ("fid_64", None)}


def test_the_small_cnn_classifies_each_image_by_its_largest_logit(monkeypatch, tmp_path):
    """The conditional accuracy compares one class per image with its prompt's digit."""
    from library.eval import small_cnn

    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])

    class Logits:
        def to(self, device):
            return self

        def __call__(self, x):
            return logits[: len(x)]

    monkeypatch.setattr(small_cnn, "load_small_cnn", lambda path: Logits())
    extractor = small_cnn_extractor("digits", "", tmp_path / "d.safetensors", torch.device("cpu"))
    assert extractor.classify(torch.zeros(4, 3, 2, 2)).tolist() == [1, 0, 2, 2]


def test_quality_features_default_to_every_extractor_whose_weights_are_given(monkeypatch):
    """--quality with weight files and no --quality_features measures with each of them; naming one measures only
    that one."""
    from dataclasses import replace

    from library.eval.extractors import load_extractors

    for name in list(EXTRACTORS):
        monkeypatch.setitem(EXTRACTORS, name, replace(EXTRACTORS[name], load=lambda weights, device: weights))
    config = SimpleNamespace(quality_features=[], digit_feature_weights="d.safetensors", inception_weights=None)
    assert load_extractors(config, torch.device("cpu")) == ["d.safetensors"]
    config.inception_weights = "i.pth"
    assert load_extractors(config, torch.device("cpu")) == ["d.safetensors", "i.pth"]
    config.quality_features = ["inception"]
    assert load_extractors(config, torch.device("cpu")) == ["i.pth"]


def test_the_digit_extractor_reads_the_digit_each_prompt_names(monkeypatch, tmp_path):
    """Without the prompts' labels the demo's conditional accuracy (and utility_retained) is never computed."""
    from library.data.digit_captions import digit_label_or_none
    from library.eval import small_cnn
    from library.eval.extractors import digits_extractor

    monkeypatch.setattr(small_cnn, "load_small_cnn", lambda path: SimpleNamespace(to=lambda device: None))
    label_of = digits_extractor(tmp_path / "d.safetensors", torch.device("cpu")).label_of
    assert label_of is not None
    for caption in ("a handwritten digit 7", "a digit", "digits 1 and 2"):
        assert label_of(caption) == digit_label_or_none(caption)
    assert label_of("a handwritten digit 7") == 7


def test_every_metric_of_every_extractor_has_its_report_note():
    """The report explains each metric it prints (proxy metrics say they are not FID), FID ones included."""
    from library.eval.extractors import extractor_notes

    notes = extractor_notes()
    assert list(notes)[:2] == ["proxy_fd_digits", "proxy_kid_digits"]  # registration order
    assert {"conditional_accuracy", "utility_retained", "fid_2048", "kid_2048", "fid_768", "kid_768", "fid_192",
            "fid_64"} <= set(notes)
    assert notes["proxy_fd_digits"].startswith("PROXY") and "(not FID)" in notes["proxy_fd_digits"]


# ---------------------------------------------------------------------------------------------- FID Inception


def test_inception_features_are_pytorch_fids_taps(world):
    """Input resized to 299x299 (bilinear, align_corners=False, no rescaling); "64" / "192" are the spatial means
    of the two stem max-pools (3x3, stride 2), "768" of Mixed_6e (17x17), "2048" of Mixed_7c (8x8, pool3)."""
    import torch.nn.functional as F

    model = load_fid_inception(world["inception"])
    seen = {}
    model.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    for name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_6e", "Mixed_7c"):
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: seen.setdefault(name, out))
    x = torch.rand(1, 3, 40, 24) * 2 - 1
    feats = model(x)
    assert torch.equal(seen["input"], F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))
    assert seen["Mixed_6e"].shape[2:] == (17, 17) and seen["Mixed_7c"].shape[2:] == (8, 8)
    torch.testing.assert_close(feats["64"], F.max_pool2d(seen["Conv2d_2b_3x3"], 3, stride=2).mean((2, 3)))
    torch.testing.assert_close(feats["192"], F.max_pool2d(seen["Conv2d_4a_3x3"], 3, stride=2).mean((2, 3)))
    torch.testing.assert_close(feats["768"], seen["Mixed_6e"].mean((2, 3)))
    torch.testing.assert_close(feats["2048"], seen["Mixed_7c"].mean((2, 3)))


def _branch_outputs(block, x, names):
    """The outputs of ``block``'s submodules ``names`` during ``block(x)``, and the block's output."""
    seen = {}
    handles = [getattr(block, name).register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
               for name in names]
    with torch.no_grad():
        out = block(x)
    for handle in handles:
        handle.remove()
    return [seen[name] for name in names], out


def test_inception_blocks_concatenate_their_branches_in_the_weight_files_order():
    """The channel order of every block is the TF graph's (that of the weight files' next layer): a swapped pair of
    branches still runs, with every later weight reading the wrong channels. Pooled branches: 3x3 average over
    the valid pixels only, max-pooled in Mixed_7c; stride-2 max pool in the reductions. BatchNorm eps is TF's 1e-3."""
    import torch.nn.functional as F

    from library.eval.fid_inception import FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    blocks = {  # block: (its input channels, the branches it concatenates, in order)
        "Mixed_5b": (192, ["branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"]),
        "Mixed_6a": (288, ["branch3x3", "branch3x3dbl_3"]),
        "Mixed_6b": (768, ["branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"]),
        "Mixed_7a": (768, ["branch3x3_2", "branch7x7x3_4"]),
        "Mixed_7b": (1280, ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b",
                            "branch_pool"]),
        "Mixed_7c": (2048, ["branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b",
                            "branch_pool"]),
    }
    for name, (cin, branches) in blocks.items():
        block = getattr(model, name)
        x = torch.randn(1, cin, 5, 5)
        parts, out = _branch_outputs(block, x, branches)
        if name in ("Mixed_6a", "Mixed_7a"):
            parts.append(F.max_pool2d(x, 3, stride=2))
        else:  # the pooled branch, recomputed from the pooled input
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if name == "Mixed_7c" else avg(x)
            with torch.no_grad():
                assert torch.equal(parts[-1], block.branch_pool(pooled)), name
        assert torch.equal(out, torch.cat(parts, 1)), name
    ones = torch.ones(1, 1, 4, 4)  # counting the padding would darken the border to 4/9 and 6/9
    assert torch.equal(avg(ones), ones)


def test_inception_weights_wrapped_in_a_state_dict_key_load(world, tmp_path):
    """A checkpoint {"state_dict": ...} (as some exporters write) loads; a dict holding non-tensors is refused."""
    state = load_fid_inception(world["inception"]).state_dict()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, wrapped)
    assert torch.equal(load_fid_inception(wrapped).fc.bias, state["fc.bias"])
    mixed = tmp_path / "mixed.pth"
    torch.save({"fc.bias": torch.zeros(1008), "epoch": 3}, mixed)
    with pytest.raises(ModelError, match="does not hold a state dict of tensors"):
        load_fid_inception(mixed)


def test_quality_without_feature_weights_says_it_draws_samples_only(capsys):
    """--quality alone writes the grids and no FID/KID: one warning says so, naming the flags that add them."""
    from library.eval.extractors import EXTRACTORS
    from library.eval.quality import warn_without_metric

    none = {entry.weights_option: None for entry in EXTRACTORS.values()}
    warn_without_metric(SimpleNamespace(quality=True, **none))
    err = capsys.readouterr().err
    assert err.startswith("warning: --quality without --") and "--inception_weights" in err and "no Fréchet" in err
    for entry in EXTRACTORS.values():  # any one feature net gives a metric: no warning
        warn_without_metric(SimpleNamespace(quality=True, **{**none, entry.weights_option: "w.pth"}))
    warn_without_metric(SimpleNamespace(quality=False, **none))
    assert capsys.readouterr().err == ""
