"""Paper-scale configs, the reproduction launchers (dry runs on the tiny stack) and the results collector.

Each launcher runs for real in bash with ``DRY_RUN=1``; its training commands go through a recording
``LAUNCH`` stub and are then executed in this process (``parse_config`` + ``train`` in dry-run mode, which
loads the tiny model and the manifest), so 40-odd dry runs cost one import of torch/diffusers. One launcher
is also run end to end with ``LAUNCH=python`` to show that the real entry scripts accept what it passes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from library.config import load_toml, make_config, parse_config
from library.data.manifest import read_manifest, split_sha256
from library.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO / "scripts" / "launch"
DATASETS = ("pokemon", "celeba_small", "celeba_large", "celeba_gender", "celeba_varying", "celeba_large_5x",
            "afhq_large_5x", "coco_large_5x")
METHODS = ("lora", "mp_lora", "smp_lora")
ABLATIONS = {  # launcher -> (method, number of runs per seed, flag that varies)
    "ablation_lambda": ("smp_lora", 5, "--privacy_lambda"),
    "ablation_lr": ("smp_lora", 3, "--unet_lr"),
    "ablation_rank": ("smp_lora", 5, "--network_dim"),
    "mp_stabilisers": ("mp_lora", 2, "--max_grad_norm"),
}
EXTRA_ARGS = "--resolution 32 --mixed_precision no --no-progress_bar"
DRY_RUN_OK = "dry run: model, data"  # the trainer's "dry run: model, data ... are valid; nothing was trained"
# A stand-in's body that records its command line; the launchers' own `$PYTHON -c` (the split's hash) runs for real.
RECORDER = ('[ "$1" = -c ] && exec "$REAL_PYTHON" "$@"\n'
            'for a in "$@"; do printf "%s\\0" "$a"; done >> "$REC_FILE"; printf "\\036" >> "$REC_FILE"\n')


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_config_is_table5(dataset, method):
    path = REPO / "configs" / dataset / f"{method}.toml"
    values = load_toml(path, TrainConfig)  # unknown keys or bad types raise
    config = make_config(TrainConfig, dict(values))
    expected = dict(network_dim=64, network_alpha=32.0, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=1e-5,
                    max_train_epochs=400, train_batch_size=1, resolution=512, clip_skip=2, max_token_length=225,
                    cache_latents=True, lr_scheduler="constant", mixed_precision="bf16", save_every_n_epochs=50,
                    seed=1337, split_manifest=f"data/{dataset}/split.json", output_dir=f"runs/{dataset}/{method}",
                    pretrained_model_name_or_path="/models/v1-5-pruned.safetensors")
    for key, value in expected.items():
        assert values[key] == value, key
    if method != "lora":
        assert (config.privacy_lambda, config.attacker_lr, config.attacker_weight_decay) == (0.05, 1e-5, 1e-4)
        assert {"privacy_lambda", "attacker_lr", "attacker_weight_decay"} <= set(values)
    else:
        assert "privacy_lambda" not in values


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MODEL", "DATA", "OUT", "SEEDS", "DRY_RUN", "EXTRA_ARGS", "EVAL_ARGS", "LAUNCH", "METHODS",
                "DATASET", "LAMBDAS", "LRS", "RANKS", "INSTANCE_TOKEN", "CLASS_PROMPT", "NUM_CLASS_IMAGES",
                "RETRAIN", "RESUMABLE"):
        env.pop(key, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["REAL_PYTHON"] = sys.executable  # RECORDER's
    env.update(extra)
    return env


def _run_launcher(name: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH_DIR / f"{name}.sh")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _recorded(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    chunks = path.read_text().split("\x1e")
    return [chunk.split("\x00")[:-1] for chunk in chunks if chunk]


def _trainings(path: Path) -> list[list[str]]:
    return [c for c in _recorded(path) if c[0].startswith("train_")]


def _checked_dry_evaluations(path: Path, stderr: str, count: int) -> None:
    """A dry run checks each evaluation's flags on the base model alone (no LoRA exists yet): --dry_run, no models."""
    evaluations = [c for c in _recorded(path) if c[0] == "evaluate_mia.py"]
    assert len(evaluations) == count and "checking the evaluation's flags on the base model" in stderr
    for argv in evaluations:
        assert argv[-1] == "--dry_run" and not {"--network_weights", "--unet_weights"} & set(argv)


