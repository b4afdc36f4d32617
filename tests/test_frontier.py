"""scripts/frontier.py's pipeline with a reduced sweep: every method's curve, evaluated, tabulated and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from library.demo.frontier import (
    FrontierSettings,
    best_defence,
    run_frontier,
    seed_spread,
    target_check,
)
from library.demo.run import frontier_rows
from library.demo.sweep import read_sweep
from library.errors import ConfigError
from library.eval.summary import privacy_utility_table
from library.train.config_scope import check_for_method

REDUCED_SWEEP = """
[[run]]
method = "lora"
label = "early_stopping"
save_every_n_epochs = 1

[[run]]
method = "smp_lora"
label = "smp_calibrated"
knob = "privacy_lambda"
values = [1.0]
flags = ["--attacker_features", "multi_t_loss", "--attacker_timesteps", "20", "100", "--attacker_noise", "fixed",
         "--attacker_calibration", "base", "--attacker_normalization", "standardize", "--attacker_batch_size", "4"]

[[run]]
method = "relaxloss"
knob = "relaxloss_alpha"
values = [0.08]

[[run]]
method = "dp_lora"
knob = "dp_noise_multiplier"
values = [1.0]
flags = ["--dp_clip_norm", "0.05"]
"""


def test_reduced_sweep_end_to_end(tmp_path, capsys, small_demo_settings):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(REDUCED_SWEEP)
    demo = small_demo_settings(tmp_path / "demo", jobs=2, eval_jobs=2)
    demo.eval_overrides["attacks"] = ["loss", "calibrated"]  # the sweep, not the suite (tests/test_demo.py runs it)
    path = run_frontier(FrontierSettings(demo=demo, sweep=sweep))
    points = json.loads((path.parent / "frontier.json").read_text())["points"]
    by_curve = {}
    for p in points:
        by_curve.setdefault(p["curve"], []).append(p)
    assert set(by_curve) == {"base", "early_stopping", "smp_calibrated", "relaxloss", "dp_lora"}
    assert sorted(p["value"] for p in by_curve["early_stopping"]) == [1, 2]  # checkpoint + final: early stopping
    for p in points:
        assert 0.0 <= p["worst_auc"] <= 1.0 and p["heldout_loss"] > 0 and p["proxy_fd_digits"] is not None
        by_t = p["heldout_loss_by_t"]  # the evaluation's timesteps, their mean the held-out loss
        assert len(by_t) > 1 and sum(by_t.values()) / len(by_t) == pytest.approx(p["heldout_loss"])
        assert p["worst_attack"]
        assert p["epsilon_lb"] is not None and p["epsilon_lb"] >= 0  # the measured lower bound, for every model
        assert (p["dp_epsilon"] is not None) == (p["method"] == "dp_lora")  # the accountant's, for DP-SGD only
        assert 0.0 <= p["conditional_accuracy"] <= 1.0  # the digit classifier's reading of every model's samples
        assert 0.0 < p["suite_p"] <= 1.0  # the suite-wide permutation test of the worst case, for every model
    plain = next(p for p in points if p["model"] == "early_stopping")  # U's unit: the first plain run's final file
    assert plain.get("utility_retained") in (None, 1.0)  # None when it gained nothing over the base (2 epochs)
    best = json.loads((path.parent / "frontier.json").read_text())["best_defence"]
    assert best == best_defence(points) and best["method"] not in ("base", "lora")
    # The demo's table gains that run as its fifth row, read from the frontier's own report.
    (label, report, model), = frontier_rows(demo.workdir)
    assert model == best["model"] and label.startswith(f"{model} (frontier's best: {best['curve']}")
    assert any(line.startswith(f"| {label} |") for line in privacy_utility_table({"results": []}, [(label, report, model)]))
    text = path.read_text()
    assert "## Target (issue 7)" in text and "| dp_lora | dp_noise_multiplier | 1.000 |" in text
    assert (path.parent / "frontier.png").stat().st_size > 0
    assert "Privacy-utility frontier" in capsys.readouterr().out


def test_target_check_reports_hits_misses_and_a_vacuous_budget():
    plain = {"model": "p", "method": "lora", "value": 160, "heldout_loss": 0.10, "proxy_fd_digits": 20.0,
             "worst_auc": 0.9, "worst_attack": "x"}
    good = {"model": "g", "method": "smp_lora", "value": 1.0, "heldout_loss": 0.105, "proxy_fd_digits": 21.0,
            "worst_auc": 0.55, "worst_attack": "calibrated avg"}
    costly = {**good, "model": "c", "heldout_loss": 0.2, "proxy_fd_digits": 40.0}
    lines = target_check([plain, good, costly])
    assert sum("REACHED by `g`" in line for line in lines) == 2  # both utility measures
    miss = target_check([plain, costly])
    assert sum("NOT reached" in line for line in miss) == 2 and not any("REACHED by" in line for line in miss)
    base = {"model": "base", "method": "base", "value": None, "heldout_loss": 0.101, "proxy_fd_digits": 30.0,
            "worst_auc": 0.5, "worst_attack": "x"}
    caveats = [line for line in target_check([base, plain, good]) if "caveat" in line]
    assert len(caveats) == 1 and "held-out loss" in caveats[0]  # the base is within the loss budget, not the FD one
    # Issue 16's target on U (no U in the points: no line).
    kept, lost = {**good, "utility_retained": 0.95}, {**good, "model": "l", "utility_retained": 0.4}
    assert any("REACHED by `g`: worst-case AUC 0.550, U 0.95" in line for line in target_check([plain, kept, lost]))
    assert any("NOT reached. Highest U at AUC <= 0.6: `l`, U 0.40" in line for line in target_check([plain, lost]))
    assert not any("utility retained" in line for line in target_check([plain, good]))
    # Beside it: the defences with no detectable signal in the suite (suite-wide p >= 0.05), most U first.
    quiet, loud = {**kept, "model": "q", "worst_auc": 0.63, "suite_p": 0.2}, {**lost, "suite_p": 0.001}
    lines = target_check([plain, loud, quiet, {**quiet, "model": "r", "utility_retained": 0.5, "suite_p": 0.07}])
    start = lines.index("- **no detectable signal** (suite-wide permutation p >= 0.05), by U:")
    assert lines[start + 1:] == ["  - `q`: p 0.2, worst-case AUC 0.630, U 0.95", "  - `r`: p 0.07, worst-case AUC 0.630, U 0.50"]
    assert target_check([plain, loud])[-1] == "  - none. Highest p: `l`, p 0.001 (AUC 0.550, U 0.40)."


def test_best_defence_keeps_the_utility_then_the_target_then_no_signal_then_the_lowest_auc():
    point = {"method": "smp_lora", "worst_auc": 0.58, "utility_retained": 0.95}
    points = [{"model": "base", "method": "base", "worst_auc": 0.50, "utility_retained": 0.0, "suite_p": 0.6},
              {"model": "plain", "method": "lora", "worst_auc": 0.55, "utility_retained": 1.0, "suite_p": 0.3},
              {**point, "model": "a"}, {**point, "model": "b", "worst_auc": 0.60, "utility_retained": 0.97},
              {**point, "model": "c", "worst_auc": 0.66, "utility_retained": 0.99, "suite_p": 0.08},
              {**point, "model": "d", "worst_auc": 0.64, "utility_retained": 0.92, "suite_p": 0.01},
              {**point, "model": "dp", "worst_auc": 0.52, "utility_retained": 0.02, "suite_p": 0.7}]
    # the target reached: the most U at AUC <= 0.60 (never the base nor plain LoRA, even when they score better)
    assert best_defence(points)["model"] == "b"
    # none at the target: the most U with no detectable signal, before a lower AUC that the suite still detects
    rest = [p for p in points if p["model"] not in ("a", "b")]
    assert best_defence(rest)["model"] == "c"
    # none silent: the lowest AUC of those keeping U >= 0.9, never the one that learnt nothing
    assert best_defence([p for p in rest if p["model"] != "c"])["model"] == "d"
    # none keeps the utility: the lowest AUC of all
    assert best_defence([p for p in rest if p["model"] not in ("c", "d")])["model"] == "dp"
    assert best_defence(points[:2]) is None


def test_seed_spread_summarises_the_seed_curves_only():
    point = {"method": "smp_lora", "curve": "smp", "knob": "seed", "suite_p": 0.01, "conditional_accuracy": 0.5}
    points = [{"model": "base", "method": "base", "curve": "base", "knob": None, "worst_auc": 0.55},
              {**point, "value": 1337, "worst_auc": 0.70, "utility_retained": 0.90},
              {**point, "value": 1, "worst_auc": 0.60, "utility_retained": 0.60, "suite_p": 0.2},
              {**point, "value": 2, "worst_auc": 0.65, "utility_retained": None},
              {**point, "curve": "other", "knob": "privacy_lambda", "value": 2.0, "worst_auc": 0.99}]
    lines = seed_spread(points)
    assert lines[0] == "## Across training seeds"
    rows = [line for line in lines if line.startswith("| smp |")]
    assert rows == ["| smp | 1337, 1, 2 | 0.650 [0.600, 0.700] | 0.75 [0.60, 0.90] | 0.500 [0.500, 0.500] | [0.01, 0.2] |"]
    assert not any(line.startswith(("| other", "| base")) for line in lines)
    assert seed_spread([p for p in points if p.get("knob") != "seed"]) == []


@pytest.mark.parametrize("text, message", [
    ("[[run]]\nmethod = 'lora'\nlamda = 1\n", "unknown key"),
    ("[[run]]\nmethod = 'plain'\n", "'method' must be one of"),
    ("[[run]]\nmethod = 'lora'\n[[run]]\nmethod = 'lora'\n", "both named 'lora'"),
    ("title = 'x'\n", r"expected only \[\[run\]\] tables"),
    ("[[run]]\nmethod = 'lora'\nflags = ['--lamda', '1']\n", "run 1: unrecognized arguments: --lamda 1"),
    # the knob and its values, read as training reads them: caught before any preparation, not after it
    ("[[run]]\nmethod = 'smp_lora'\nknob = 'privacy_lamda'\nvalues = [1.0]\n",
     r"run 1 \(smp_lora\): .*privacy_lamda"),
    ("[[run]]\nmethod = 'lora'\nknob = 'learning_rate'\nvalues = ['fast']\n", r"run 1 \(lora\): .*learning_rate"),
    ("[[run]]\nmethod = 'lora'\nknob = 'seed'\nvalues = '12'\n", "'values' must be a list"),  # was two runs, 1 and 2
    ("[[run]]\nmethod = 'lora'\nknob = 'seed'\nvalues = ['12']\n", r"'seed' must be an integer, got '12'"),
    ("[[run]]\nmethod = 'lora'\nknob = 'seed'\nvalues = 3\n", "'values' must be a list"),  # was a traceback
    ("[[run]]\nmethod = 'lora'\nknob = 'seed'\nvalues = []\n", "'values' must be a list"),  # no run, silently
    ("[[run]]\nmethod = 'lora'\n[[runs]]\nmethod = 'smp_lora'\n", r"expected only \[\[run\]\] tables"),  # a typo
    ("run = []\n", r"expected only \[\[run\]\] tables"),  # an empty frontier
    ("[[run]]\nmethod = 'lora'\nknob = 'seed'\nvalue = [3]\n", r"unknown key\(s\) \['value'\]"),  # not 'values'
    ("[[run]]\nmethod = 'lora\n", r"sweep file .*bad\.toml: "),  # not TOML: one line, not a traceback
])
def test_bad_sweep_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_sweep(path)


def test_a_run_without_values_is_one_epochs_point_named_by_its_label(tmp_path):
    """An entry without values (plain LoRA saving checkpoints) is one run named by its label, its knob "epochs": the
    knob column of frontier.md and the name its folder and --defence use."""
    path = tmp_path / "sweep.toml"
    path.write_text("[[run]]\nmethod = 'lora'\nlabel = 'es'\nsave_every_n_epochs = 40\n")
    (run,) = read_sweep(path)
    assert (run.name, run.label, run.knob, run.value, run.save_every_n_epochs) == ("es", "es", "epochs", None, 40)


def test_every_value_of_a_run_keeps_its_checkpoint_interval(tmp_path):
    """save_every_n_epochs beside values checkpoints each value's run (each its own early-stopping points)."""
    path = tmp_path / "sweep.toml"
    path.write_text("[[run]]\nmethod = 'smp_lora'\nknob = 'privacy_lambda'\nvalues = [1.0, 2.0]\nsave_every_n_epochs = 5\n")
    assert [(r.name, r.save_every_n_epochs) for r in read_sweep(path)] == [
        ("smp_lora-privacy_lambda1p0", 5), ("smp_lora-privacy_lambda2p0", 5)]


