"""End-to-end tests of evaluate_mia.py on the tiny SD stack (CPU, offline): outputs, paired noise, caching,
an over-fitted LoRA being detected, and one clear error line for each kind of bad input."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from mia_world import SIZES, base_args, write_random_images
from PIL import Image

import evaluate_mia
from library.data.latents import LatentCache
from library.data.manifest import write_manifest
from library.data.splits import make_split
from library.eval.attacks.base import ScoreSet
from library.eval.config import EvalConfig
from library.eval.features import (
    FeatureEngine,
    FeatureSettings,
    Sample,
    feature_cache_key,
    noise_seed,
    paper_timestep,
    plan_queries,
    query_noise,
)
from library.eval.metrics import roc_auc
from library.eval.records import EvalResult, EvalSamples, ModelSpec
from library.eval.report import report_dict, report_markdown, scores_csv
from library.runtime import torch_threads
from library.sd.bundle import vae_fingerprint
from networks.lora import create_network

# The attacks these tests read (the rest of the suite has its own tests: tests/test_attack_*.py).
CORE_ATTACKS = ("--attacks", "paper", "loss", "calibrated")


@pytest.fixture(scope="module")
def world(mia_world):
    return mia_world


@pytest.fixture(scope="module")
def evaluated(world):
    out = world["root"] / "eval"
    rc = evaluate_mia.main(base_args(world, out, *CORE_ATTACKS, "--network_weights", str(world["lora"])))
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


def rows_by(report, model, label):
    return next(r for r in report["results"] if r["model"] == model and r["label"] == label)


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_exist(evaluated):
    out, report = evaluated
    for name in ("report.json", "report.md", "scores.csv", "roc.png", "roc_loglog.png", "hist.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [m["name"] for m in report["models"]] == ["base", "overfit"]
    assert report["manifest"]["sha256"] and report["base_model"]["fingerprint"]
    assert report["models"][1]["lora_sha256"]
    assert report["samples"]["counts"] == SIZES
    md = (out / "report.md").read_text()
    assert "| base | loss avg |" in md and "| overfit | paper h' [honest ckpt] |" in md
    assert f"- model `overfit`: `{report['models'][1]['path']}`" in md  # which file each name is
    labels = {r["label"] for r in report["results"]}
    assert {"paper h' [oracle ckpt]", "paper h' [honest ckpt]", "loss avg", "calibrated avg", "loss t=1"} <= labels
    row = rows_by(report, "overfit", "loss avg")
    assert row["n_members"] == 16 and row["n_nonmembers"] == 16
    # 16 non-members: the smallest non-zero FPR is 1/16 > 5 %, so every TPR@FPR is n/a (None), never a fake 0.
    assert row["tpr_at_fpr"] == {"0.05": None, "0.01": None, "0.001": None}


def test_auc_recomputed_from_scores_csv_matches_report(evaluated):
    out, report = evaluated
    with open(out / "scores.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    test = [r for r in table if r["split"] in ("member_test", "nonmember_test")]
    assert len(table) == sum(SIZES.values()) and len(test) == 32
    labels = np.array([int(r["label"]) for r in test])
    for model, label in [("overfit", "loss avg"), ("overfit", "calibrated avg"), ("base", "loss t=5"),
                         ("overfit", "paper h' [honest ckpt]")]:
        scores = np.array([float(r[f"{model}|{label}"]) for r in test])
        assert roc_auc(labels, scores) == pytest.approx(rows_by(report, model, label)["auc"], abs=1e-12)


def test_calibrated_base_against_itself_is_exactly_zero(evaluated):
    out, report = evaluated
    with open(out / "scores.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    for column in [c for c in table[0] if c.startswith("base|calibrated")]:
        assert all(float(r[column]) == 0.0 for r in table)
    assert rows_by(report, "base", "calibrated avg")["auc"] == 0.5


def tiny_result(**info) -> EvalResult:
    """An evaluation's result without any model: 1 + 2 D_aux and 3 + 1 D_te samples, one attack on two models."""
    splits = ["member_aux", "nonmember_aux", "nonmember_aux", "member_test", "member_test", "member_test",
              "nonmember_test"]
    samples = EvalSamples([Sample(f"/d/{i}.png", "c", "0" * 64) for i in range(7)], [f"{i}.png" for i in range(7)],
                          splits, np.array([int(s.startswith("member")) for s in splits]))
    scores = {"base": [ScoreSet("loss", "avg", np.arange(7.0), "threshold", headline=True)],
              "lora": [ScoreSet("loss", "avg", np.arange(7.0) + 10, "threshold", headline=True)]}
    row = {"model": "lora", "label": "loss avg", "headline": False, "n_members": 3, "n_nonmembers": 1, "auc": 0.5,
           "asr_oracle": 0.5, "asr_honest": 0.5, "auc_deviation": 0.0, "tpr_at_fpr": {}}
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s.json", seed=7)
    models = [ModelSpec("base"), ModelSpec("lora", Path("lora.safetensors"), "b" * 64, {})]
    return EvalResult(config, models, samples, {}, scores, [row],
                      {"base_fingerprint": "f" * 64, "manifest_sha256": "a" * 64, "manifest_seed": 3, **info})


