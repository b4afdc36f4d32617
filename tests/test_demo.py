"""The README's main job, end to end with a tiny budget: data -> base -> 3 methods + the frontier's best defence ->
evaluate -> report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from library.data.digit_captions import digit_label
from library.data.manifest import CORE_SPLITS, read_manifest
from library.demo.run import (
    DemoSettings,
    fill_latent_caches,
    prepare_data,
    run_demo,
    tiny_train_config,
    train_methods,
)
from library.errors import ConfigError


def test_small_demo_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys, small_demo_settings):
    settings = small_demo_settings(tmp_path / "demo")
    report_md = run_demo(settings)
    report = json.loads((settings.workdir / "eval" / "report.json").read_text())
    models = {row["model"] for row in report["results"]}
    assert models == {"base", "lora", "mp_lora", "smp_lora", settings.defence}  # the frontier's best, trained here
    from library.eval.attacks.registry import DEFAULT_ATTACKS

    assert {row["attack"] for row in report["results"]} == set(DEFAULT_ATTACKS)  # the whole suite
    text = report_md.read_text()
    assert "| smp_lora |" in text and f"| {settings.defence} |" in text and "roc.png" in text
    assert f"one thread each; on {report['machine']['cpu']} ({report['machine']['cores']} cores)" in text
    assert "is the best defence the privacy-utility sweep found" in text  # the default --defence, said so
    for name in ("roc.png", "roc_loglog.png", "scores.csv", "samples_smp_lora.png"):
        assert (settings.workdir / "eval" / name).is_file(), name
    out = capsys.readouterr().out
    assert "| base |" in out and "| model | worst-case attack |" in out  # the tables are printed
    assert "- the base model under the whole suite" in out  # the suite-wide permutation test's verdict

    # The new concept: the base pre-trains on digits 0-4 only, members and non-members are digits 5-9.
    split = read_manifest(settings.workdir / "data" / "split.json", verify=False)
    assert {digit_label(e.caption) for e in split.pretrain} == {0, 1, 2, 3, 4}
    assert {digit_label(e.caption) for e in split.members() + split.nonmembers()} <= {5, 6, 7, 8, 9}
    # Utility that generalises, per model beside the attack rows: conditional accuracy, and U where plain LoRA
    # gained anything over the base (with 2 epochs and 4 samples it may not have).
    utility = report["utility"]
    assert set(utility) == models and report["quality"]["utility_reference"] == "lora"
    assert report["quality"]["reference"] == "nonmembers"
    assert all(0.0 <= utility[m]["conditional_accuracy"] <= 1.0 for m in models)
    gained = utility["lora"]["conditional_accuracy"] != utility["base"]["conditional_accuracy"]
    assert all(("utility_retained" in utility[m]) == gained for m in models)
    assert "## Privacy and utility" in text and "conditional accuracy" in text

    # A second run reuses the data, the base model and the LoRA files (nothing is retrained).
    stamp = (settings.workdir / "base_model" / "model_index.json").stat().st_mtime_ns
    lora_stamp = (settings.workdir / "lora" / "lora.safetensors").stat().st_mtime_ns
    run_demo(settings)
    assert (settings.workdir / "base_model" / "model_index.json").stat().st_mtime_ns == stamp
    assert (settings.workdir / "lora" / "lora.safetensors").stat().st_mtime_ns == lora_stamp

    # The trainings ran in parallel worker processes (3 at once, one thread each); one at a time in this
    # process, also with one thread, gives the very same files: each run is seeded, runs on TRAINING_THREADS
    # whatever the layout, and the shared latent cache was filled before the workers started (it was once
    # flaky: docs/determinism.md, which also records the 5-in-a-row check under CPU load).
    assert settings.jobs == 3 and torch.get_num_threads() == 1  # run_demo restored the tests' thread count
    serial = dataclasses.replace(settings, workdir=tmp_path / "serial", jobs=1, threads=1)
    files = train_methods(serial, settings.workdir / "base_model", settings.workdir / "data" / "split.json")
    for method, path in files.items():
        ours, theirs = load_file(path), load_file(settings.workdir / method / f"{method}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), method


def test_parallel_runs_find_their_shared_latent_cache_filled(tmp_path, small_demo_settings, tiny_model_dir,
                                                               manifest_path):
    """fill_latent_caches encodes every image the runs sharing a cache use, once; a run alone is left alone."""
    settings = small_demo_settings(tmp_path / "demo")
    configs = [tiny_train_config(settings, m, tiny_model_dir, manifest_path, tmp_path / m, m, {})
               for m in ("lora", "smp_lora")]
    cache = tmp_path / "demo" / "latent_cache"
    fill_latent_caches(configs[:1])  # not shared: each run encodes its own, nothing to race on
    assert not cache.exists()
    fill_latent_caches(configs)
    split = read_manifest(manifest_path, verify=False)
    images = {e.sha256 for e in [*split.members(), *split.nonmember_aux, *split.nonmember_test]}
    files = {f: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert len(files) == len(images)
    fill_latent_caches(configs)  # a run started now encodes nothing: every latent is read from the disk
    assert {f: f.stat().st_mtime_ns for f in cache.iterdir()} == files


def test_a_work_dir_keeps_the_split_size_it_was_made_with(tmp_path):
    sizes = dict.fromkeys(CORE_SPLITS, 5)
    manifest = prepare_data(DemoSettings(workdir=tmp_path, split_sizes=sizes, defence=None))
    assert read_manifest(manifest, verify=False).sizes()["member_test"] == 5
    assert prepare_data(DemoSettings(workdir=tmp_path, split_sizes=sizes, defence=None)) == manifest  # reused
    larger = {**sizes, "member_test": 6, "nonmember_test": 6}
    with pytest.raises(ConfigError, match="holds a split of .* give another --workdir"):
        prepare_data(DemoSettings(workdir=tmp_path, split_sizes=larger, defence=None))


def test_retrain_overwrites_the_finished_runs(tmp_path, monkeypatch, small_demo_settings):
    """--retrain retrains the LoRAs: their configs carry --overwrite (the trainer refused every one of them)."""
    import library.demo.run as run

    settings = dataclasses.replace(small_demo_settings(tmp_path / "w"), retrain=True)
    for name in ("lora", "mp_lora", "smp_lora"):
        (settings.workdir / name).mkdir(parents=True)
        (settings.workdir / name / f"{name}.safetensors").write_bytes(b"")
        record = {"config": settings.train_overrides}  # finished with these settings: only --retrain redoes it
        (settings.workdir / name / f"{name}.json").write_text(json.dumps(record))
    trained = []
    monkeypatch.setattr(run, "train_all", lambda configs, jobs: trained.extend(c for _, c in configs))
    train_methods(settings, tmp_path / "base", tmp_path / "split.json")
    assert sorted(c.output_name for c in trained) == sorted(run.demo_runs(settings)) and all(c.overwrite for c in trained)


def test_a_rerun_redoes_the_runs_a_killed_retrain_left_unfinished_or_trained_otherwise(tmp_path, monkeypatch,
                                                                                       small_demo_settings, capsys):
    """After a --retrain killed midway, a plain rerun evaluated an old / new / unfinished mix: a LoRA whose record
    the retrain had removed, and LoRAs of another budget, are trained again now (over the old file)."""
    import json

    import library.demo.run as run

    settings = small_demo_settings(tmp_path / "w")  # max_train_epochs 2
    names = sorted(run.demo_runs(settings))
    for name in names:
        (settings.workdir / name).mkdir(parents=True)
        (settings.workdir / name / f"{name}.safetensors").write_bytes(b"")
        epochs = {"lora": 2, "mp_lora": 20}.get(name, 2)
        (settings.workdir / name / f"{name}.json").write_text(json.dumps({"config": {"max_train_epochs": epochs,
                                                                                     "progress_bar": True}}))
    (settings.workdir / "smp_lora" / "smp_lora.json").unlink()  # the retrain was killed while it trained this one
    trained = []
    monkeypatch.setattr(run, "train_all", lambda configs, jobs: trained.extend(c for _, c in configs))
    train_methods(settings, tmp_path / "base", tmp_path / "split.json")
    redone = sorted(c.output_name for c in trained)
    assert "mp_lora" in redone and "smp_lora" in redone and "lora" not in redone and all(c.overwrite for c in trained)
    assert "mp_lora: trained again, its settings changed since it was trained (max_train_epochs = 20, now 2)" in \
        capsys.readouterr().out


def test_preparing_a_work_dir_is_one_process_at_a_time(tmp_path):
    import threading
    import time

    from library.demo.run import shared_preparation

    order = []

    def second() -> None:
        with shared_preparation(tmp_path):
            order.append("second")

    with shared_preparation(tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)  # the second waits for the first to finish its preparation
        order.append("first done")
    thread.join(timeout=10)
    assert order == ["first done", "second"]


def test_defence_takes_a_lora_run_of_the_sweep(tmp_path):
    """A full fine-tune or DreamBooth run failed after every training (evaluated as a LoRA file / no class folder),
    and early stopping trained a second plain LoRA: refused before any work, naming the frontier command."""
    with pytest.raises(ConfigError, match=r"--defence full_ft-learning_rate5em05: the demo's fifth row is a LoRA "
                                          r"run .*scripts/frontier\.py --only full_ft"):
        DemoSettings(workdir=tmp_path, defence="full_ft-learning_rate5em05")
    for name in ("dreambooth-prior_loss_weight1p0", "early_stopping"):
        with pytest.raises(ConfigError, match="the demo's fifth row is a LoRA run"):
            DemoSettings(workdir=tmp_path, defence=name)
    DemoSettings(workdir=tmp_path, defence="relaxloss-relaxloss_alpha0p09")  # a LoRA run: fine


@pytest.fixture
def few_digits(monkeypatch, digits_dir):
    """prepare_data writes the session's 60 packaged digits (tests/conftest.py), not all 1797: seconds saved."""
    import shutil

    import library.demo.digits as digits

    monkeypatch.setattr(digits, "write_digits_dataset", lambda out, resolution: shutil.copytree(digits_dir, out))