def test_sweep_values_are_typed_as_a_toml_file_types_them(tmp_path):
    """A true/false knob works (it was refused as a command-line value), and a value the config converts is stored
    converted, so a finished run's record matches it (resolution '32,32' made the run retrain on every call)."""
    path = tmp_path / "sweep.toml"
    path.write_text("[[run]]\nmethod = 'lora'\nlabel = 'a'\nknob = 'g_attacker_dropout'\nvalues = [true, false]\n"
                    "[[run]]\nmethod = 'lora'\nlabel = 'b'\nknob = 'resolution'\nvalues = ['32,32']\n"
                    "[[run]]\nmethod = 'lora'\nlabel = 'c'\nknob = 'privacy_lambda'\nvalues = [2]\n")
    runs = read_sweep(path)
    assert [r.overrides for r in runs] == [{"g_attacker_dropout": True}, {"g_attacker_dropout": False},
                                           {"resolution": 32}, {"privacy_lambda": 2.0}]


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs" / "frontier").glob("*.toml")))
def test_shipped_sweep_parses_into_valid_training_configs(tmp_path, name):
    """configs/frontier/*.toml: every run's flags are real training flags for its method (no training)."""
    from library.demo.frontier import train_config
    from library.demo.run import REPO_ROOT

    settings = FrontierSettings(sweep=REPO_ROOT / "configs" / "frontier" / name)
    runs = read_sweep(settings.sweep)
    if name == "demo.toml":
        assert {r.label for r in runs} >= {"early_stopping", "smp_calibrated", "relaxloss", "dp_sgd"}
    for run in runs:
        config = train_config(settings, run, tmp_path / "base", tmp_path / "split.json")
        check_for_method(config, run.method)
        assert config.output_name == run.name and not config.progress_bar
        if run.value is not None:
            assert getattr(config, run.knob) == run.value
        if run.label == "smp_calibrated":  # fresh noise: a fixed-draw proxy is fooled on its draws (docs/results.md §6)
            assert config.attacker_noise == "fresh" and config.attacker_calibration == "base"
        assert config.latent_mode == ("sample" if run.label.endswith("_sample") else "mean")