@pytest.fixture
def stack(tiny_model_dir, manifest_path, tmp_path):
    """MODEL / DATA given relative to the caller's directory (tmp_path), recording LAUNCH and PYTHON stubs."""
    recorder = tmp_path / "record.sh"
    recorder.write_text("#!/usr/bin/env bash\n" + RECORDER)
    recorder.chmod(0o755)
    rec_file = tmp_path / "commands.bin"
    model_rel = os.path.relpath(tiny_model_dir, tmp_path)
    env = _env(tmp_path, MODEL=model_rel, DATA=os.path.relpath(manifest_path, tmp_path), OUT="out",
               DRY_RUN="1", SEEDS="1337 7", EXTRA_ARGS=EXTRA_ARGS, LAUNCH=f"bash {recorder}", PYTHON=str(recorder),
               REC_FILE=str(rec_file))
    return env, rec_file


def _dry_run_in_process(argv: list[str], monkeypatch, capsys) -> str:
    """Execute one recorded training command (train_<method>.py + flags) here, in dry-run mode."""
    from library.train.trainer import train  # noqa: PLC0415 - heavy import, only for these tests

    script, flags = argv[0], argv[1:]
    method = {"train_lora.py": "lora", "train_mp_lora.py": "mp_lora", "train_smp_lora.py": "smp_lora"}[script]
    assert (REPO / script).is_file()
    monkeypatch.chdir(REPO)  # configs are given relative to the repository root, as the launcher runs there
    config = parse_config(TrainConfig, flags)
    assert config.dry_run and config.resolution == 32
    assert train(config, method) is None
    return capsys.readouterr().out


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_launcher_dry_run(dataset, stack, tmp_path, manifest_path, monkeypatch, capsys):
    env, rec_file = stack
    result = _run_launcher(dataset, tmp_path, env)
    assert result.returncode == 0, result.stderr
    commands = _trainings(rec_file)
    assert [c[0] for c in commands] == [f"train_{m}.py" for m in METHODS] * 2
    out = (tmp_path / "out").resolve()
    for argv, (seed, method) in zip(commands, [(s, m) for s in ("1337", "7") for m in METHODS]):
        assert _flag(argv, "--config_file") == f"configs/{dataset}/{method}.toml"
        assert _flag(argv, "--seed") == seed
        assert _flag(argv, "--output_dir") == str(out / f"seed{seed}" / method)
        assert _flag(argv, "--split_manifest") == str(manifest_path)
        assert argv[-1] == "--dry_run" and " ".join(argv).count(EXTRA_ARGS) == 1
    _checked_dry_evaluations(rec_file, result.stderr, 2)  # one per seed
    assert "would collect 2 report(s)" in result.stderr
    for argv in commands[:3]:  # one seed: the other differs only by --seed / --output_dir
        printed = _dry_run_in_process(argv, monkeypatch, capsys)
        assert DRY_RUN_OK in printed


def test_a_misspelled_method_stops_the_launcher_before_any_training(stack, tmp_path):
    env, rec_file = stack
    env["METHODS"] = "lora smp_lroa"
    result = _run_launcher("pokemon", tmp_path, env)
    assert result.returncode != 0 and "unknown method smp_lroa" in result.stderr
    assert not _recorded(rec_file)  # not even the plain LoRA ran first