def test_a_new_concept_split_keeps_the_base_digits_apart_and_the_classifier_reads_the_rest(tmp_path, few_digits):
    """The base pre-trains on base_digits only, the membership sets are drawn (with the demo's seed) from the other
    digits, and the digit classifier trains on every image outside the four sets (pretrain and unused alike)."""
    from library.demo.run import classifier_records

    settings = DemoSettings(workdir=tmp_path, split_sizes=dict.fromkeys(CORE_SPLITS, 5), seed=3, defence=None)
    split = read_manifest(prepare_data(settings), verify=False)
    assert split.seed == 3
    assert {digit_label(e.caption) for e in split.pretrain} == {0, 1, 2, 3, 4}
    assert {digit_label(e.caption) for e in split.members() + split.nonmembers()} <= {5, 6, 7, 8, 9}
    assert split.unused  # the new digits' leftovers: read by the classifier too
    records = classifier_records(settings.workdir / "data" / "split.json")
    assert sorted(str(r.path) for r in records) == sorted(
        str(split.abs_path(e)) for e in split.pretrain + split.unused)


def test_the_iid_demo_pre_trains_on_as_many_images_as_asked(tmp_path, few_digits):
    """base_digits None with pretrain_images N: the first edition's i.i.d. base sees N images, not all the rest."""
    settings = DemoSettings(workdir=tmp_path, split_sizes=dict.fromkeys(CORE_SPLITS, 5), base_digits=None,
                            pretrain_images=30, defence=None)
    assert len(read_manifest(prepare_data(settings), verify=False).pretrain) == 30