def test_a_retrained_run_shows_its_own_checkpoints_and_a_cut_off_run_is_redone(tmp_path, monkeypatch, capsys):
    """Epoch checkpoints are <name>-NNNNNN.safetensors only (an MP/SMP run's -attacker files were read as epochs);
    retraining removes an earlier training's checkpoints; a final file without its run record (killed between the
    two) is trained again, over the old file."""
    import library.demo.frontier as frontier
    from library.demo.run import DemoSettings
    from library.errors import DataError

    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[run]]\nmethod = "smp_lora"\nlabel = "es"\nsave_every_n_epochs = 1\n')
    (run,) = read_sweep(sweep)
    folder = tmp_path / "frontier" / "runs" / run.name
    folder.mkdir(parents=True)
    for name in ("-000001", "-000001-attacker", "-000002", "", "-attacker"):
        (folder / f"{run.name}{name}.safetensors").write_bytes(b"")
    assert frontier.checkpoints(folder, run.name) == [(folder / f"{run.name}-000001.safetensors", 1),
                                                      (folder / f"{run.name}-000002.safetensors", 2)]
    trained = []
    monkeypatch.setattr(frontier, "train_all", lambda configs, jobs: trained.extend(c for _, c in configs))
    settings = FrontierSettings(demo=DemoSettings(workdir=tmp_path), sweep=sweep, out_dir=tmp_path / "frontier")
    with pytest.raises(DataError, match=r"es\.json: the run record"):
        frontier.run_files(settings, run)
    frontier.train_sweep(settings, [run], tmp_path / "base", tmp_path / "split.json")  # no record: redone
    assert [c.output_name for c in trained] == [run.name] and trained[0].overwrite
    assert frontier.checkpoints(folder, run.name) == [] and not (folder / f"{run.name}-000001-attacker.safetensors").exists()
    (folder / f"{run.name}.json").write_text('{"config": {"seed": 1337}, "epochs": [{"epoch": 2}]}')
    trained.clear()
    frontier.train_sweep(settings, [run], tmp_path / "base", tmp_path / "split.json")
    assert trained == []  # finished: kept
    # its sweep entry changed since (results §12's "the same entry plus --seed 1338"): trained again, and said
    sweep.write_text('[[run]]\nmethod = "smp_lora"\nlabel = "es"\nsave_every_n_epochs = 1\nflags = ["--seed", "1338"]\n')
    (changed,) = read_sweep(sweep)
    assert changed.name == run.name
    frontier.train_sweep(settings, [changed], tmp_path / "base", tmp_path / "split.json")
    assert [c.seed for c in trained] == [1338]
    assert "es: trained again, its settings changed since it was trained (seed = 1337, now 1338)" in \
        capsys.readouterr().out


