"""The demo and the frontier build typed configs: the very objects the former command-line strings parsed to.

The LEGACY_* builders below are the argument lists demo.py / frontier.py used to hand to ``parse_config``
(kept here as the reference): every TrainConfig / EvalConfig the typed builders make must equal, field by field
and in repr (an ``int`` where a ``float`` was would print differently in report.json), what those gave.
Also :func:`library.config.load_config` and :func:`library.config.parse_flags` themselves. No training here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from library.config import load_config, parse_config, parse_flags
from library.demo.frontier import (
    FrontierSettings,
    train_config,
)
from library.demo.run import (
    REPO_ROOT,
    DemoSettings,
    demo_eval_config,
    tiny_train_config,
)
from library.demo.sweep import read_sweep
from library.errors import ConfigError
from library.eval.config import EvalConfig
from library.train.config import METHODS, TrainConfig

# The old frontier's method -> base TOML table, kept here as the reference the registry must reproduce.
OLD_BASE_CONFIG = {"lora": "lora", "relaxloss": "lora", "dp_lora": "lora", "mp_lora": "mp_lora", "smp_lora": "smp_lora"}

SMALL_TRAIN_FLAGS = ["--max_train_epochs", "2", "--no-progress_bar"]  # tests/conftest.py's small demo
# Cases the shipped sweep lacks: a list-valued knob, ints for a float knob, flags that a knob or the checkpoint
# interval overrides, an override of the demo's train_overrides.
EDGE_SWEEP = """
[[run]]
method = "lora"
label = "every"
save_every_n_epochs = 1
flags = ["--save_every_n_epochs", "7", "--max_train_epochs", "3"]

[[run]]
method = "smp_lora"
label = "timesteps"
knob = "attacker_timesteps"
values = [[20, 100], [50]]
flags = ["--attacker_features", "multi_t_loss", "--attacker_timesteps", "1", "--privacy_lambda", "0.5"]