def test_report_fields_and_scores_csv_columns_come_from_their_own_source():
    """report.json's counts, seeds and hashes, scores.csv's labels and columns, and report.md's D_te / D_aux and
    conditioning lines each read their own field (they are equal in the end-to-end world, so cannot tell)."""
    conditioning = {"clip_skip": 2, "max_token_length": 225, "resolution": 64,
                    "source": {"clip_skip": "LoRA metadata", "max_token_length": "flag", "resolution": "default"}}
    result = tiny_result(conditioning=conditioning, utility={"lora": {"loss_member_test": 0.25}}, quality=None)
    report = report_dict(result)
    assert report["samples"] == {"counts": {"member_aux": 1, "nonmember_aux": 2, "member_test": 3,
                                            "nonmember_test": 1}, "n_aux": 3, "n_test": 4}
    assert report["seeds"] == {"noise_attacks_bootstrap": 7, "split": 3}
    assert report["base_model"]["fingerprint"] == "f" * 64 and report["manifest"]["sha256"] == "a" * 64
    assert report["utility"] == {"lora": {"loss_member_test": 0.25}} and report["quality"] is None
    table = list(csv.DictReader(scores_csv(result).splitlines()))
    assert [(r["split"], int(r["label"])) for r in table] == [(s, int(s.startswith("member")))
                                                               for s in result.samples.splits]
    assert [float(r["lora|loss avg"]) for r in table] == [i + 10.0 for i in range(7)]
    assert [float(r["base|loss avg"]) for r in table] == [float(i) for i in range(7)]
    md = report_markdown(result)
    assert "- D_te: 3 members / 1 non-members; attacks fit on D_aux (3 samples)" in md
    assert ("- captions encoded with clip_skip 2 and 225 tokens, images at 64 px (from: LoRA metadata, default, flag)"
            in md)
    assert f"- model `lora`: `lora.safetensors` (sha256 `{'b' * 16}`)" in md and "- model `base`" not in md
    assert "override" not in md