def test_only_trains_its_curves_and_the_frontier_keeps_every_finished_run(tmp_path, monkeypatch, capsys):
    """--only after the whole frontier replaced frontier.md/json with that curve alone (and no plain-LoRA U)."""
    import contextlib

    import library.demo.frontier as frontier
    from library.demo.run import DemoSettings

    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[run]]\nmethod = "lora"\nlabel = "plain"\n\n[[run]]\nmethod = "smp_lora"\nlabel = "smp"\n'
                     'knob = "privacy_lambda"\nvalues = [1.0]\n')  # --only takes the label, not the run's name
    plain, smp = read_sweep(sweep)
    settings = FrontierSettings(demo=DemoSettings(workdir=tmp_path), sweep=sweep, out_dir=tmp_path / "frontier",
                                runs_filter=["smp"])
    folder = settings.run_folder(plain)
    folder.mkdir(parents=True)
    (folder / f"{plain.name}.safetensors").write_bytes(b"")
    (folder / f"{plain.name}.json").write_text('{"config": {}}')  # the earlier full frontier's plain run: finished
    trained, evaluated = [], []
    monkeypatch.setattr(frontier, "shared_preparation", lambda workdir: contextlib.nullcontext())
    for name in ("prepare_data", "prepare_base_model", "prepare_feature_net"):
        monkeypatch.setattr(frontier, name, lambda *args: tmp_path / "x")
    monkeypatch.setattr(frontier, "train_sweep", lambda s, runs, *a: trained.extend(r.name for r in runs))
    monkeypatch.setattr(frontier, "evaluate_sweep", lambda s, files, *a: evaluated.append((files, a[-1])) or {})
    monkeypatch.setattr(frontier, "frontier_points", lambda *a: [])
    monkeypatch.setattr(frontier, "write_outputs", lambda *a: tmp_path / "frontier.md")
    (tmp_path / "frontier.md").write_text("")
    frontier.run_frontier(settings)
    assert trained == [smp.name]  # only its curve trains ...
    files, reference = evaluated[0]
    assert [f.stem for f in files] == [plain.name, smp.name] and reference == plain.name  # ... the table keeps all
    with pytest.raises(ConfigError, match=r"--only \['smp_lora-x'\]: no such curve in .*; its curves: plain, smp "
                                          r"\(--only takes curves"):
        frontier.run_frontier(FrontierSettings(demo=settings.demo, sweep=sweep, runs_filter=["smp_lora-x"]))


