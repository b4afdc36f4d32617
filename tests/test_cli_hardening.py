"""Issue 14, the command lines: every bad flag, config file or output path is one ``error:`` line, exit 2.

Each CLI runs as its script's ``__main__`` does (``run_cli`` around its main), in this process (a subprocess for
two of them, to show the real scripts' exit status); none of them may print a traceback or the 70-line usage.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

import evaluate_mia
from library.cli import ArgumentParser, run_cli
from library.config import load_config, option, parse_config, parse_flags, value_sources
from library.data.prepare import afhq, celeba, coco, pokemon
from library.errors import ConfigError
from library.train.cli import train_entry
from library.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BASE = ["--pretrained_model_name_or_path", "m", "--split_manifest", "s.json"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(err: str) -> str:
    """The only stderr line, which starts with ``error:`` (no traceback, no usage block)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "usage:" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Case 1: argparse errors of every CLI
# ---------------------------------------------------------------------------------------------------------


def _clis(tmp: Path) -> dict[str, tuple[Callable[[list[str]], int], list[str]]]:
    """script -> (how its __main__ runs it, the required flags)."""
    script = {name: _script(name) for name in ("make_split", "demo", "frontier", "pretrain_base",
                                               "train_digit_features", "make_tiny_model", "make_digits_dataset",
                                               "suite_null", "bake_vae")}
    return {
        "train_lora.py": (lambda argv: train_entry("lora", "", argv), BASE),
        "evaluate_mia.py": (evaluate_mia.main, BASE),
        "make_split.py": (script["make_split"].main, ["--dataset_dir", str(tmp / "d"), "--output", str(tmp / "s.json"),
                                                      "--seed", "0"]),
        "prepare_afhq.py": (lambda argv: run_cli(afhq.main, argv), ["--afhq_dir", str(tmp), "--captions", "c.csv"]),
        "prepare_celeba.py": (lambda argv: run_cli(celeba.main, argv),
                              ["--celeba_dir", str(tmp), "--captions", "c.csv", "--subset", "small"]),
        "prepare_coco.py": (lambda argv: run_cli(coco.main, argv),
                            ["--images_dir", str(tmp), "--annotations", "a.json"]),
        "prepare_pokemon.py": (lambda argv: run_cli(pokemon.main, argv), ["--source", str(tmp)]),
        "demo.py": (lambda argv: run_cli(script["demo"]._main, argv), []),
        "frontier.py": (lambda argv: run_cli(script["frontier"]._main, argv), []),
        "pretrain_base.py": (lambda argv: run_cli(script["pretrain_base"].main, argv),
                             ["--manifest", "m.json", "--output_dir", str(tmp / "base")]),
        "train_digit_features.py": (lambda argv: run_cli(script["train_digit_features"].main, argv),
                                    ["--manifest", "m.json", "--output", str(tmp / "f.safetensors")]),
        "make_tiny_model.py": (lambda argv: run_cli(script["make_tiny_model"].main, argv),
                               ["--output_dir", str(tmp / "tiny")]),
        "make_digits_dataset.py": (lambda argv: run_cli(script["make_digits_dataset"].main, argv),
                                   ["--output_dir", str(tmp / "digits")]),
        "suite_null.py": (lambda argv: run_cli(script["suite_null"]._main, argv), [str(tmp / "eval")]),
        "bake_vae.py": (lambda argv: run_cli(script["bake_vae"].main, argv),
                        ["--checkpoint", "m.safetensors", "--vae", "v.safetensors", "--output", str(tmp / "o.safetensors")]),
    }