@pytest.mark.parametrize("loglog", [False, True])
def test_each_roc_curve_is_labelled_with_its_own_models_auc(monkeypatch, tmp_path, loglog):
    """roc.png's legend is where a reader compares models: each curve must carry its own model's AUC for its panel,
    not another model's of the same attack."""
    import library.eval.report as report

    result = tiny_result()
    lora_row = result.rows[0]
    result.rows = [{**lora_row, "headline": True, "auc": 0.75}, {**lora_row, "model": "base", "headline": True,
                                                                 "auc": 0.25}]
    legends = []
    monkeypatch.setattr(report, "_save", lambda fig, path: legends.extend(
        [text.get_text() for text in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()))
    report.plot_roc(result, tmp_path / "roc.png", loglog=loglog)
    assert legends == [["base (AUC 0.250)", "lora (AUC 0.750)"]]


def test_report_json_holds_every_result_row_and_the_privacy_audit():
    """report.json is what tables are re-derived from: every row (not only the headline ones) and the audit block."""
    audit = {"lora": {"worst_case_attack": "loss avg", "auc": 0.5}}
    result = tiny_result(privacy_audit=audit)
    report = report_dict(result)
    assert report["results"] == result.rows and report["privacy_audit"] == audit


def test_scores_csv_keeps_every_digit_of_each_score():
    """Any metric must be re-computable from scores.csv exactly, so a score is never rounded on the way out."""
    result = tiny_result()
    result.scores["lora"][0].scores = np.arange(7.0) / 3 + 1e-9
    table = list(csv.DictReader(scores_csv(result).splitlines()))
    assert [float(r["lora|loss avg"]) for r in table] == list(np.arange(7.0) / 3 + 1e-9)


def test_report_md_puts_non_headline_rows_under_the_per_timestep_variants():
    """A per-timestep row must not be read as a headline result (Table 1), nor a headline row be left out of it."""
    result = tiny_result()
    result.rows.append({**result.rows[0], "label": "loss t=5 [head]", "headline": True})
    md = report_markdown(result)
    variants = md.index("## Per-timestep variants")
    assert md.index("| lora | loss t=5 [head] |") < variants < md.index("| lora | loss avg |")


def test_report_md_describes_the_paper_features_it_ran():
    """The features line says which t the paper's attacker drew from (none for multi_t_loss, nothing without it)."""
    result = tiny_result()
    cfg = replace(result.config, paper_features="error_map", paper_min_timestep=10, paper_max_timestep=400,
                  paper_draws=2)
    assert ("; paper h' on `error_map` at t ~ U[10, 400), 2 draw(s) per sample\n"
            in report_markdown(replace(result, config=cfg)))
    multi_t = report_markdown(replace(result, config=replace(cfg, paper_features="multi_t_loss")))
    assert "; paper h' on `multi_t_loss`\n" in multi_t
    assert "paper h' on" not in report_markdown(replace(result, config=replace(cfg, attacks=["loss"])))


def test_report_md_names_each_skipped_check_and_a_strength_below_one():
    """Each override flag has its own line, and a LoRA weakened below strength 1 is said, like one above it."""
    result = tiny_result()
    cfg = replace(result.config, allow_base_mismatch=True, network_multiplier=0.5)
    md = report_markdown(replace(result, config=cfg))
    assert "- **override**: a LoRA trained on another base model may be evaluated (--allow_base_mismatch)" in md
    assert "- **override**: every LoRA applied at strength 0.5 (--network_multiplier)" in md
    assert "other splits" not in md and "caption encoding" not in md


def test_report_md_utility_table_notes_and_a_model_worse_than_the_base():
    """The utility section: one column per metric with its std beside it (a zero is a value, not n/a), the meaning
    of each number present, and a model denoising worse than the base named with its loss and the base's."""
    utility = {"base": {"loss_member_test": 0.5, "loss_member_test_std": 0.0, "loss_nonmember_test_t10": 0.25},
               "lora": {"loss_member_test": 0.0, "loss_nonmember_test_t10": 0.5}}
    md = report_markdown(tiny_result(utility=utility, quality=None))
    assert "| model | loss_member_test | loss_nonmember_test_t10 |\n|---|---:|---:|\n" in md
    assert "| base | 0.5 ± 0 | 0.25 |" in md and "| lora | 0 | 0.5 |" in md
    assert "- **loss_member_test**: mean per-sample denoising loss" in md and "**loss_gap**" not in md
    assert "- **loss_nonmember_test_t10**: loss_nonmember_test at t = 10 only" in md
    assert ("- **`lora` denoises worse than the base model** (by > 10%) at t = 10: 0.5 against 0.25 on held-out"
            in md)
    assert "- no sample-quality metrics: run with --quality" in md


def test_report_md_quality_line_and_real_vs_real_floor_without_stds():
    """With --quality, the sampling settings, the grids and the real-vs-real floor's values (not their stds)."""
    quality = {"num_images": 8, "sampler": "ddim", "steps": 20, "guidance_scale": 7.5, "seed": 4, "n_reference": 16,
               "reference": "member_test", "kid_subset_size": 4, "grids": {"lora": "samples_lora.png"},
               "real_vs_real_floor": {"kid": 0.125, "kid_std": 0.5, "fd": None}}
    md = report_markdown(tiny_result(utility={"lora": {"loss_member_test": 0.25}}, quality=quality))
    assert ("- samples: 8 per model from D_te captions, ddim 20 steps, guidance 7.5, seed 4; compared with the 16 real "
            "`member_test` images; KID subset size 4; grids: `samples_lora.png`") in md
    assert "- no sample-quality metrics" not in md
    assert md.split("- real-vs-real floor ")[1].split("\n")[0].endswith("): kid 0.125")


def test_write_report_removes_an_earlier_runs_plots_and_clear_replaced_its_grids(tmp_path):
    """Files of a replaced run must not sit beside a new report as if they were its own, nor be removed without
    one (a folder that holds no finished report is not an evaluation's)."""
    from library.eval.report import clear_replaced, write_report

    (tmp_path / "samples_old.png").write_bytes(b"a grid")
    clear_replaced(tmp_path)  # no report.json: nothing is replaced
    assert (tmp_path / "samples_old.png").exists()
    (tmp_path / "roc.png").write_bytes(b"an earlier plot")
    result = tiny_result()
    paths = write_report(replace(result, config=replace(result.config, plots=False)), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md", "samples_old.png", "scores.csv"]
    assert set(paths) == {"json", "markdown", "csv"}
    clear_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "scores.csv"]


def test_model_records_say_what_each_model_is():
    """report.json's models entry is how a reader tells a LoRA from a fine-tuned UNet and which weights were used."""
    from library.eval.unet_weights import UNetWeights

    te = UNetWeights(Path("ft"), "diffusers", (Path("ft/unet.safetensors"),), "c" * 64, (Path("ft/te.safetensors"),))
    records = [spec.record() for spec in (
        ModelSpec("base"), ModelSpec("lora", Path("l.safetensors"), "b" * 64, {"ss_network_dim": "4"}),
        ModelSpec("ft", unet=te), ModelSpec("ft_base_te", unet=replace(te, layout="single_file", text_encoder=())))]
    assert [(r["kind"], r["path"], r["sha256"], r["lora_sha256"]) for r in records] == [
        ("base", None, None, None), ("lora", "l.safetensors", "b" * 64, "b" * 64), ("unet", "ft", "c" * 64, None),
        ("unet", "ft", "c" * 64, None)]
    assert [(r["layout"], r["text_encoder"]) for r in records] == [
        (None, None), (None, None), ("diffusers", "own"), ("single_file", "base")]
    assert records[1]["metadata"] == {"ss_network_dim": "4"} and records[1]["lora_path"] == "l.safetensors"


def test_attacks_fit_their_threshold_on_d_aux_and_report_metrics_on_d_te():
    """The honest ASR must apply a threshold fitted without D_te: one fitted on D_te would report a leak as a win."""
    from library.eval.attacks.base import AttackInputs, FeatureSet
    from library.eval.run import AttackJob, attack_model

    samples = tiny_result().samples  # D_aux: member, 2 non-members; D_te: 3 members, 1 non-member
    # D_aux's member has the lowest loss; every D_te loss is above D_aux's, so D_aux's threshold calls no D_te sample
    # a member, while D_te on its own is perfectly separable.
    losses = np.array([1.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).reshape(7, 1, 1)
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s.json", attacks=["loss"], timesteps=[5],
                        n_bootstrap=0)
    job = AttackJob(config, "lora", AttackInputs(FeatureSet(losses, (5,))), samples, torch.device("cpu"))
    score_sets, rows, settings = attack_model(job)
    assert list(settings) == ["loss"] and all(len(s.scores) == 7 for s in score_sets)  # every sample scored
    row = next(r for r in rows if r["label"] == "loss avg")
    assert row["model"] == "lora" and (row["n_members"], row["n_nonmembers"]) == (3, 1)
    assert row["honest_threshold"] > -3.0  # fitted on D_aux: between its member (-1) and non-members (-3, -4)
    assert (row["honest_tpr"], row["honest_fpr"], row["asr_honest"]) == (0.0, 0.0, 0.5)
    assert row["asr_oracle"] == 1.0 and row["auc"] == 1.0


def test_every_model_is_calibrated_against_the_base_models_losses():
    """The calibrated attack subtracts the base's loss of the same sample: a LoRA whose raw losses say nothing but
    whose drop below the base marks its members must be caught, and the base against itself must score 0."""
    from library.eval.features import ModelFeatures
    from library.eval.run import run_attacks
    from library.workers import WorkerPool

    result = tiny_result()
    labels = torch.tensor(result.samples.labels, dtype=torch.float32)
    base = torch.linspace(1.0, 2.0, 7)[torch.randperm(7, generator=torch.Generator().manual_seed(0))]
    losses = {"base": base + labels, "lora": base}  # the LoRA lowers its members' losses by 1, nobody else's
    features = {name: ModelFeatures(name, value.reshape(7, 1, 1), None, None) for name, value in losses.items()}
    config = EvalConfig(pretrained_model_name_or_path="m", split_manifest="s.json", attacks=["calibrated"],
                        timesteps=[5], n_bootstrap=0)
    with WorkerPool(1) as pool:
        scores, rows, settings = run_attacks(config, result.models, result.samples, features, torch.device("cpu"), pool)
    assert list(scores) == ["base", "lora"] and list(settings) == ["calibrated"]
    auc = {r["model"]: r["auc"] for r in rows if r["label"] == "calibrated avg"}
    assert auc == {"base": 0.5, "lora": 1.0}
    assert scores["lora"][0].scores == pytest.approx(result.samples.labels, abs=1e-6)  # -(L_lora - L_base)


def measured_aucs(report: dict) -> dict[tuple[str, str], dict]:
    measured = {(m, a): rows_by(report, m, f"{a} avg") for m in ("base", "overfit") for a in ("loss", "calibrated")}
    print({k: (round(v["auc"], 3), [round(x, 3) for x in v["auc_ci"]]) for k, v in measured.items()})
    return measured


# Thresholds fixed before measuring (AUC > 0.75 with the CI above 0.5). With an attention-only LoRA both attacks
# failed them (150 full-batch steps on the random-init tiny UNet did not memorise: loss AUC 0.70 [0.51, 0.88]);
# with the ResNet convs adapted too (conv_dim, LoCon) the loss attack passes: 0.93-0.94, CI from 0.84.
def test_overfitted_lora_is_detected_by_the_loss_attack_and_base_is_at_chance(evaluated):
    measured = measured_aucs(evaluated[1])
    row = measured[("overfit", "loss")]
    assert row["auc"] > 0.75 and row["auc_ci"][0] > 0.5, (row["auc"], row["auc_ci"])
    lo, hi = measured[("base", "loss")]["auc_ci"]
    assert lo <= 0.5 <= hi


def test_overfitted_lora_is_seen_by_the_calibrated_attack_less_clearly_than_by_the_loss(evaluated):
    # Measured, not tuned: on this random-init base with random-pixel images the LoRA also lowers every image's
    # loss, which the base-model calibration turns into noise (calibrated AUC 0.70 [0.50, 0.88] and 0.78 [0.58,
    # 0.91] in two runs; on the pre-trained demo base it is the strongest attack, AUC 0.97). Was an xfail that
    # could not fail: now what holds in this world, above chance and below the plain loss attack's AUC.
    measured = measured_aucs(evaluated[1])
    row, loss = measured[("overfit", "calibrated")], measured[("overfit", "loss")]
    assert 0.6 < row["auc"] <= loss["auc"], (row["auc"], row["auc_ci"], loss["auc"])


# ---------------------------------------------------------------------------------------------- paired noise, cache


def test_same_noise_for_every_model(world):
    bundle = world["bundle"]
    manifest = world["manifest"]
    entries = manifest.test()[:6]
    samples = [Sample(manifest.abs_path(e), e.caption, e.sha256) for e in entries]
    latents = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many([s.path for s in samples])
    settings = FeatureSettings(timesteps=(5, 50), num_noise_draws=2, seed=3, paper_features="error_map")
    engine = FeatureEngine(bundle, settings, device=torch.device("cpu"), batch_size=5, cache_dir=None,
                           base_fingerprint="x", manifest_sha256="y", progress=False)
    first = engine.compute("base", samples, latents)
    with_lora = engine.compute("lora", samples, latents, world["lora"], "sha")
    second = engine.compute("base", samples, latents)  # after the LoRA was applied and restored
    assert torch.equal(first.losses, second.losses) and torch.equal(first.paper, second.paper)
    assert not torch.equal(first.losses, with_lora.losses)
    assert torch.equal(first.paper_timesteps, with_lora.paper_timesteps)
    # Noise depends on (seed, image, slot, draw) only, not on batching or on the other samples.
    shuffled = engine.compute("base", samples[::-1], latents.flip(0))
    assert torch.equal(shuffled.losses.flip(0), first.losses)
    queries = plan_queries(samples, settings)
    assert queries[0].noise_seed == noise_seed(3, samples[0].sha256, "t5", 0)
    assert torch.equal(query_noise(queries[0], (4, 8, 8)), query_noise(queries[0], (4, 8, 8)))


def test_paper_draws_extend_the_single_draw(world):
    """--paper_draws D: D random-t queries per sample; draw 0 is exactly the single-draw query, the others differ."""
    bundle, manifest = world["bundle"], world["manifest"]
    samples = [Sample(manifest.abs_path(e), e.caption, e.sha256) for e in manifest.test()[:4]]
    latents = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many([s.path for s in samples])

    def paper_features(draws: int):
        settings = FeatureSettings(timesteps=(50,), num_noise_draws=1, seed=3, paper_features="error_map",
                                   paper_draws=draws)
        engine = FeatureEngine(bundle, settings, device=torch.device("cpu"), batch_size=3, cache_dir=None,
                               base_fingerprint="x", manifest_sha256="y", progress=False)
        return engine.compute("base", samples, latents)

    one, three = paper_features(1), paper_features(3)
    assert one.paper.shape == (4, 1, 4 * 8 * 8) and three.paper.shape == (4, 3, 4 * 8 * 8)
    assert torch.equal(three.paper[:, :1], one.paper) and torch.equal(three.paper_timesteps[:, :1], one.paper_timesteps)
    assert not torch.equal(three.paper[:, 1], three.paper[:, 2])
    assert three.losses.shape == one.losses.shape


def test_cached_features_are_those_of_the_kernels_asked_for(world, tmp_path):
    """A UNet pass's last bits depend on the batch size and the thread count (docs/determinism.md): features
    cached by an engine with other ones are not served; the ones computed instead equal an uncached computation."""
    bundle, manifest = world["bundle"], world["manifest"]
    samples = [Sample(manifest.abs_path(e), e.caption, e.sha256) for e in manifest.test()[:6]]
    latents = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many([s.path for s in samples])
    settings = FeatureSettings(timesteps=(5, 50), num_noise_draws=2, seed=3)

    def features(batch_size: int, threads: int = 1, cache_dir: Path | None = tmp_path / "cache"):
        engine = FeatureEngine(bundle, settings, device=torch.device("cpu"), batch_size=batch_size,
                               cache_dir=cache_dir, base_fingerprint="x", manifest_sha256="y", progress=False)
        with torch_threads(threads):
            return engine.compute("base", samples, latents)

    first = features(5)
    other_batch, other_threads = features(3), features(5, threads=2)
    assert not first.cache_hit and not other_batch.cache_hit and not other_threads.cache_hit
    assert len({first.cache_key, other_batch.cache_key, other_threads.cache_key}) == 3
    assert torch.equal(other_batch.losses, features(3, cache_dir=None).losses)
    again = features(5)
    assert again.cache_hit and torch.equal(again.losses, first.losses)


def test_the_cache_key_ignores_paper_settings_that_change_no_feature():
    plain = FeatureSettings(timesteps=(10, 500), num_noise_draws=2, seed=3)
    key = lambda settings: feature_cache_key(settings, "fp", None, "m", 8, kernels="k")  # noqa: E731
    reused = FeatureSettings(timesteps=(10, 500), num_noise_draws=2, seed=3, paper_features="multi_t_loss",
                             paper_min_timestep=100, paper_draws=4)  # h' reads the fixed-t losses: no query of its own
    assert key(reused) == key(plain)  # so adding h' to a finished evaluation finds its losses in the cache
    own = FeatureSettings(timesteps=(10, 500), num_noise_draws=2, seed=3, paper_features="loss")
    assert len({key(plain), key(own), key(replace(own, paper_min_timestep=100)), key(replace(own, paper_draws=4)),
                key(replace(own, paper_features="error_map"))}) == 5


def test_loss_slots_are_timestep_major_with_each_slot_its_own_noise():
    # losses [N, K, M] is read as losses[:, k, m] = the loss at timesteps[k] with noise draw m: the flat slot of a
    # query must be k * M + m, its noise the (image, "t<t>", m) one (a transposed slot would label each loss with
    # another timestep's value).
    settings = FeatureSettings(timesteps=(10, 500, 900), num_noise_draws=2, seed=3)
    samples = [Sample(f"{i}.png", "c", f"{i:064d}") for i in range(2)]
    for q in plan_queries(samples, settings):
        k, m = divmod(q.slot, 2)
        assert q.timestep == settings.timesteps[k]
        assert q.noise_seed == noise_seed(3, samples[q.sample].sha256, f"t{q.timestep}", m)
    assert sorted(q.slot for q in plan_queries(samples[:1], settings)) == list(range(6))


def test_paper_queries_draw_t_below_the_maximum_with_noise_of_their_own():
    # t ~ U{min, ..., max - 1} (timestep 1000 does not exist in SD's 1000-step schedule), and each draw d has its
    # own noise seed (a seed shared by the draws would give --paper_draws D copies of one noise).
    settings = FeatureSettings(timesteps=(50,), num_noise_draws=1, seed=3, paper_features="loss",
                               paper_min_timestep=998, paper_max_timestep=1000, paper_draws=3)
    seen = {paper_timestep(settings, f"{i:064d}", d)[0] for i in range(40) for d in range(3)}
    assert seen == {998, 999}
    for i in range(5):
        seeds = [paper_timestep(settings, f"{i:064d}", d)[1] for d in range(3)]
        assert seeds == [noise_seed(3, f"{i:064d}", "paper", d) for d in range(3)] and len(set(seeds)) == 3


def test_cache_keys_change_with_the_manifest_and_the_probe_keys_with_the_seed():
    # A cached feature or probe output is reused only for the same samples and the same noise: the manifest's
    # sha256 is in the feature key, the noise seed in the probes' model identity (their noise is seeded by it).
    settings = FeatureSettings(timesteps=(10,), num_noise_draws=1, seed=3)

    def key(manifest: str, kernels: str = "k") -> str:
        return feature_cache_key(settings, "fp", None, manifest, 8, kernels=kernels)

    assert key("m1") != key("m2") and key("m1", "other kernels") != key("m1")

    def identity(seed):
        engine = FeatureEngine(None, replace(settings, seed=seed), device=torch.device("cpu"),
                               base_fingerprint="fp", manifest_sha256="m", progress=False)
        return engine.model_identity(None, 8)

    assert identity(3) != identity(4)


def test_second_run_hits_the_feature_cache(world, evaluated):
    out, report = evaluated
    rc = evaluate_mia.main(base_args(world, out, *CORE_ATTACKS, "--network_weights", str(world["lora"]),
                                     "--overwrite"))
    assert rc == 0
    again = json.loads((out / "report.json").read_text())
    assert all(entry["hit"] for entry in again["features"]["cache"].values())
    assert [r["auc"] for r in again["results"]] == [r["auc"] for r in report["results"]]


def test_a_run_without_plots_leaves_no_earlier_plots_beside_its_report(world, evaluated, tmp_path):
    out = tmp_path / "eval"
    args = base_args(world, out, "--attacks", "loss", "--network_weights", str(world["lora"]), "--cache_dir",
                     str(world["root"] / "eval" / "cache"))
    assert evaluate_mia.main(args) == 0 and (out / "roc.png").is_file()
    assert evaluate_mia.main(args + ["--no-plots", "--overwrite"]) == 0
    assert not any((out / name).exists() for name in ("roc.png", "roc_loglog.png", "hist.png"))


def test_report_md_says_which_checks_were_skipped(world, evaluated, tmp_path):
    out = tmp_path / "eval"

    def args(out, multiplier):
        return base_args(world, out, "--attacks", "loss", "--network_weights", str(world["lora"]), "--cache_dir",
                         str(world["root"] / "eval" / "cache"), "--no-plots", "--network_multiplier", multiplier,
                         "--allow_manifest_mismatch")

    assert evaluate_mia.main(args(out, "0.5")) == 0
    text = (out / "report.md").read_text()
    assert "**override**: every LoRA applied at strength 0.5" in text
    assert "**override**: a LoRA trained on other splits may be evaluated" in text
    assert "paper h'" not in text.split("## Main results")[0]  # the paper's attacker did not run
    # The multiplier scales the LoRA only: at another strength, the base's features come from the cache
    assert evaluate_mia.main(args(tmp_path / "x", "0.25")) == 0
    cache = json.loads((tmp_path / "x" / "report.json").read_text())["features"]["cache"]
    assert cache["base"]["hit"] and not cache[world["lora"].stem]["hit"]


def test_two_worker_processes_give_the_serial_report(world, evaluated, tmp_path):
    """--jobs 2: features, attacks and quality samples per model in worker processes, the same numbers."""
    serial_dir, serial = evaluated
    out = tmp_path / "parallel"
    # --no_cache: the workers compute the features themselves instead of reading the serial run's cache.
    rc = evaluate_mia.main(base_args(world, out, *CORE_ATTACKS, "--network_weights", str(world["lora"]), "--jobs", "2",
                                     "--no_cache", "--quality", "--quality_num_images", "2", "--quality_steps", "2"))
    assert rc == 0
    parallel = json.loads((out / "report.json").read_text())
    assert parallel["config"]["jobs"] == 2
    assert not any(entry["hit"] for entry in parallel["features"]["cache"].values())
    assert [(r["model"], r["label"]) for r in parallel["results"]] == [(r["model"], r["label"]) for r in serial["results"]]
    for ours, theirs in zip(parallel["results"], serial["results"]):
        assert ours["auc"] == pytest.approx(theirs["auc"], abs=1e-9), (ours["model"], ours["label"])
    # every per-sample score to the bit: both layouts run each model's job on --threads (1) torch threads
    assert (out / "scores.csv").read_text() == (serial_dir / "scores.csv").read_text()
    assert (out / "samples_overfit.png").is_file() and (out / "samples_base.png").is_file()


def test_full_determinism_changes_no_cpu_bit(world, evaluated, tmp_path, torch_defaults_restored):
    """--full_determinism switches torch's deterministic kernels on (for a GPU; workers: tests/test_workers.py)
    and, on the CPU, which is deterministic already, gives the default run's scores to the bit."""
    serial_dir, _ = evaluated
    out = tmp_path / "strict"
    rc = evaluate_mia.main(base_args(world, out, *CORE_ATTACKS, "--network_weights", str(world["lora"]),
                                     "--no_cache", "--full_determinism"))
    assert rc == 0 and torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert (out / "scores.csv").read_text() == (serial_dir / "scores.csv").read_text()


def test_full_determinism_features_are_cached_apart_from_the_defaults(world, evaluated, tmp_path,
                                                                     torch_defaults_restored):
    """Features computed under --full_determinism (other GPU kernels) are not those of the default kernels: a run
    with it misses the default run's cache, and one without it still hits that cache."""
    import shutil

    serial_dir, report = evaluated
    cache = tmp_path / "cache"
    shutil.copytree(serial_dir / "cache", cache)
    plain_latents = set((cache / "latents").glob("*.safetensors"))
    runs = {}
    for name, extra in (("strict", ["--full_determinism"]), ("strict-again", ["--full_determinism"]), ("plain", [])):
        argv = base_args(world, tmp_path / name, *CORE_ATTACKS, "--network_weights", str(world["lora"]),
                         "--cache_dir", str(cache), *extra)
        assert evaluate_mia.main(argv) == 0
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())["features"]["cache"]
    assert not any(entry["hit"] for entry in runs["strict"].values())
    # its latents too: one more file per image, the default run's left as they were
    assert plain_latents and len(set((cache / "latents").glob("*.safetensors")) - plain_latents) == len(plain_latents)
    assert all(entry["hit"] for entry in runs["strict-again"].values())
    assert runs["plain"] == {name: {**entry, "hit": True} for name, entry in report["features"]["cache"].items()}