def test_target_check_edges_the_reference_and_what_counts_as_a_run():
    """AUC exactly 0.60 and a measure exactly at the budget reach the target ("<="); the reference is the LAST
    plain-LoRA point (the highest epoch); the base model is never a hit; "closest" is the lowest AUC within budget."""
    from library.demo.frontier import TARGET_LOSS_RATIO

    early = {"model": "p-000001", "method": "lora", "value": 1, "heldout_loss": 0.5, "worst_auc": 0.8, "worst_attack": "x"}
    last = {**early, "model": "p", "value": 2, "heldout_loss": 0.2}
    edge = {"model": "e", "method": "smp_lora", "value": 1.0, "heldout_loss": 0.2 * TARGET_LOSS_RATIO,
            "worst_auc": 0.60, "worst_attack": "x"}
    lines = target_check([early, last, edge])
    assert "- **held-out loss** budget <= 0.22 (plain LoRA `p`: 0.2, + 10 %)" in lines
    assert "  - REACHED by `e`: worst-case AUC 0.600, held-out loss 0.22" in lines
    base = {"model": "base", "method": "base", "value": None, "heldout_loss": 0.2 * TARGET_LOSS_RATIO,
            "worst_auc": 0.5, "worst_attack": "x"}
    assert any("caveat: the base model, with no adaptation at all, is within it (0.22)" in line
               for line in target_check([base, last]))  # exactly at the budget is within it
    near = {**edge, "model": "near", "heldout_loss": 0.21, "worst_auc": 0.65, "worst_attack": "clid"}
    far = {**edge, "model": "far", "heldout_loss": 0.21, "worst_auc": 0.75}
    costly = {**edge, "model": "costly", "heldout_loss": 0.3, "worst_auc": 0.61}  # lower AUC, but over budget
    miss = target_check([base, last, far, near, costly])
    assert not any("REACHED" in line for line in miss)  # the base's 0.5 within budget is no hit
    assert ("  - NOT reached: no run has worst-case AUC <= 0.60 within this budget. Closest within budget: `near` "
            "at AUC 0.650 (clid).") in miss


def test_retained_and_chance_checks_edges_and_never_plain_lora():
    """U exactly 0.9 at AUC exactly 0.60 reaches issue 16's target; p exactly 0.05 is "no detectable signal"; plain
    LoRA (U 1 by definition) is no defence; "highest U" and "highest p" are the maxima."""
    plain = {"model": "plain", "method": "lora", "value": 2, "worst_auc": 0.55, "worst_attack": "x",
             "utility_retained": 1.0, "suite_p": 0.5}
    edge = {"model": "e", "method": "smp_lora", "value": 1.0, "worst_auc": 0.60, "worst_attack": "x",
            "utility_retained": 0.9, "suite_p": 0.05}
    lines = target_check([plain, edge])
    assert "  - REACHED by `e`: worst-case AUC 0.600, U 0.90" in lines and not any("`plain`" in line for line in lines)
    low, high = {**edge, "model": "low", "utility_retained": 0.3}, {**edge, "model": "high", "utility_retained": 0.6}
    lines = target_check([plain, low, high])
    assert "  - NOT reached. Highest U at AUC <= 0.6: `high`, U 0.60 (AUC 0.600)." in lines
    assert lines[-2:] == ["  - `high`: p 0.05, worst-case AUC 0.600, U 0.60",
                          "  - `low`: p 0.05, worst-case AUC 0.600, U 0.30"]
    loud = [{**low, "suite_p": 0.01, "worst_auc": 0.7}, {**high, "suite_p": 0.002, "worst_auc": 0.7}]
    assert target_check([plain, *loud])[-1] == "  - none. Highest p: `low`, p 0.01 (AUC 0.700, U 0.30)."
    assert "  - NOT reached. No defence reaches AUC <= 0.6." in target_check([plain, *loud])