def test_the_base_model_and_feature_net_are_built_once_with_the_demos_seed_and_threads(tmp_path, monkeypatch,
                                                                                          manifest_path):
    """A work dir's base model and digit classifier are reused, never rebuilt (every number depends on them); the
    first build uses the settings' seed, threads and budget."""
    import library.demo.digit_classifier as digit_classifier
    import library.demo.pretrain as pretrain
    from library.demo.run import prepare_base_model, prepare_feature_net

    calls = []
    monkeypatch.setattr(pretrain, "pretrain_base_model", lambda records, out, **kw: calls.append(("base", kw)))
    monkeypatch.setattr(digit_classifier, "train_digit_feature_net_on_records",
                        lambda records, out_path, **kw: calls.append(("features", kw)))
    monkeypatch.setattr("library.demo.run.pretrain_records", lambda manifest: [])
    settings = DemoSettings(workdir=tmp_path, defence=None, seed=7, threads=2, pretrain_kwargs={"unet_steps": 5},
                            feature_net_kwargs={"epochs": 1})
    base = prepare_base_model(settings, manifest_path)
    net = prepare_feature_net(settings, manifest_path)
    assert [c[0] for c in calls] == ["base", "features"]
    assert {k: calls[0][1][k] for k in ("seed", "threads", "unet_steps")} == {"seed": 7, "threads": 2, "unet_steps": 5}
    assert calls[1][1] == {"seed": 7, "epochs": 1}
    (base / "model_index.json").parent.mkdir(parents=True)
    (base / "model_index.json").write_text("{}")
    net.write_bytes(b"")
    assert prepare_base_model(settings, manifest_path) == base and prepare_feature_net(settings, manifest_path) == net
    assert len(calls) == 2  # cached: nothing rebuilt