def test_latent_mode_sample_attacks_posterior_draws_cached_apart_from_the_means(world, evaluated, tmp_path):
    """--latent_mode sample: every attack reads one seeded posterior draw per image instead of the mean (other
    scores), recorded in the report; its latents and features are cached apart, so the mean run keeps its cache."""
    import shutil

    serial_dir, report = evaluated
    cache = tmp_path / "cache"
    shutil.copytree(serial_dir / "cache", cache)
    mean_latents = set((cache / "latents").glob("*.safetensors"))
    runs = {}
    for name, extra in (("sample", ["--latent_mode", "sample"]), ("again", ["--latent_mode", "sample"]),
                        ("mean", [])):
        argv = base_args(world, tmp_path / name, *CORE_ATTACKS, "--network_weights", str(world["lora"]),
                         "--cache_dir", str(cache), *extra)
        assert evaluate_mia.main(argv) == 0
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())
    sampled = runs["sample"]
    assert sampled["features"]["settings"]["latent_mode"] == "sample"
    assert "posterior draw per image" in (tmp_path / "sample" / "report.md").read_text()
    assert "posterior draw" not in (tmp_path / "mean" / "report.md").read_text()
    assert "latent_mode" not in runs["mean"]["features"]["settings"]  # the default's settings (and keys) as before
    assert not any(entry["hit"] for entry in sampled["features"]["cache"].values())
    assert len(set((cache / "latents").glob("*.safetensors")) - mean_latents) == len(mean_latents)
    assert all(entry["hit"] for entry in runs["again"]["features"]["cache"].values())
    assert (tmp_path / "again" / "scores.csv").read_text() == (tmp_path / "sample" / "scores.csv").read_text()
    assert runs["mean"]["features"]["cache"] == {n: {**e, "hit": True} for n, e in report["features"]["cache"].items()}
    assert (tmp_path / "mean" / "scores.csv").read_text() == (serial_dir / "scores.csv").read_text()
    assert (tmp_path / "sample" / "scores.csv").read_text() != (serial_dir / "scores.csv").read_text()
    # never a training run's draws (an attacker does not know them), not even a run trained with the same seed
    from safetensors.torch import load_file

    from library.data.latents import LatentCache
    from library.sd.bundle import vae_fingerprint

    vae, manifest = world["bundle"].vae, world["manifest"]
    paths = [manifest.abs_path(e) for e in manifest.members()]
    trained = LatentCache(vae, vae_fingerprint(vae), 32, mode="sample", seed=0).get_many(paths)  # eval --seed 0
    drawn = [load_file(f)["latent"] for f in set((cache / "latents").glob("*.safetensors")) - mean_latents]
    assert drawn and not any(torch.allclose(d, t, atol=1e-4) for d in drawn for t in trained)