def test_best_defence_edges_and_missing_numbers():
    """U exactly 0.9 keeps the utility and p exactly 0.05 is no signal (the docstring's ">="); a run without U or
    without a suite-wide p is not counted as keeping the utility / as silent; the fallbacks take the LOWEST AUC."""
    run = {"method": "smp_lora", "worst_auc": 0.7, "utility_retained": 0.9, "suite_p": 0.01}
    edge = {**run, "model": "edge", "worst_auc": 0.6}
    assert best_defence([edge, {**run, "model": "x", "worst_auc": 0.5, "utility_retained": 0.89}])["model"] == "edge"
    silent = {**run, "model": "silent", "suite_p": 0.05}
    loud = {**run, "model": "loud", "utility_retained": 0.95, "worst_auc": 0.65}
    assert best_defence([silent, loud])["model"] == "silent"
    untested = {**run, "model": "untested", "suite_p": None, "utility_retained": 0.99}
    assert best_defence([untested, {**run, "model": "lower", "worst_auc": 0.65}])["model"] == "lower"
    no_u = {**run, "model": "no_u", "utility_retained": None, "worst_auc": 0.5, "suite_p": 0.9}
    assert best_defence([no_u, {**run, "model": "kept", "utility_retained": 0.95}])["model"] == "kept"
    useless = [{**run, "model": m, "utility_retained": 0.1, "worst_auc": a} for m, a in (("hi", 0.8), ("lo", 0.55))]
    assert best_defence(useless)["model"] == "lo"
    assert best_defence([{**run, "model": "k1", "worst_auc": 0.8}, {**run, "model": "k2"}])["model"] == "k2"


def test_seed_spread_is_the_mean_not_the_median():
    point = {"method": "smp_lora", "curve": "smp", "knob": "seed", "suite_p": 0.01, "conditional_accuracy": 0.5}
    rows = [{**point, "value": s, "worst_auc": a, "utility_retained": u}
            for s, a, u in ((1, 0.60, 0.1), (2, 0.61, 0.2), (3, 0.92, 0.9))]
    (row,) = [line for line in seed_spread(rows) if line.startswith("| smp |")]
    assert "| 0.710 [0.600, 0.920] | 0.40 [0.10, 0.90] |" in row


def _frontier_report() -> dict:
    def row(model, attack, auc, tpr):
        return {"model": model, "attack": attack, "label": attack, "headline": True, "floor": False, "auc": auc,
                "auc_ci": [auc - 0.1, auc + 0.05], "tpr_at_fpr": tpr}

    return {"models": [{"name": "base", "path": None}, {"name": "es-000001", "path": "/r/es/es-000001.safetensors"}],
            "results": [row("base", "loss", 0.55, {"0.01": 0.0, "0.05": 0.06}),
                        row("es-000001", "loss", 0.8, {"0.01": 0.2, "0.05": 0.4}),
                        row("es-000001", "clid", 0.7, {"0.01": 0.3, "0.05": 0.35})],
            "utility": {"es-000001": {"loss_nonmember_test": 0.12, "loss_member_test": 0.08, "loss_nonmember_test_t100": 0.12,
                                      "proxy_fd_digits": 21.5, "conditional_accuracy": 0.7, "utility_retained": 0.8}},
            "privacy_audit": {"es-000001": {"epsilon_lb": {"honest": 1.25, "oracle": 2.5},
                                            "worst_case_null": {"p_value": 0.03}, "dp_epsilon": {"epsilon": 8.0}}},
            "samples": {"counts": {"member_test": 50, "nonmember_test": 50}}}