@pytest.mark.parametrize("launcher", sorted(ABLATIONS))
def test_ablation_launcher_dry_run(launcher, stack, tmp_path, monkeypatch, capsys):
    env, rec_file = stack
    env["SEEDS"] = "1337"
    result = _run_launcher(launcher, tmp_path, env)
    assert result.returncode == 0, result.stderr
    method, runs, flag = ABLATIONS[launcher]
    commands = _trainings(rec_file)
    _checked_dry_evaluations(rec_file, result.stderr, 1)
    assert len(commands) == runs and {c[0] for c in commands} == {f"train_{method}.py"}
    values = [_flag(c, flag) for c in commands]
    assert len(set(c[c.index("--output_name") + 1] for c in commands)) == runs  # distinct run names
    if launcher == "ablation_lambda":
        assert [float(v) for v in values] == [1, 0.5, 0.1, 0.05, 0.01]
    elif launcher == "ablation_lr":
        assert [float(v) for v in values] == [1e-4, 1e-5, 1e-6]
        assert [float(_flag(c, "--text_encoder_lr")) for c in commands] == pytest.approx([1e-5, 1e-6, 1e-7])
    elif launcher == "ablation_rank":
        assert [int(v) for v in values] == [128, 64, 32, 16, 8]
        assert [float(_flag(c, "--network_alpha")) for c in commands] == [64, 32, 16, 8, 4]
    else:
        assert "--grad_normalize" in commands[1] and values == ["1.0", "0"]
    for argv in commands:
        assert DRY_RUN_OK in _dry_run_in_process(argv, monkeypatch, capsys)


def _eval_loras(argv: list[str]) -> list[str]:
    start = argv.index("--network_weights") + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


@pytest.mark.parametrize("launcher", list(DATASETS) + sorted(ABLATIONS))
def test_eval_command_agrees_with_the_training(launcher, stack, tmp_path, monkeypatch):
    """The evaluation sees the text encoder as the training did: each launcher's evaluate_mia.py call passes the
    training configs' clip_skip / max_token_length (the paper's 2 / 225) or neither, so that evaluate_mia.py reads
    them from the LoRA files; never another value (the default 1 / 75 would query another model)."""
    env, rec_file = stack
    python = tmp_path / "python"  # PYTHON is one executable (LAUNCH may be a command line)
    python.write_text("#!/usr/bin/env bash\n" + RECORDER)
    python.chmod(0o755)
    env.update(DRY_RUN="0", SEEDS="1337", PYTHON=str(python))  # record every command, run none
    result = _run_launcher(launcher, tmp_path, env)
    assert result.returncode == 0, result.stderr
    commands = _recorded(rec_file)
    monkeypatch.chdir(REPO)
    trained = {}
    for argv in commands:
        if argv[0].startswith("train_"):
            config = parse_config(TrainConfig, argv[1:])
            trained[str(Path(config.output_dir) / f"{config.output_name}.safetensors")] = config
    evals = [argv for argv in commands if argv[0] == "evaluate_mia.py"]
    assert len(evals) == 1 and trained
    for argv in evals:
        configs = [trained[path] for path in _eval_loras(argv)]
        assert len(configs) == len(trained)
        for flag in ("clip_skip", "max_token_length"):
            values = {getattr(c, flag) for c in configs}
            assert len(values) == 1, f"one evaluation of LoRAs trained with different {flag}: {values}"
            if f"--{flag}" in argv:
                assert str(values.pop()) == _flag(argv, f"--{flag}"), flag
        assert (configs[0].clip_skip, configs[0].max_token_length) == (2, 225)  # the paper configs