def test_serial_features_run_on_threads_whatever_the_caller_left(world, tmp_path, monkeypatch):
    """--jobs 1 computes features in this process, on --threads torch threads (the workers' count), not the CLI's;
    so are the latents encoded (a VAE pass on another count gives other last bits, which the features inherit)."""
    import library.eval.run as run
    from library.data.latents import LatentCache

    seen: list[int] = []
    encoded: list[int] = []
    original, original_encode = run.model_features, LatentCache.get_many

    def spy(job, bundle=None):
        seen.append(torch.get_num_threads())
        return original(job, bundle)

    def spy_encode(self, paths, digests=None):
        encoded.append(torch.get_num_threads())
        return original_encode(self, paths, digests)

    monkeypatch.setattr(run, "model_features", spy)
    monkeypatch.setattr(LatentCache, "get_many", spy_encode)
    rc = evaluate_mia.main(base_args(world, tmp_path / "eval", "--attacks", "loss", "--threads", "2", "--no_cache"))
    assert rc == 0 and seen and set(seen) == {2}
    assert encoded and set(encoded) == {2}
    assert torch.get_num_threads() == 1  # the caller's setting (tests/conftest.py), restored


# ---------------------------------------------------------------------------------------------- bad input


def run_error(capsys, argv) -> str:
    """The one ``error:`` line of a refused run (a LoRA without conditioning metadata may add a ``warning:``)."""
    rc = evaluate_mia.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "warning: ")) for line in lines), lines
    return errors[0]