def test_frontier_points_and_table_rows_read_the_documented_numbers(tmp_path, monkeypatch):
    """Each point's columns come from the right report keys (held-out loss = non-members' loss, TPR@1% at FPR 0.01,
    the honest epsilon lower bound, U), its curve and knob value from the sweep run of its file; the table prints
    each in its column."""
    import library.demo.frontier as frontier
    from library.demo.sweep import SweepRun

    run = SweepRun(name="es", method="lora", label="early_stopping", knob="epoch", value=None, overrides={},
                   save_every_n_epochs=1)
    base, es = frontier.frontier_points(_frontier_report(), [run], {"es-000001": (run, 1)})
    assert (base["curve"], base["method"], base["value"]) == ("base", "base", None)
    assert {k: es[k] for k in ("curve", "method", "knob", "value", "worst_auc", "worst_attack")} == {
        "curve": "early_stopping", "method": "lora", "knob": "epoch", "value": 1, "worst_auc": 0.8, "worst_attack": "loss"}
    assert (es["worst_tpr_at_1pct_fpr"], es["worst_tpr_at_5pct_fpr"]) == (0.3, 0.4)  # maxima over the attacks
    assert (es["heldout_loss"], es["member_loss"], es["heldout_loss_by_t"]) == (0.12, 0.08, {"100": 0.12})
    assert (es["conditional_accuracy"], es["utility_retained"], es["proxy_fd_digits"]) == (0.7, 0.8, 21.5)
    assert (es["epsilon_lb"], es["suite_p"], es["dp_epsilon"]) == (1.25, 0.03, 8.0)
    monkeypatch.setattr(frontier, "plot_frontier", lambda points, path: None)
    settings = FrontierSettings(sweep=tmp_path / "demo.toml", out_dir=tmp_path)
    text = frontier.write_outputs(settings, [base, es], _frontier_report()).read_text()
    assert ("| early_stopping | epoch | 1 | 0.800 [0.700, 0.850] | loss | 0.03 | 0.400 | 0.300 | 1.25 | 8.0 | 0.1200 | "
            "0.0800 | 21.50 | 0.700 | 0.80 |") in text.splitlines()


def test_a_checkpointed_runs_final_file_carries_its_last_epoch(tmp_path):
    from library.demo.frontier import run_files
    from library.demo.run import DemoSettings
    from library.demo.sweep import SweepRun

    run = SweepRun(name="es", method="lora", label="es", knob="epoch", value=None, overrides={}, save_every_n_epochs=1)
    settings = FrontierSettings(demo=DemoSettings(workdir=tmp_path), out_dir=tmp_path)
    folder = settings.run_folder(run)
    folder.mkdir(parents=True)
    (folder / "es-000001.safetensors").write_bytes(b"")
    (folder / "es.json").write_text('{"epochs": [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]}')
    assert run_files(settings, run) == [(folder / "es-000001.safetensors", 1), (folder / "es.safetensors", 3)]


def test_a_dreambooth_run_keeps_its_own_class_folder_and_the_others_share_one(tmp_path):
    """Prior-preservation runs share <frontier>/class_images (generated once), unless their flags name a folder."""
    from library.demo.frontier import train_config

    sweep = tmp_path / "sweep.toml"
    flags = '["--train_mode", "full", "--with_prior_preservation", "--class_prompt", "a digit"'
    sweep.write_text(f'[[run]]\nmethod = "lora"\nlabel = "shared"\nflags = {flags}]\n\n'
                     f'[[run]]\nmethod = "lora"\nlabel = "own"\nflags = {flags}, "--class_data_dir", "/data/cls"]\n')
    settings = FrontierSettings(sweep=sweep, out_dir=tmp_path / "frontier")
    shared, own = (train_config(settings, run, tmp_path / "base", tmp_path / "split.json") for run in read_sweep(sweep))
    assert shared.class_data_dir == str(tmp_path / "frontier" / "class_images") and own.class_data_dir == "/data/cls"


def _sweep_with_two_finished_runs(tmp_path):
    """A sweep of plain LoRA (checkpointed) and SMP-LoRA, both finished, plain LoRA with its checkpoints."""
    from library.demo.run import DemoSettings

    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[[run]]\nmethod = "lora"\nlabel = "es"\nsave_every_n_epochs = 1\n\n'
                     '[[run]]\nmethod = "smp_lora"\nlabel = "smp"\n')
    runs = read_sweep(sweep)
    settings = FrontierSettings(demo=DemoSettings(workdir=tmp_path, defence=None, jobs=3), sweep=sweep,
                                out_dir=tmp_path / "frontier")
    for run in runs:
        folder = settings.run_folder(run)
        folder.mkdir(parents=True)
        for name in (run.name, f"{run.name}-000001"):
            (folder / f"{name}.safetensors").write_bytes(b"")
        (folder / f"{run.name}.json").write_text('{"config": {}}')
    return settings, runs


def test_retrain_redoes_every_run_slowest_first_and_a_kept_run_keeps_its_checkpoints(tmp_path, monkeypatch):
    """--retrain trains every run again (its old checkpoints removed), slowest method first, never more at once than
    there are runs; without it a finished run's checkpoints (its early-stopping points) are never deleted."""
    import dataclasses

    import library.demo.frontier as frontier

    calls = []
    monkeypatch.setattr(frontier, "train_all", lambda runs, jobs: calls.append(([c.output_name for _, c in runs], jobs)))
    settings, (es, smp) = _sweep_with_two_finished_runs(tmp_path)
    (settings.run_folder(smp) / f"{smp.name}.json").unlink()  # smp cut off before its record: redone
    frontier.train_sweep(settings, [es, smp], tmp_path / "base", tmp_path / "split.json")
    assert calls[-1] == (["smp"], 1)
    assert frontier.checkpoints(settings.run_folder(es), "es") == [(settings.run_folder(es) / "es-000001.safetensors", 1)]
    retrain = dataclasses.replace(settings, demo=dataclasses.replace(settings.demo, retrain=True))
    frontier.train_sweep(retrain, [es, smp], tmp_path / "base", tmp_path / "split.json")
    assert calls[-1] == (["smp", "es"], 2)
    assert frontier.checkpoints(settings.run_folder(es), "es") == []