@pytest.mark.parametrize("kind", ["full", "dreambooth"])
def test_table9_launchers_train_the_whole_unet_and_audit_it(kind, stack, tmp_path, monkeypatch, capsys):
    env, rec_file = stack
    env.update(SEEDS="1337", INSTANCE_TOKEN="handwritten")  # the digits' captions hold no "pokemon"
    result = _run_launcher(f"pokemon_{kind}", tmp_path, env)
    assert result.returncode == 0, result.stderr
    commands = _trainings(rec_file)
    assert [c[0] for c in commands] == ["train_lora.py", "train_smp_lora.py"]
    _checked_dry_evaluations(rec_file, result.stderr, 1)
    for argv in commands:
        assert _flag(argv, "--config_file") == f"configs/pokemon/{argv[0][6:-3]}.toml"
        assert _flag(argv, "--train_mode") == "full" and float(_flag(argv, "--unet_lr")) == 5e-6
        assert ("--with_prior_preservation" in argv) == (kind == "dreambooth")
        printed = _dry_run_in_process(argv, monkeypatch, capsys)
        assert DRY_RUN_OK in printed and "trained parameters (full;" in printed
        assert ("200 to generate with the base model" in printed) == (kind == "dreambooth")

    python = tmp_path / "python"  # now record the evaluation too (DRY_RUN 0: the commands are recorded, not run)
    python.write_text("#!/usr/bin/env bash\n" + RECORDER)
    python.chmod(0o755)
    rec_file.unlink()
    env.update(DRY_RUN="0", PYTHON=str(python))
    assert _run_launcher(f"pokemon_{kind}", tmp_path, env).returncode == 0
    commands = _recorded(rec_file)
    evaluation = next(argv for argv in commands if argv[0] == "evaluate_mia.py")
    start = evaluation.index("--unet_weights") + 1
    trained = [Path(_flag(c, "--output_dir")) / f"{_flag(c, '--output_name')}-unet" for c in commands[:2]]
    assert [Path(p) for p in evaluation[start:start + 2]] == trained
    assert "--network_weights" not in evaluation and "--clip_skip" not in evaluation