def test_lora_for_another_model_is_refused(world, tmp_path, capsys):
    from safetensors.torch import save_file

    bad = tmp_path / "sd15.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"  # exists in the tiny UNet, but 32 wide, not 320
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4),
               f"{name}.alpha": torch.tensor(4.0)}, str(bad))
    err = run_error(capsys, base_args(world, tmp_path / "out", "--network_weights", str(bad)))
    assert "sd15.safetensors" in err and "another base model" in err


def test_lora_trained_on_another_manifest_is_refused(world, tmp_path, capsys):
    network = create_network(1.0, 2, 1.0, None, None, world["bundle"].unet)
    other = tmp_path / "other.safetensors"
    network.save_weights(other, metadata={"smp_lora.manifest_sha256": "0" * 64})
    err = run_error(capsys, base_args(world, tmp_path / "out", "--network_weights", str(other)))
    assert "another split manifest" in err


def test_lora_trained_on_a_folder_or_continuing_another_splits_lora_is_refused(world, tmp_path, capsys):
    """Membership labels are only valid for weights that never saw a non-member: a LoRA of this project trained on
    a whole folder records no split, and one continuing a LoRA of another split inherits what that one saw."""
    from library.data.manifest import split_sha256

    network = create_network(1.0, 2, 1.0, None, None, world["bundle"].unet)
    folder = tmp_path / "folder.safetensors"
    network.save_weights(folder, metadata={"smp_lora.method": "lora"})
    err = run_error(capsys, base_args(world, tmp_path / "out", "--network_weights", str(folder)))
    assert "folder.safetensors was trained on a whole folder" in err and "--allow_manifest_mismatch" in err
    this_split = split_sha256(world["manifest"])
    continued = tmp_path / "continued.safetensors"
    meta = {"smp_lora.method": "lora", "smp_lora.split_sha256": this_split}
    network.save_weights(continued, metadata={**meta, "smp_lora.parent_split_sha256": f"{'0' * 64},{this_split}"})
    err = run_error(capsys, base_args(world, tmp_path / "out", "--network_weights", str(continued)))
    assert "continued.safetensors continues a LoRA trained on another split (000000000000...)" in err
    network.save_weights(continued, metadata={**meta, "smp_lora.parent_split_sha256": "unrecorded"})
    args = base_args(world, tmp_path / "out", "--network_weights", str(continued), "--attacks", "loss", "--no-plots")
    assert evaluate_mia.main(args) == 0
    assert "continues a LoRA that records no split" in capsys.readouterr().err
    foreign = tmp_path / "foreign.safetensors"  # sd-scripts', or metadata stripped: accepted, but not in silence
    network.save_weights(foreign)
    assert evaluate_mia.main(base_args(world, tmp_path / "dry", "--network_weights", str(foreign), "--dry_run")) == 0
    assert f"LoRA {foreign} records no split (not trained by smp-lora" in capsys.readouterr().err