def test_parallel_trainings_fill_their_shared_cache_first_and_start_no_idle_worker(monkeypatch):
    """Two or more runs at once must find their shared latent cache filled (else their LoRAs differ in the last
    bits, docs/determinism.md); never more workers than runs, and one run alone is trained in this process."""
    import library.demo.run as run
    import library.workers as workers

    seen = []

    class Pool:
        def __init__(self, jobs, threads):
            seen.append(("pool", jobs, threads))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, items):
            seen.append(("map", [name for name, _ in items]))

    monkeypatch.setattr(workers, "WorkerPool", Pool)
    monkeypatch.setattr(run, "fill_latent_caches", lambda configs: seen.append(("fill", configs)))
    run.train_all([("a", 1), ("b", 2)], 2)
    assert seen == [("fill", [1, 2]), ("pool", 2, run.TRAINING_THREADS), ("map", ["a", "b"])]
    seen.clear()
    run.train_all([("a", 1), ("b", 2)], 5)
    assert seen[1] == ("pool", 2, run.TRAINING_THREADS)
    seen.clear()
    run.train_all([("a", 1)], 3)
    assert seen == [("pool", 1, run.TRAINING_THREADS), ("map", ["a"])]


def test_parallel_trainings_are_quiet_slowest_first_and_a_lone_run_keeps_its_progress_bar(tmp_path, monkeypatch):
    """Runs at once never interleave progress bars (whatever train_overrides say) and start slowest first, all
    ``jobs`` at a time; a single run to do (or jobs 1) trains alone with its bar."""
    import library.demo.run as run

    calls = []
    monkeypatch.setattr(run, "train_all", lambda runs, jobs: calls.append(([c for _, c in runs], jobs)))
    settings = DemoSettings(workdir=tmp_path, defence=None, jobs=3, train_overrides={"progress_bar": True})
    run.train_methods(settings, tmp_path / "base", tmp_path / "split.json")
    configs, jobs = calls[-1]
    assert jobs == 3 and not any(c.progress_bar for c in configs)
    assert [c.output_name for c in configs][-1] == "lora"  # plain LoRA (the cheapest step) fills the gap at the end
    for name in ("mp_lora", "smp_lora"):  # finished: only plain LoRA is left to do
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.safetensors").write_bytes(b"")
        (tmp_path / name / f"{name}.json").write_text('{"config": {"progress_bar": true}}')
    run.train_methods(settings, tmp_path / "base", tmp_path / "split.json")
    configs, jobs = calls[-1]
    assert jobs == 1 and [(c.output_name, c.progress_bar) for c in configs] == [("lora", True)]


def test_an_unreadable_run_record_is_retrained_and_an_equal_list_is_no_change(tmp_path):
    """A record without its config (or not JSON) means the run is redone; a tuple override equal to the record's
    JSON list is the same setting, not a reason to retrain every time."""
    from library.demo.run import unfinished_reason

    final = tmp_path / "x.safetensors"
    final.write_bytes(b"")
    for text in ('{"epochs": []}', "not json", "[1]"):
        final.with_suffix(".json").write_text(text)
        assert unfinished_reason(final, {}) == "its run record is unreadable", text
    final.with_suffix(".json").write_text('{"config": {"attacker_timesteps": [20, 100], "seed": 1}}')
    assert unfinished_reason(final, {"attacker_timesteps": (20, 100), "seed": 1}) is None
    assert "seed = 1, now 2" in unfinished_reason(final, {"seed": 2})