def test_launcher_needs_model_and_manifest(tmp_path, tiny_model_dir):
    result = _run_launcher("pokemon", tmp_path, _env(tmp_path))
    assert result.returncode == 2 and result.stderr.startswith("error: set MODEL")
    result = _run_launcher("pokemon", tmp_path, _env(tmp_path, MODEL=str(tiny_model_dir), DATA="nope.json"))
    assert result.returncode == 2 and "nope.json not found" in result.stderr
    result = _run_launcher("pokemon", tmp_path, _env(tmp_path, MODEL=str(tmp_path / "missing.safetensors")))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_launcher_real_entry_script(tmp_path, tiny_model_dir, manifest_path):
    """Real subprocesses: the actual train_lora.py and evaluate_mia.py accept every flag the launcher passes."""
    env = _env(tmp_path, MODEL=str(tiny_model_dir), DATA=str(manifest_path), OUT=str(tmp_path / "o"),
               DRY_RUN="1", SEEDS="1337", METHODS="lora", LAUNCH=shlex.quote(sys.executable),
               EXTRA_ARGS=EXTRA_ARGS)
    result = _run_launcher("celeba_small", tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert DRY_RUN_OK in result.stdout
    assert "dry run: 1 model(s) (base)" in result.stdout  # evaluate_mia.py --dry_run on the base model
    # A misspelled evaluation flag stops the dry run, not a real run after hours of training.
    result = _run_launcher("celeba_small", tmp_path, {**env, "EVAL_ARGS": "--attacks lossy"})
    assert result.returncode == 2 and "error: --attacks: invalid choice: 'lossy'" in result.stderr


# A LAUNCH / PYTHON stand-in that records its command and writes what a finished training / evaluation leaves (a
# run record of the split SPLIT_SHA).
FINISHER = "#!/usr/bin/env bash\n" + RECORDER + """
out= name=
while [ $# -gt 0 ]; do
  case "$1" in --output_dir) out="$2"; shift ;; --output_name) name="$2"; shift ;; esac; shift
done
case "$name" in
  "") [ -n "$out" ] && mkdir -p "$out" && echo '{}' > "$out/report.json" ;;
  *) mkdir -p "$out" && touch "$out/$name.safetensors" && echo "{\\"split_sha256\\": \\"$SPLIT_SHA\\"}" > "$out/$name.json" ;;
esac
exit 0
"""


def _finisher_env(manifest: Path) -> dict[str, str]:
    return {"SPLIT_SHA": split_sha256(read_manifest(manifest, verify=False))}


def test_a_rerun_goes_on_where_the_last_call_stopped(tmp_path, tiny_model_dir, manifest_path):
    """A launcher that died after seed 1 (or is given more seeds) trains and evaluates only what is not finished;
    RETRAIN=1 trains again, with --overwrite."""
    stub = tmp_path / "finish.sh"
    stub.write_text(FINISHER)
    stub.chmod(0o755)
    rec_file = tmp_path / "commands.bin"
    data = tmp_path / "split.json"  # the launchers only hash it: its relative dataset_root need not resolve
    data.write_bytes(manifest_path.read_bytes())
    env = _env(tmp_path, MODEL=str(tiny_model_dir), DATA=str(data), OUT=str(tmp_path / "o"), METHODS="lora",
               LAUNCH=f"bash {stub}", PYTHON=str(stub), REC_FILE=str(rec_file), **_finisher_env(manifest_path))

    def calls(seeds: str, **extra: str) -> list[str]:
        rec_file.unlink(missing_ok=True)
        result = _run_launcher("pokemon", tmp_path, {**env, "SEEDS": seeds, **extra})
        assert result.returncode == 0, result.stderr
        return [f"{c[0]} {_flag(c, '--output_dir').rsplit('/', 2)[-2]}" for c in _recorded(rec_file)
                if c[0].startswith("train_") or c[0] == "evaluate_mia.py"]

    def last_evaluation() -> list[str]:
        return [c for c in _recorded(rec_file) if c[0] == "evaluate_mia.py"][-1]

    assert calls("1") == ["train_lora.py seed1", "evaluate_mia.py seed1"]
    assert "--overwrite" not in last_evaluation()  # a first evaluation replaces nothing
    assert calls("1 2") == ["train_lora.py seed2", "evaluate_mia.py seed2"]  # seed 1 is finished: skipped
    redone = calls("1", RETRAIN="1")
    assert redone == ["train_lora.py seed1", "evaluate_mia.py seed1"]
    (tmp_path / "o" / "seed2" / "lora" / "lora.json").unlink()  # killed between its LoRA and its record
    assert calls("1 2") == ["train_lora.py seed2", "evaluate_mia.py seed2"]
    assert "--overwrite" in _recorded(rec_file)[0]
    # a report is reused only for the command that made it: other models, or other EVAL_ARGS, evaluate again
    assert calls("1", METHODS="lora smp_lora") == ["train_smp_lora.py seed1", "evaluate_mia.py seed1"]
    assert calls("1", METHODS="lora") == ["evaluate_mia.py seed1"]
    assert calls("1", METHODS="lora") == []
    assert calls("1", METHODS="lora", EVAL_ARGS="--n_bootstrap 10") == ["evaluate_mia.py seed1"]
    assert "--overwrite" in last_evaluation()  # evaluating again replaces the report, as chosen above
    made_by = (tmp_path / "o" / "seed1" / "eval" / "launch_command.txt").read_text()
    assert "--n_bootstrap" in made_by and "--overwrite" not in made_by  # so the next call's skip still matches
    assert calls("1", METHODS="lora", EVAL_ARGS="--n_bootstrap 10") == []
    # The dataset prepared again (another split in the same file): trained and evaluated again, not skipped.
    doc = json.loads(data.read_text())
    splits = doc["splits"]
    splits["member_aux"][0], splits["nonmember_aux"][0] = splits["nonmember_aux"][0], splits["member_aux"][0]
    data.write_text(json.dumps(doc))
    assert calls("1", METHODS="lora", EVAL_ARGS="--n_bootstrap 10") == ["train_lora.py seed1", "evaluate_mia.py seed1"]
    assert "--overwrite" in [c for c in _recorded(rec_file) if c[0] == "train_lora.py"][0]


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "accelerate").exists(), reason="no .venv (scripts/setup.sh)")
def test_the_default_launch_is_one_quiet_accelerate_process(tmp_path, tiny_model_dir, manifest_path):
    """Without LAUNCH: the .venv's accelerate, one process, and a refused run is its error line (no traceback)."""
    env = _env(tmp_path, MODEL=str(tiny_model_dir), DATA=str(manifest_path), OUT=str(tmp_path / "o"), METHODS="lora",
               SEEDS="1", DRY_RUN="1", EXTRA_ARGS=EXTRA_ARGS)
    result = _run_launcher("pokemon", tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no " \
        "train_lora.py" in result.stderr
    assert DRY_RUN_OK in result.stdout and "were not passed to `accelerate launch`" not in result.stderr
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    result = _run_launcher("pokemon", tmp_path, {**env, "MODEL": str(empty)})
    assert result.returncode != 0 and "error: " in result.stderr and "Traceback" not in result.stderr


def test_the_launchers_find_the_repositorys_environment_or_say_what_is_missing(tmp_path, tiny_model_dir,
                                                                               manifest_path):
    """PYTHON / LAUNCH default to the repository's .venv (not activated); one that is not there is one line;
    TOKENIZER reaches training and evaluation as --tokenizer_path."""
    env = _env(tmp_path, MODEL=str(tiny_model_dir), DATA=str(manifest_path), OUT=str(tmp_path / "o"), METHODS="lora",
               SEEDS="1", DRY_RUN="1")
    for key, value in (("PYTHON", "no-such-python"), ("LAUNCH", "no-such-accelerate launch")):
        result = _run_launcher("pokemon", tmp_path, {**env, key: value})
        assert result.returncode == 2 and f"{key} '{value}' not found" in result.stderr, result.stderr
    result = _run_launcher("pokemon", tmp_path, {**env, "TOKENIZER": str(tmp_path / "nope")})
    assert result.returncode == 2 and "TOKENIZER" in result.stderr and "is not a folder" in result.stderr
    recorder = tmp_path / "record.sh"
    recorder.write_text("#!/usr/bin/env bash\n" + RECORDER)
    recorder.chmod(0o755)
    rec_file = tmp_path / "commands.bin"
    tokenizer = tiny_model_dir / "tokenizer"
    result = _run_launcher("pokemon", tmp_path, {**env, "DRY_RUN": "0", "TOKENIZER": str(tokenizer),
                                                 "LAUNCH": f"bash {recorder}", "PYTHON": str(recorder),
                                                 "REC_FILE": str(rec_file)})
    assert result.returncode == 0, result.stderr
    commands = {c[0]: c for c in _recorded(rec_file)}
    for script in ("train_lora.py", "evaluate_mia.py"):
        assert _flag(commands[script], "--tokenizer_path") == str(tokenizer), script


def test_launched_trainings_keep_one_state_and_resume_the_latest(tmp_path, tiny_model_dir, manifest_path):
    """A killed training goes on from its newest state when the launcher is called again (the trainer's side:
    tests/test_retention.py); RETRAIN=1 starts from the first step, RESUMABLE=0 writes no states."""
    stub = tmp_path / "finish.sh"
    stub.write_text(FINISHER)
    stub.chmod(0o755)
    rec_file = tmp_path / "commands.bin"
    env = _env(tmp_path, MODEL=str(tiny_model_dir), DATA=str(manifest_path), OUT=str(tmp_path / "o"), METHODS="lora",
               LAUNCH=f"bash {stub}", PYTHON=str(stub), REC_FILE=str(rec_file), SEEDS="1",
               **_finisher_env(manifest_path))

    def training(**extra: str) -> list[str]:
        rec_file.unlink(missing_ok=True)
        result = _run_launcher("pokemon", tmp_path, {**env, **extra})
        assert result.returncode == 0, result.stderr
        return next(c for c in _recorded(rec_file) if c[0] == "train_lora.py")

    argv = training()
    assert "--save_state" in argv and _flag(argv, "--resume") == "latest"
    assert _flag(argv, "--save_last_n_epochs_state") == "1"  # configs/pokemon saves every 50 epochs
    argv = training(RETRAIN="1")
    assert "--save_state" in argv and "--resume" not in argv
    argv = training(RETRAIN="1", RESUMABLE="0")
    assert not {"--save_state", "--resume", "--save_last_n_epochs_state"} & set(argv)
    argv = training(RETRAIN="1", EXTRA_ARGS="--no-save_state")  # as RESUMABLE=0, not a config error
    assert not {"--save_state", "--resume", "--save_last_n_epochs_state"} & set(argv) and "--no-save_state" in argv
    result = _run_launcher("pokemon", tmp_path, {**env, "RESUMABLE": "yes"})
    assert result.returncode == 2 and "RESUMABLE must be 0 or 1" in result.stderr


@pytest.mark.parametrize("seeds, message", [("1 x", "'x' is not a seed"), ("1 1", "1 is given twice")])
def test_bad_seeds_stop_the_launcher_before_any_training(stack, tmp_path, seeds, message):
    env, rec_file = stack
    result = _run_launcher("pokemon", tmp_path, {**env, "SEEDS": seeds})
    assert result.returncode == 2 and message in result.stderr
    assert not _recorded(rec_file)


def test_launchers_are_valid_bash():
    for path in sorted(LAUNCH_DIR.glob("*.sh")):
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        if path.name != "common.sh":
            assert "set -euo pipefail" in text and "common.sh" in text


# ---------------------------------------------------------------------------------------------------------
# Collector
# ---------------------------------------------------------------------------------------------------------


def _collector():
    spec = importlib.util.spec_from_file_location("collect_results", REPO / "scripts" / "collect_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_results(tmp_path, capsys):
    collect = _collector()
    reports = []
    for seed, (asr, auc) in enumerate([(0.80, 0.90), (0.84, 0.86), (0.82, 0.88)]):
        rows = [
            {"model": "lora", "attack": "loss_threshold", "asr": asr, "auc": auc, "tpr@5%fpr": {"value": 0.1},
             "ci": [0.1, 0.2], "note": "text is ignored"},
            {"model": "smp_lora", "attack": "loss_threshold", "asr": 0.5, "auc": 0.55},
        ]
        doc = {"rows": rows, "config": {}} if seed % 2 else rows  # both accepted shapes
        path = tmp_path / f"seed{seed}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(doc))
        reports.append(str(path))
    assert collect.main(["--output_dir", str(tmp_path / "summary"), *reports]) == 0
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())["summary"]
    by_key = {(e["model"], e["metric"]): e for e in summary}
    asr = by_key[("lora", "asr")]
    assert asr["n"] == 3 and asr["mean"] == pytest.approx(0.82)
    assert asr["se"] == pytest.approx(0.02 / math.sqrt(3))
    assert by_key[("lora", "auc_dev")]["mean"] == pytest.approx(0.76)  # |AUC - .5| / .5, paper Table 1
    assert by_key[("lora", "tpr@5%fpr")]["mean"] == pytest.approx(0.1)
    assert by_key[("smp_lora", "asr")]["se"] == 0
    assert ("lora", "ci") not in by_key and ("lora", "note") not in by_key
    table = (tmp_path / "summary" / "summary.md").read_text()
    assert "| lora | loss_threshold |" in table and "0.82 ± 0.012 (n=3)" in table
    capsys.readouterr()
    assert collect.main([str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert collect.main(["--allow_missing", str(tmp_path / "missing.json"), reports[0]]) == 0
    capsys.readouterr()
    assert collect.main([reports[0], str(Path(reports[0]).parent / ".." / "seed0" / "report.json")]) == 2
    assert "is given twice: it would count as two seeds" in capsys.readouterr().err
    assert collect.main([str(tmp_path / "seed0")]) == 2
    assert "is a folder: pass the report.json inside it" in capsys.readouterr().err
    copy = tmp_path / "copy" / "report.json"
    copy.parent.mkdir()
    copy.write_bytes(Path(reports[0]).read_bytes())
    assert collect.main([reports[0], str(copy)]) == 2
    assert f"is a copy of {reports[0]}: it would count as two seeds" in capsys.readouterr().err


def test_collect_results_keeps_variants_apart_and_reads_evaluate_mia_rows(tmp_path, capsys):
    """evaluate_mia.py's report.json: several variants per attack (one headline) and ``tpr_at_fpr`` as a dict."""
    collect = _collector()
    reports = []
    for seed, auc in enumerate([0.9, 0.8]):
        rows = [{"model": "lora", "attack": "loss", "variant": "t=50", "label": "loss t=50", "headline": False,
                 "auc": 0.6, "tpr_at_fpr": {"0.05": 0.2, "0.01": None}},
                {"model": "lora", "attack": "loss", "variant": "avg", "label": "loss avg", "headline": True,
                 "auc": auc, "tpr_at_fpr": {"0.05": 0.3 + seed / 10, "0.01": None}, "auc_ci": [0.7, 0.95]}]
        path = tmp_path / f"report{seed}.json"
        path.write_text(json.dumps({"results": rows}))
        reports.append(str(path))
    assert collect.main(["--output_dir", str(tmp_path / "head"), *reports]) == 0
    summary = json.loads((tmp_path / "head" / "summary.json").read_text())["summary"]
    by_key = {(e["attack"], e["metric"]): e for e in summary}
    assert {attack for attack, _ in by_key} == {"loss avg"}  # the headline row only, one per seed
    assert by_key[("loss avg", "auc")]["n"] == 2 and by_key[("loss avg", "auc")]["mean"] == pytest.approx(0.85)
    assert by_key[("loss avg", "tpr@5%fpr")]["mean"] == pytest.approx(0.35)
    assert ("loss avg", "tpr@1%fpr") not in by_key  # None: not resolvable with these sizes
    assert collect.main(["--all_variants", "--output_dir", str(tmp_path / "all"), *reports]) == 0
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())["summary"]
    assert {e["attack"] for e in summary} == {"loss avg", "loss t=50"}
    assert all(e["n"] == 2 for e in summary)
    capsys.readouterr()
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps([{"model": "lora", "attack": "loss", "auc": 0.9}] * 2))
    assert collect.main([str(twice)]) == 2
    assert "two rows" in capsys.readouterr().err


def test_collect_results_averages_a_headline_chosen_per_seed(tmp_path):
    """GSA's headline is gsa1 in one seed and gsa2 in another (chosen on D_aux): one row over both seeds."""
    collect = _collector()
    reports = []
    for seed, chosen in enumerate(["gsa1", "gsa2"]):
        rows = [{"model": "lora", "attack": "gsa", "variant": v, "label": f"gsa {v}", "headline": v == chosen,
                 "auc": 0.7 + seed / 10, "info": {"headline_on_aux": chosen}} for v in ("gsa1", "gsa2")]
        (tmp_path / f"report{seed}.json").write_text(json.dumps({"results": rows}))
        reports.append(str(tmp_path / f"report{seed}.json"))
    assert collect.main(["--output_dir", str(tmp_path / "head"), *reports]) == 0
    summary = json.loads((tmp_path / "head" / "summary.json").read_text())["summary"]
    auc = next(e for e in summary if e["metric"] == "auc")
    assert {e["attack"] for e in summary} == {"gsa selected"} and auc["n"] == 2 and auc["mean"] == pytest.approx(0.75)
    assert collect.main(["--all_variants", "--output_dir", str(tmp_path / "all"), *reports]) == 0
    summary = json.loads((tmp_path / "all" / "summary.json").read_text())["summary"]
    assert {e["attack"] for e in summary} == {"gsa gsa1", "gsa gsa2"}