def test_changed_image_is_refused(world, tmp_path, capsys):
    data = tmp_path / "data"
    records = write_random_images(data, 8, seed=1)
    manifest = make_split(records, sizes={k: 2 for k in SIZES}, seed=0)
    write_manifest(manifest, tmp_path / "split.json")
    Image.new("RGB", (32, 32), "white").save(manifest.abs_path(manifest.member_test[0]))
    args = base_args(world, tmp_path / "out")
    args[args.index("--split_manifest") + 1] = str(tmp_path / "split.json")
    err = run_error(capsys, args)
    assert "has changed since the split was made" in err


def test_empty_split_is_refused(world, tmp_path, capsys):
    records = write_random_images(tmp_path / "data", 6, seed=2)
    manifest = make_split(records, sizes={"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 0},
                          seed=0)
    write_manifest(manifest, tmp_path / "split.json")
    args = base_args(world, tmp_path / "out")
    args[args.index("--split_manifest") + 1] = str(tmp_path / "split.json")
    err = run_error(capsys, args)
    assert "'nonmember_test' is empty" in err


def test_bad_flag_values_are_one_line(world, tmp_path, capsys):
    err = run_error(capsys, base_args(world, tmp_path / "out", "--holdout_fraction", "1.5"))
    assert "holdout_fraction" in err
    err = run_error(capsys, base_args(world, tmp_path / "out", "--timesteps", "1000"))
    assert "timesteps" in err


def test_an_evaluation_reads_each_lora_file_once(world, tmp_path, safetensors_reads):
    """A LoRA's tensors are read once (the layout check keeps them: library.eval.inputs.check_lora_layouts), not
    again by the check against the loaded base and by the feature computation; its header alone is read by the
    split check too."""
    lora = Path(world["lora"])
    args = base_args(world, tmp_path / "eval", "--attacks", "loss", "--network_weights", str(lora), "--no_cache",
                     "--n_bootstrap", "0", "--no-plots")
    assert evaluate_mia.main(args) == 0
    assert safetensors_reads["load_file", lora.name] == 1  # was 3
    assert safetensors_reads["safe_open", lora.name] == 2  # model_specs' header, and the one read of the file