def test_the_frontiers_best_defence_becomes_the_tables_last_row(tmp_path):
    """frontier_rows reads the frontier's best run and its report; no row before the frontier ran or when it found
    none, and a half-written frontier.json is no row either, not a crash of the demo's report."""
    from library.demo.run import frontier_rows

    assert frontier_rows(tmp_path) == []
    (tmp_path / "frontier" / "eval").mkdir(parents=True)
    (tmp_path / "frontier" / "eval" / "report.json").write_text('{"results": []}')
    best = {"model": "smp-privacy_lambda2p0", "curve": "smp", "knob": "privacy_lambda", "value": 2.0}
    (tmp_path / "frontier" / "frontier.json").write_text(json.dumps({"best_defence": best}))
    assert frontier_rows(tmp_path) == [("smp-privacy_lambda2p0 (frontier's best: smp, privacy_lambda = 2.0)",
                                        {"results": []}, "smp-privacy_lambda2p0")]
    (tmp_path / "frontier" / "frontier.json").write_text(json.dumps({"best_defence": {**best, "knob": None}}))
    assert frontier_rows(tmp_path)[0][0] == "smp-privacy_lambda2p0 (frontier's best: smp, )"
    (tmp_path / "frontier" / "frontier.json").write_text(json.dumps({"best_defence": None}))
    assert frontier_rows(tmp_path) == []
    (tmp_path / "frontier" / "frontier.json").write_text('{"best_def')
    assert frontier_rows(tmp_path) == []


def _summary_row(model: str, auc: float) -> dict:
    return {"model": model, "attack": "loss", "label": "loss", "headline": True, "floor": False, "auc": auc,
            "auc_ci": [auc - 0.1, auc + 0.1], "tpr_at_fpr": {"0.01": 0.1}, "asr_oracle": None, "asr_honest": None,
            "auc_deviation": None}


def test_the_demo_report_states_the_split_the_time_the_defence_and_the_frontiers_row(tmp_path, few_digits, capsys):
    """report.md's prose is computed: the base's and the fine-tune's digits, the wall time, the CPU (said unrecorded
    for an older report, not a crash), why the defence row is there, and the frontier's row once it ran."""
    from library.demo.run import summarise

    settings = DemoSettings(workdir=tmp_path, split_sizes=dict.fromkeys(CORE_SPLITS, 5))
    split = read_manifest(prepare_data(settings), verify=False)
    new = ", ".join(str(d) for d in sorted({digit_label(e.caption) for e in split.members()}))
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    report = {"results": [_summary_row("base", 0.55), _summary_row("lora", 0.9)]}
    (eval_dir / "report.json").write_text(json.dumps(report))
    (eval_dir / "report.md").write_text("# Membership-inference evaluation\n")
    text = summarise(settings, eval_dir, {"data": 60.0, "training": 120.0}).read_text()
    assert f"(digits 0, 1, 2, 3, 4); each method fine-tuned on the same 10 member digits (D_tr; digits {new})" in text
    assert "Wall time: 3.0 min (data 60 s, training 120 s)" in text and "on an unrecorded CPU (? cores), torch ?." in text
    assert f"`{settings.defence}` is the best defence the privacy-utility sweep found on this demo" in text
    assert "re-runs the whole sweep on this work dir" in text and "\n## Membership-inference evaluation" in text

    (tmp_path / "frontier" / "eval").mkdir(parents=True)
    (tmp_path / "frontier" / "eval" / "report.json").write_text(json.dumps({"results": [_summary_row("dp-x", 0.6)]}))
    (tmp_path / "frontier" / "frontier.json").write_text(json.dumps(
        {"best_defence": {"model": "dp-x", "curve": "dp", "knob": None}}))
    other = dataclasses.replace(settings, defence="relaxloss-relaxloss_alpha0p09")
    text = summarise(other, eval_dir, {}).read_text()
    assert "`relaxloss-relaxloss_alpha0p09` is a run of the privacy-utility sweep (configs/frontier/demo.toml) chosen" in text
    assert "| dp-x (frontier's best: dp, ) | loss |" in text and "The last row is the best defence" in text
    assert "| lora | loss |" in capsys.readouterr().out  # the tables are printed too