def test_the_sweep_evaluation_attacks_loras_and_full_fine_tunes_in_the_frontiers_folder(tmp_path, monkeypatch):
    """A file with a ``<stem>-unet`` folder is a full fine-tune (evaluated as UNet weights), the rest are LoRAs; U counts
    in the given reference's units; the report goes to <frontier>/eval, never over the demo's own eval."""
    import library.demo.frontier as frontier
    import library.eval.run as eval_run
    from library.demo.run import DemoSettings

    configs = []

    def evaluate(config):
        configs.append(config)
        Path(config.output_dir).mkdir(parents=True)
        (Path(config.output_dir) / "report.json").write_text('{"results": []}')

    monkeypatch.setattr(eval_run, "evaluate", evaluate)
    settings = FrontierSettings(demo=DemoSettings(workdir=tmp_path / "demo", defence=None))
    lora, full = tmp_path / "a" / "lora.safetensors", tmp_path / "b" / "full.safetensors"
    (tmp_path / "b" / "full-unet").mkdir(parents=True)
    report = frontier.evaluate_sweep(settings, [lora, full], tmp_path / "base", tmp_path / "split.json",
                                     tmp_path / "net.safetensors", "lora")
    (config,) = configs
    assert report == {"results": []} and config.output_dir == str(tmp_path / "demo" / "frontier" / "eval")
    assert config.network_weights == [str(lora)] and config.unet_weights == [str(full)]
    assert config.utility_reference == "lora" and config.progress_bar is False


def test_points_skip_a_model_without_attack_rows_and_the_target_skips_a_run_without_the_measure():
    """A model the suite left without a headline AUC is no point (not a crash); a run without a proxy FD (no quality
    images) is judged on the held-out loss only."""
    import library.demo.frontier as frontier

    report = _frontier_report()
    report["models"].append({"name": "late", "path": "/r/late/late.safetensors"})
    assert [p["model"] for p in frontier.frontier_points(report, [], {})] == ["base", "es-000001"]
    plain = {"model": "p", "method": "lora", "value": 2, "heldout_loss": 0.2, "proxy_fd_digits": 20.0,
             "worst_auc": 0.8, "worst_attack": "x"}
    no_fd = {**plain, "model": "n", "method": "smp_lora", "proxy_fd_digits": None, "worst_auc": 0.55}
    lines = target_check([plain, no_fd])
    assert "  - REACHED by `n`: worst-case AUC 0.550, held-out loss 0.2" in lines
    assert lines[-1] == ("  - NOT reached: no run has worst-case AUC <= 0.60 within this budget. Closest within "
                         "budget: `p` at AUC 0.800 (x).")  # the proxy FD's: `n` is not counted


def test_frontier_files_say_missing_numbers_d_te_the_best_defence_and_the_seed_spread(tmp_path, monkeypatch):
    """frontier.md writes NaN as n/a, integer knob values as they are and p to 3 significant digits, states D_te's
    sizes, appends the seed table; frontier.json carries the best defence the demo reads."""
    import library.demo.frontier as frontier

    monkeypatch.setattr(frontier, "plot_frontier", lambda points, path: None)
    report = _frontier_report()
    report["samples"]["counts"] = {"member_test": 40, "nonmember_test": 60}
    point = {"model": "s1", "curve": "smp", "method": "smp_lora", "knob": "seed", "value": 1, "worst_auc": 0.58,
             "worst_auc_ci": [float("nan"), 0.7], "worst_attack": "loss", "suite_p": 0.012345,
             "worst_tpr_at_5pct_fpr": None, "worst_tpr_at_1pct_fpr": None, "heldout_loss": 0.1, "member_loss": 0.1,
             "proxy_fd_digits": None, "conditional_accuracy": 0.5, "utility_retained": 0.95}
    settings = FrontierSettings(sweep=tmp_path / "demo.toml", out_dir=tmp_path)
    text = frontier.write_outputs(settings, [point], report).read_text()
    assert "(D_te: 40 members vs 60 non-members)" in text
    assert "| smp | seed | 1 | 0.580 [n/a, 0.700] | loss | 0.0123 | n/a | n/a |" in text
    assert "## Across training seeds" in text
    assert json.loads((tmp_path / "frontier.json").read_text())["best_defence"]["model"] == "s1"