[[run]]
method = "dp_lora"
knob = "dp_noise_multiplier"
values = [1, 2]
flags = ["--dp_clip_norm", "0.05", "--progress_bar"]
"""
SMALL_EVAL_FLAGS = ["--paper_epochs", "2", "--n_bootstrap", "20", "--quality_num_images", "4", "--quality_steps", "2",
                    "--no-progress_bar"]


def _legacy_demo_train_args(workdir: Path, method: str, base: Path, manifest: Path, overrides: list[str],
                            jobs: int) -> list[str]:
    out = workdir / method
    return ["--config_file", str(REPO_ROOT / "configs" / "tiny" / f"{method}.toml"),
            "--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
            "--output_dir", str(out), "--output_name", method,
            "--latent_cache_dir", str(workdir / "latent_cache"), *overrides] + (["--no-progress_bar"] if jobs > 1 else [])


def _legacy_eval_args(workdir: Path, base: Path, manifest: Path, loras: list[Path], out: Path, feature_net: Path | None,
                      eval_jobs: int, overrides: list[str], frontier: bool) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
            "--network_weights", *[str(p) for p in loras], "--resolution", "32",
            "--output_dir", str(out), "--cache_dir", str(workdir / "eval_cache"), "--jobs", str(eval_jobs),
            "--paper_draws", "16", "--paper_max_timestep", "500",  # issue 16: h' with draws in the band t < 500
            "--overwrite"]  # evaluate_mia refuses a finished report without it; the demo re-evaluates its own
    if frontier:
        args.append("--no-progress_bar")
    if feature_net is not None:
        args += ["--quality", "--quality_features", "digits", "--digit_feature_weights", str(feature_net),
                 "--quality_reference", "nonmembers"]  # issue 16: samples judged against unseen images
    return args + overrides


def _legacy_sweep_args(settings: FrontierSettings, run, flags: list[str], base: Path, manifest: Path,
                       overrides: list[str]) -> list[str]:
    """frontier.py's former _train_args, with the run's former flag list (sweep flags + --knob value)."""
    demo = settings.demo
    args = ["--config_file", str(REPO_ROOT / "configs" / "tiny" / f"{OLD_BASE_CONFIG[run.method]}.toml"),
            "--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
            "--output_dir", str(settings.out / "runs" / run.name), "--output_name", run.name,
            "--latent_cache_dir", str(demo.workdir / "latent_cache"), "--no-progress_bar", *overrides, *flags]
    if run.save_every_n_epochs:
        args += ["--save_every_n_epochs", str(run.save_every_n_epochs)]
    if "--with_prior_preservation" in flags and "--class_data_dir" not in flags:  # DreamBooth runs share one folder
        args += ["--class_data_dir", str(settings.out / "class_images")]
    return args


def _legacy_run_flags(sweep: Path) -> dict[str, list[str]]:
    """Each sweep run's former flag list: the file's flags, then ``--<knob> <value...>``."""
    import toml

    flags = {}
    for entry in toml.loads(sweep.read_text())["run"]:
        label, knob, base = entry.get("label", entry["method"]), entry.get("knob", "epochs"), [str(f) for f in entry.get("flags", [])]
        if entry.get("values") is None:
            flags[label] = base
        for value in entry.get("values") or []:
            strs = [str(v) for v in value] if isinstance(value, list) else [str(value)]
            flags[f"{label}-{knob}{'_'.join(strs).replace('.', 'p').replace('-', 'm')}"] = base + [f"--{knob}", *strs]
    return flags


def _same(typed, legacy) -> None:
    assert typed == legacy
    assert repr(typed) == repr(legacy)  # also the types: 2 vs 2.0 would change report.json / LoRA metadata
    assert dataclasses.asdict(typed) == dataclasses.asdict(legacy)


@pytest.mark.parametrize("small", [False, True], ids=["readme_demo", "test_demo"])
@pytest.mark.parametrize("jobs", [1, 3])
def test_demo_configs_equal_the_former_flag_lists(tmp_path, small, jobs):
    train_flags, eval_flags = (SMALL_TRAIN_FLAGS, SMALL_EVAL_FLAGS) if small else ([], [])
    settings = DemoSettings(workdir=tmp_path / "demo", train_overrides=list(train_flags),
                            eval_overrides=list(eval_flags), jobs=jobs)
    base, manifest = settings.workdir / "base_model", settings.workdir / "data" / "split.json"
    quiet = {"progress_bar": False} if jobs > 1 else {}
    for method in METHODS:
        typed = tiny_train_config(settings, method, base, manifest, settings.workdir / method, method,
                                  {**settings.train_overrides, **quiet})
        legacy = parse_config(TrainConfig, _legacy_demo_train_args(settings.workdir, method, base, manifest,
                                                                   train_flags, jobs))
        _same(typed, legacy)
    loras = [settings.workdir / m / f"{m}.safetensors" for m in METHODS]
    for feature_net in (settings.workdir / "digit_features.safetensors", None):
        out = settings.workdir / "eval"
        typed = demo_eval_config(settings, base, manifest, loras, out, feature_net)
        legacy = parse_config(EvalConfig, _legacy_eval_args(settings.workdir, base, manifest, loras, out, feature_net,
                                                             settings.eval_jobs, eval_flags, frontier=False))
        _same(typed, legacy)


def test_the_demos_defence_is_the_frontiers_run(tmp_path):
    """The demo trains ``DemoSettings.defence`` with the very config the frontier gives that run (same flags, budget
    and seed): only where it is written and whether it may overwrite differ."""
    from library.demo.run import demo_runs

    settings = DemoSettings(workdir=tmp_path / "demo", train_overrides=list(SMALL_TRAIN_FLAGS))
    base, manifest = settings.workdir / "base_model", settings.workdir / "data" / "split.json"
    method, config_name, overrides = demo_runs(settings)[settings.defence]
    ours = tiny_train_config(settings, config_name, base, manifest, settings.workdir / settings.defence,
                             settings.defence, {**settings.train_overrides, **overrides, "progress_bar": False})
    frontier = FrontierSettings(demo=settings)
    run = next(r for r in read_sweep(frontier.sweep) if r.name == settings.defence)
    theirs = train_config(frontier, run, base, manifest)
    assert method == run.method and ours.attacker_max_timestep == 400 and ours.privacy_lambda == 2.0
    _same(dataclasses.replace(ours, output_dir=theirs.output_dir, overwrite=theirs.overwrite), theirs)


def test_the_seed_sweeps_first_seed_is_the_demos_own_runs(tmp_path):
    """configs/frontier/seeds.toml at seed 1337 trains the demo's plain LoRA, MP-, SMP-LoRA and defence with their very
    configs (so its spread is around the demo's rows); every other seed differs from them in the seed alone."""
    from library.demo.run import demo_runs

    settings = DemoSettings(workdir=tmp_path / "demo")
    base, manifest = settings.workdir / "base_model", settings.workdir / "data" / "split.json"
    frontier = FrontierSettings(demo=settings, sweep=REPO_ROOT / "configs" / "frontier" / "seeds.toml")
    runs = read_sweep(frontier.sweep)
    demo_names = {"lora_seeds": "lora", "lora_120_seeds": "lora", "mp_paper_seeds": "mp_lora", "smp_paper_seeds": "smp_lora", "smp_t_band_seeds": settings.defence,
                  "smp_t_band_every2_seeds": settings.defence}  # ... with the attacker phase every second step
    assert {r.label for r in runs} == set(demo_names)
    for run in runs:
        method, config_name, overrides = demo_runs(settings)[demo_names[run.label]]
        extra = {"attacker_every_n_steps": 2} if "every2" in run.label else {}
        extra |= {"max_train_epochs": 120} if "120" in run.label else {}  # stopped early
        ours = tiny_train_config(settings, config_name, base, manifest, tmp_path / "x", "x",
                                 {**overrides, "progress_bar": False, "seed": run.value, **extra})
        theirs = train_config(frontier, run, base, manifest)
        assert method == run.method
        _same(dataclasses.replace(ours, output_dir=theirs.output_dir, output_name=theirs.output_name,
                                  overwrite=theirs.overwrite), theirs)
    assert sorted({r.value for r in runs}) == [1, 2, 3, 1337]


def test_an_unknown_defence_fails_when_the_settings_are_made(tmp_path):
    with pytest.raises(ConfigError, match="no run named 'smp_t_band-privacy_lambda9p0'.*smp_t_band-privacy_lambda2p0"):
        DemoSettings(workdir=tmp_path, defence="smp_t_band-privacy_lambda9p0")
    from library.demo.run import demo_runs

    assert list(demo_runs(DemoSettings(workdir=tmp_path, defence=None))) == list(METHODS)


def test_the_demos_eval_overrides_beat_the_callers_and_the_defaults(tmp_path):
    """settings.eval_overrides (the tests' cheap budget, a user's choice) win over what a caller (the frontier) and the
    demo set, as the docstring says."""
    settings = DemoSettings(workdir=tmp_path, defence=None, eval_jobs=2,
                            eval_overrides={"jobs": 1, "paper_draws": 4, "quality_reference": "members"})
    config = demo_eval_config(settings, tmp_path / "base", tmp_path / "split.json", [], tmp_path / "eval",
                              tmp_path / "net.safetensors", {"jobs": 3, "progress_bar": False})
    assert (config.jobs, config.paper_draws, config.quality_reference) == (1, 4, "members")
    assert config.progress_bar is False and config.paper_max_timestep == 500  # the caller's and the demo's own


@pytest.mark.parametrize("small", [False, True], ids=["shipped", "edge_cases"])
def test_frontier_configs_equal_the_former_flag_lists(tmp_path, small):
    sweep = FrontierSettings().sweep
    if small:
        sweep = tmp_path / "sweep.toml"
        sweep.write_text(EDGE_SWEEP)
    train_flags, eval_flags = (SMALL_TRAIN_FLAGS, SMALL_EVAL_FLAGS) if small else ([], [])
    demo = DemoSettings(workdir=tmp_path / "demo", train_overrides=list(train_flags), eval_overrides=list(eval_flags),
                        jobs=2, eval_jobs=2)
    settings = FrontierSettings(demo=demo, sweep=sweep)
    base, manifest = demo.workdir / "base_model", demo.workdir / "data" / "split.json"
    runs, flags = read_sweep(sweep), _legacy_run_flags(sweep)
    assert [r.name for r in runs] == list(flags)
    for run in runs:
        legacy = parse_config(TrainConfig, _legacy_sweep_args(settings, run, flags[run.name], base, manifest,
                                                              train_flags))
        _same(train_config(settings, run, base, manifest), legacy)
    files = [settings.out / "runs" / r.name / f"{r.name}.safetensors" for r in runs]
    feature_net = demo.workdir / "digit_features.safetensors"
    out = settings.out / "eval"
    typed = demo_eval_config(demo, base, manifest, files, out, feature_net, {"progress_bar": False})
    legacy = parse_config(EvalConfig, _legacy_eval_args(demo.workdir, base, manifest, files, out, feature_net,
                                                         demo.eval_jobs, eval_flags, frontier=True))
    _same(typed, legacy)


# ------------------------------------------------------------------------------------------------ library.config


def test_load_config_equals_parse_config_and_overrides_win(tmp_path):
    toml_path = REPO_ROOT / "configs" / "tiny" / "smp_lora.toml"
    overrides = {"privacy_lambda": 1, "attacker_timesteps": (25, 100), "output_dir": tmp_path / "x",
                 "progress_bar": False, "max_train_epochs": 2}
    typed = load_config(TrainConfig, toml_path, overrides)
    legacy = parse_config(TrainConfig, ["--config_file", str(toml_path), "--privacy_lambda", "1",
                                        "--attacker_timesteps", "25", "100", "--output_dir", str(tmp_path / "x"),
                                        "--no-progress_bar", "--max_train_epochs", "2"])
    _same(typed, legacy)
    assert typed.privacy_lambda == 1.0 and isinstance(typed.privacy_lambda, float)
    # Without a file: the dataclass defaults, as parse_config without --config_file.
    _same(load_config(EvalConfig, None, {"pretrained_model_name_or_path": "m", "split_manifest": "s.json", "jobs": 2}),
          parse_config(EvalConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json", "--jobs", "2"]))


@pytest.mark.parametrize("overrides, message", [
    ({"privacy_lamda": 1.0}, "unknown key 'privacy_lamda' \\(did you mean 'privacy_lambda'\\?\\)"),
    ({"max_train_epochs": "2"}, "'max_train_epochs' must be an integer"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' must be one of"),
    ({"privacy_lambda": -1.0}, "'privacy_lambda' must be a finite number"),  # TrainConfig.validate ran
])
def test_load_config_checks_like_parse_config(overrides, message):
    values = {"pretrained_model_name_or_path": "m", "split_manifest": "s.json", **overrides}
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, values)


def test_parse_flags_gives_typed_values_and_one_line_errors():
    assert parse_flags(TrainConfig, ["--seed", "3", "--seed", "4", "--no-progress_bar", "--attacker_timesteps", "5",
                                     "7"]) == {"seed": 4, "progress_bar": False, "attacker_timesteps": [5, 7]}
    with pytest.raises(ConfigError, match="sweep: unrecognized arguments: --sed"):
        parse_flags(TrainConfig, ["--sed", "3"], "sweep")
    with pytest.raises(ConfigError, match="invalid int value"):
        parse_flags(TrainConfig, ["--seed", "x"])
    with pytest.raises(ConfigError, match="config_file"):
        parse_flags(TrainConfig, ["--config_file", "a.toml"])