# (script, flags, what the one line must say)
PARSE_ERRORS = [
    ("train_lora.py", ["--lerning_rate", "1e-4"], "unrecognized arguments: --lerning_rate 1e-4 (did you mean --learning_rate?)"),
    ("train_lora.py", ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ("train_lora.py", ["--mixed_precision", "bf61"], "invalid choice: 'bf61' (choose from 'no', 'fp16', 'bf16') "
                                                     "(did you mean 'bf16'?)"),
    ("train_lora.py", ["--max_token_length", "100"], "--max_token_length: invalid choice: 100"),
    ("evaluate_mia.py", ["--num_noise_draw", "2"], "did you mean --num_noise_draws?"),
    ("evaluate_mia.py", ["--batch_size", "x"], "--batch_size: invalid int value: 'x'"),
    ("evaluate_mia.py", ["--mixed_precision", "fp8"], "--mixed_precision: invalid choice: 'fp8'"),
    ("make_split.py", ["--presett", "pokemon"], "did you mean --preset?"),
    ("make_split.py", ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ("make_split.py", ["--preset", "pokemom"], "did you mean 'pokemon'?"),
    ("make_split.py", ["--pretrain", "-3"], "--pretrain: expected a non-negative integer or 'rest'"),
    ("prepare_afhq.py", ["--resolutoin", "8"], "did you mean --resolution?"),
    ("prepare_afhq.py", ["--resolution", "x"], "--resolution: invalid int value: 'x'"),
    ("prepare_celeba.py", ["--subset", "smal"], "did you mean 'small'?"),
    ("prepare_coco.py", ["--sed", "1"], "unrecognized arguments: --sed 1"),
    ("prepare_pokemon.py", ["--overwirte"], "did you mean --overwrite?"),
    ("demo.py", ["--jbos", "2"], "did you mean --jobs?"),
    ("demo.py", ["--jobs", "x"], "--jobs: invalid int value: 'x'"),
    ("frontier.py", ["--eval_jobs", "1.5"], "--eval_jobs: invalid int value: '1.5'"),
    ("pretrain_base.py", ["--unet_stpes", "3"], "did you mean --unet_steps?"),
    ("pretrain_base.py", ["--dataset_dir", "d"], "--dataset_dir: not allowed with argument --manifest"),
    ("train_digit_features.py", ["--lr", "fast"], "--lr: invalid float value: 'fast'"),
    ("make_tiny_model.py", ["--seed", "x"], "--seed: invalid int value: 'x'"),
    ("make_digits_dataset.py", ["--source", "mnist"], "--source: invalid choice: 'mnist'"),
    ("suite_null.py", ["--sed", "1"], "did you mean --seed?"),
    ("bake_vae.py", ["--overwirte"], "did you mean --overwrite?"),
    # kohya's --vae: the VAE is part of the base model here; both commands name the tool that puts it there
    ("train_lora.py", ["--vae", "vae.safetensors"], "--vae: not supported: the base model's own VAE is used; put "
                                                    "the VAE into the base model (a single file: python "
                                                    "scripts/bake_vae.py"),
    ("evaluate_mia.py", ["--vae", "vae.safetensors"], "--vae: not supported: the base model's own VAE is used"),
    # diffusers' example-script flags get advice, not a look-alike of ours ("did you mean --network_dropout?")
    ("train_lora.py", ["--center_crop"], "--center_crop: images are always centre-cropped squares at --resolution"),
    ("train_lora.py", ["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint: use --resume (a state "
                                                              "folder, or latest"),
    ("train_lora.py", ["--instance_prompt", "a photo of sks dog"], "--instance_prompt: the instance prompt is each "
                                                                    "member's caption"),
    ("train_lora.py", ["--allow_tf32"], "--allow_tf32: not supported"),  # not "did you mean --allow_pickle?"
    ("train_lora.py", ["--no-xformers"], "--xformers: diffusers already uses"),  # a negated kohya flag: its advice
    ("train_lora.py", ["--rank=4"], "--rank: use --network_dim"),  # the --flag=value form gets the advice too
]


@pytest.mark.parametrize("script, flags, message", PARSE_ERRORS, ids=[f"{c[0]}:{c[1][0]}" for c in PARSE_ERRORS])
def test_parse_errors_are_one_line(script, flags, message, tmp_path, capsys):
    run, required = _clis(tmp_path)[script]
    before = sorted(tmp_path.rglob("*"))
    assert run(required + flags) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert message in line and line.endswith("; run with --help for the flags"), line
    assert captured.out == "" and sorted(tmp_path.rglob("*")) == before  # nothing ran, nothing was written


def test_missing_required_flags_are_one_line(tmp_path, capsys):
    run, _ = _clis(tmp_path)["make_split.py"]
    assert run([]) == 2
    assert "the following arguments are required: --dataset_dir, --output, --seed" in one_error_line(
        capsys.readouterr().err)
    assert run(["--dataset_dir", "d", "--output", str(tmp_path / "s.json"), "--seed", "0"]) == 2
    assert "give --preset or all of --member_aux" in one_error_line(capsys.readouterr().err)


def test_suite_null_names_the_folder_it_cannot_read(tmp_path, capsys):
    run, _ = _clis(tmp_path)["suite_null.py"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text('{"results": []}')
    assert run([str(tmp_path / "eval")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "eval/scores.csv: cannot read the evaluation's per-sample scores" in line, line
    for text in ("[]", "{}"):  # valid JSON, not a report: was an AttributeError / KeyError traceback
        (tmp_path / "eval" / "report.json").write_text(text)
        assert run([str(tmp_path / "eval")]) == 2
        assert "not an evaluation report" in one_error_line(capsys.readouterr().err)


def test_demo_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    run, _ = _clis(tmp_path)["demo.py"]
    (tmp_path / "afile").write_text("x")
    assert run(["--workdir", str(tmp_path / "afile")]) == 2
    assert "--workdir" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("script", ["train_lora.py", "scripts/make_split.py"])
def test_real_script_exits_2_with_one_line(script, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / script), "--lerning_rate", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "unrecognized arguments: --lerning_rate" in line or "required" in line


def test_a_reader_that_stops_early_ends_the_run_quietly(tmp_path):
    """``script | head``: no BrokenPipeError traceback, the exit status of a tool killed by SIGPIPE."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from library.cli import run_cli\n"
            "def main(argv):\n    for i in range(200000):\n        print('row', i)\n"
            "sys.exit(run_cli(main, []))")
    process = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=tmp_path)
    assert process.stdout.readline() == b"row 0\n"
    process.stdout.close()  # as head does after its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == ""


def test_a_broken_pipe_other_than_stdout_is_a_real_failure(tmp_path):
    """A worker's pipe breaking while stdout is read must not pass for ``| head``: a traceback, not a quiet 141."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from library.cli import run_cli\n"
            "def main(argv):\n    raise BrokenPipeError('worker pipe')\n"
            "sys.exit(run_cli(main, []))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 1 and "BrokenPipeError: worker pipe" in result.stderr


def test_run_cli_gives_the_callers_sigterm_handler_back():
    """A script run in-process (tests, the demo's steps) must leave the caller's SIGTERM handling as it was."""
    import signal

    def callers(signum: int, frame: object) -> None:
        raise AssertionError("not sent")

    before = signal.signal(signal.SIGTERM, callers)
    try:
        assert run_cli(lambda argv: 0, []) == 0
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_entry_scripts_never_reach_a_model_hub(monkeypatch):
    """Every model is a local folder: a run must not try (and, offline, hang on) the Hugging Face Hub."""
    from library.cli import offline_environment

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    offline_environment()
    assert [os.environ[name] for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")] == ["1", "1"]


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--help"])
    assert exit_info.value.code == 0 and "--max_train_epochs" in capsys.readouterr().out


def test_parser_options():
    parser = ArgumentParser(error_prefix="sweep.toml, run 2: ", help_hint=None)
    parser.add_argument("--seed", type=int)
    with pytest.raises(ConfigError) as info:
        parser.parse_args(["--sede", "1"])
    assert str(info.value) == "sweep.toml, run 2: unrecognized arguments: --sede 1 (did you mean --seed?)"
    with pytest.raises(ConfigError, match=r"--sede 1 --zzz \(did you mean --seed\?\)$"):
        parser.parse_args(["--sede", "1", "--zzz"])  # the suggestion is for the first unknown flag
    with pytest.raises(ConfigError, match=r"^flags: unrecognized arguments: 5$"):
        parse_flags(TrainConfig, ["--seed", "3", "5"])  # a value without its flag


# ---------------------------------------------------------------------------------------------------------
# Case 2: unknown TOML sections
# ---------------------------------------------------------------------------------------------------------


def test_misspelled_section_is_refused(tiny_train_args, tmp_path, capsys):
    toml_path = tmp_path / "run.toml"
    toml_path.write_text("[privcy]\nprivacy_lambda = 1.0\n")
    assert train_entry("smp_lora", "", tiny_train_args + ["--config_file", str(toml_path), "--dry_run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(toml_path) in line and "unknown section [privcy] (did you mean [privacy]?)" in line
    assert "known sections: model, data, network, training" in line
    assert not (tmp_path / "out").exists()


def test_known_sections_and_nesting(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\npretrained_model_name_or_path = "m"\n[data]\nsplit_manifest = "s.json"\n'
                    "[training.privacy]\nprivacy_lambda = 2.0\n[training_arguments]\nseed = 3\n")
    config = parse_config(TrainConfig, ["--config_file", str(path)])
    assert (config.privacy_lambda, config.seed) == (2.0, 3)
    path.write_text("[training.privcy]\nprivacy_lambda = 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown section \[training.privcy\] \(did you mean \[privacy\]\?\)"):
        parse_config(TrainConfig, ["--config_file", str(path)] + BASE)


# ---------------------------------------------------------------------------------------------------------
# Case 3: the command line beats the file, also for options that override one another
# ---------------------------------------------------------------------------------------------------------


def _plan(argv: list[str], capsys) -> str:
    assert train_entry("lora", "", argv + ["--dry_run"]) == 0
    captured = capsys.readouterr()
    assert "error" not in captured.err
    return captured.out


def test_command_line_steps_beat_file_epochs(tiny_train_args, tmp_path, capsys):
    toml_path = tmp_path / "run.toml"
    toml_path.write_text("[training]\nmax_train_epochs = 400\nmax_token_length = 225\n")
    steps = tiny_train_args.index("--max_train_steps")
    args = tiny_train_args[:steps] + tiny_train_args[steps + 2:] + ["--config_file", str(toml_path)]
    # The file alone: its epochs set the budget (as before).
    assert "set by max_train_epochs = 400" in _plan(args, capsys)
    # --max_train_steps on the command line: the file's max_train_epochs is dropped; the command line wins.
    plan = _plan(args + ["--max_train_steps", "3", "--output_name", "mine"], capsys)
    assert "3 optimisation steps" in plan and f"output {tmp_path / 'out' / 'mine.safetensors'}" in plan
    # Both on the command line: epochs override steps, as without a file.
    assert "set by max_train_epochs = 2" in _plan(args + ["--max_train_steps", "3", "--max_train_epochs", "2"], capsys)
    # An optional value of the file unset from the command line.
    config = parse_config(TrainConfig, args + ["--max_train_epochs", "none", "--max_token_length", "None"])
    assert (config.max_train_epochs, config.max_token_length, config.max_train_steps) == (None, None, 1600)
    sources = value_sources(config)
    assert sources["max_train_epochs"] == "command line" and sources["max_token_length"] == "command line"


def test_value_sources_and_load_config_twin(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nsplit_manifest = "s.json"\nmax_train_epochs = 9\n'
                    "network_dim = 8\n")
    cli = parse_config(TrainConfig, ["--config_file", str(path), "--max_train_steps", "7", "--seed", "2"])
    typed = load_config(TrainConfig, path, {"max_train_steps": 7, "seed": 2})
    assert dataclasses.asdict(cli) == dataclasses.asdict(typed) and cli == typed
    assert (cli.max_train_steps, cli.max_train_epochs, cli.network_dim) == (7, None, 8)
    sources = value_sources(cli)
    assert sources["seed"] == "command line" and sources["network_dim"] == str(path)
    assert sources["learning_rate"] == "default"
    assert sources["max_train_epochs"].startswith(f"default ({path}'s value dropped: command line sets max_train_steps")
    assert value_sources(typed)["seed"] == "overrides"
    # Mixing nothing keeps everything as it was: the file's epochs override its own steps.
    path.write_text(path.read_text() + "max_train_steps = 5\n")
    config = parse_config(TrainConfig, ["--config_file", str(path), "--seed", "2"])
    assert (config.max_train_steps, config.max_train_epochs) == (5, 9)


def test_optional_text_is_unset_by_an_empty_value(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('pretrained_model_name_or_path = "m"\nsplit_manifest = "s.json"\nlogging_dir = "logs"\n'
                    'output_name = "x"\n')
    config = parse_config(TrainConfig, ["--config_file", str(path), "--logging_dir", "", "--output_name", "none"])
    assert config.logging_dir is None and config.output_name == "none"  # "none" may be a real name
    assert parse_flags(TrainConfig, ["--max_train_epochs", "none"]) == {"max_train_epochs": None}


# ---------------------------------------------------------------------------------------------------------
# Case 4: make_split.py's output
# ---------------------------------------------------------------------------------------------------------


def _dataset(root: Path, n: int = 12) -> Path:
    from PIL import Image  # noqa: PLC0415

    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    return root


def test_make_split_output_is_checked(tmp_path, capsys):
    make_split = _script("make_split").main
    data = _dataset(tmp_path / "d")
    sizes = ["--member_aux", "2", "--member_test", "2", "--nonmember_aux", "2", "--nonmember_test", "2"]
    args = ["--dataset_dir", str(data), "--seed", "0"] + sizes
    folder = tmp_path / "folder"
    folder.mkdir()
    assert make_split(args + ["--output", str(folder)]) == 2
    assert "--output" in one_error_line(capsys.readouterr().err) and list(folder.iterdir()) == []
    bad_seed = args[:args.index("--seed")] + ["--seed", "-1"] + args[args.index("--seed") + 2:]
    assert make_split(bad_seed + ["--output", str(tmp_path / "s.json")]) == 2
    assert "--seed must be an integer >= 0" in capsys.readouterr().err
    out = tmp_path / "new" / "split.json"
    assert make_split(args + ["--output", str(out)]) == 0  # a missing parent folder is created
    first = out.read_bytes()
    capsys.readouterr()
    assert make_split(args[:-1] + ["3", "--output", str(out)]) == 2  # another split: refused, file kept
    line = one_error_line(capsys.readouterr().err)
    assert "already exists; pass --overwrite" in line and out.read_bytes() == first
    assert make_split(args[:-1] + ["3", "--output", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != first
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert make_split(args + ["--output", str(blocker / "split.json")]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err) and blocker.read_text() == "x"


def test_the_leftovers_of_a_killed_make_split_are_swept_by_the_next_run(tmp_path, capsys):
    """A make_split.py killed before its rename leaves ``.<name>.<random>.tmp`` beside --output (no lock sweeps that
    folder): the next run of it removes them, and nothing of another name."""
    data = _dataset(tmp_path / "d")
    out = tmp_path / "split.json"
    for leftover in (".split.json.k1ll3d.tmp", ".split.json.x2.tmp", ".split.json.v2.abc.tmp", ".other.json.x3.tmp"):
        (tmp_path / leftover).write_text("{half a manifest")
    args = ["--dataset_dir", str(data), "--seed", "0", "--output", str(out), "--member_aux", "2", "--member_test",
            "2", "--nonmember_aux", "2", "--nonmember_test", "2"]
    assert _script("make_split").main(args) == 0
    err = capsys.readouterr().err
    assert "warning: removed 2 leftover(s) of an interrupted write of" in err and ".split.json.k1ll3d.tmp" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.x3.tmp", ".split.json.v2.abc.tmp", "d",
                                                          "split.json"]


def test_a_make_tiny_model_killed_between_its_renames_is_undone_by_the_next_run(tmp_path, capsys):
    """``--overwrite`` killed between replace_dir's two renames leaves the older model hidden in
    ``.tiny.old.<random>.tmp/tiny`` and the new one staged: the next run puts the older one back (so without
    --overwrite it is refused as before) and removes the temporaries, also those of --single_file."""
    script = _script("make_tiny_model")
    aside = tmp_path / ".tiny.old.k1ll3d.tmp" / "tiny"
    aside.mkdir(parents=True)
    (aside / "model_index.json").write_text("{}")  # the older model, moved aside by the first rename
    (tmp_path / ".tiny.abc123.tmp").mkdir()  # the new one, staged
    (tmp_path / ".tiny.safetensors.x1.tmp").write_bytes(b"half a file")
    (tmp_path / ".other.x2.tmp").mkdir()  # another writer's: kept
    argv = ["--output_dir", str(tmp_path / "tiny"), "--single_file", str(tmp_path / "tiny.safetensors")]
    assert run_cli(script.main, argv) == 2
    err = capsys.readouterr().err
    assert f"put back the older {tmp_path / 'tiny'} it had moved aside" in err and "already exists" in err
    assert (tmp_path / "tiny" / "model_index.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x2.tmp", "tiny"]
    assert run_cli(script.main, argv + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x2.tmp", "tiny", "tiny.safetensors"]


def test_prepare_manifest_is_checked(tmp_path, capsys):
    folder = tmp_path / "manifest_dir"
    folder.mkdir()
    argv = ["--source", str(tmp_path / "src"), "--output_dir", str(tmp_path / "out"), "--manifest", str(folder)]
    assert run_cli(pokemon.main, argv) == 2
    assert "--manifest" in one_error_line(capsys.readouterr().err) and not (tmp_path / "out").exists()
    existing = tmp_path / "split.json"
    existing.write_text("{}")
    assert run_cli(pokemon.main, argv[:-1] + [str(existing)]) == 2
    assert "already exists; pass --overwrite" in one_error_line(capsys.readouterr().err)
    assert existing.read_text() == "{}"


# ---------------------------------------------------------------------------------------------------------
# Case 6: numeric bounds declared on a field
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bounded:
    seed: int = option(0, "seed", minimum=0, maximum=2**63 - 1)
    rate: float = option(0.5, "a rate", minimum=0.0, maximum=1.0)
    steps: list[int] = option([1], "steps", minimum=1)
    limit: Optional[int] = option(None, "an optional limit", maximum=10)


@pytest.mark.parametrize("argv, message", [
    (["--seed", str(2**64)], f"'seed' must be in [0, {2**63 - 1}], got {2**64}"),
    (["--seed", "-1"], "'seed' must be in [0, "),
    (["--rate", "nan"], "'rate' must be a finite number, got nan"),
    (["--rate", "-1e-3"], "'rate' must be in [0.0, 1.0], got -0.001"),  # a value, not a flag, in exponent form
    (["--steps", "3", "0"], "'steps' must be >= 1, got 0"),
    (["--limit", "11"], "'limit' must be <= 10, got 11"),
])
def test_option_bounds(argv, message, tmp_path, capsys):
    assert run_cli(lambda a: parse_config(Bounded, a), argv) == 2
    assert message in one_error_line(capsys.readouterr().err)
    path = tmp_path / "b.toml"
    path.write_text("rate = 1.5\n")
    with pytest.raises(ConfigError, match=r"'rate' must be in \[0.0, 1.0\], got 1.5"):
        parse_config(Bounded, ["--config_file", str(path)])
    with pytest.raises(ConfigError, match="'seed' must be in"):
        load_config(Bounded, None, {"seed": -5})


def test_option_bounds_accept_the_edges_and_none():
    config = parse_config(Bounded, ["--seed", str(2**63 - 1), "--rate", "1", "--limit", "none", "--steps", "1", "9"])
    assert (config.seed, config.rate, config.limit, config.steps) == (2**63 - 1, 1.0, None, [1, 9])
