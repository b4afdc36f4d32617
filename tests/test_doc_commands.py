"""The documented commands run: every flag a doc passes to one of our entry points is one its parser takes.

What is checked, in README.md, docs/*.md (fenced ``bash``/plain blocks and inline code spans) and the module
docstrings of the entry points (root ``*.py``, ``scripts/*.py``, ``bench/*.py``):

* a command of ours (``python``/``python3``/``.venv/bin/python``/``$PYTHON``, ``accelerate launch [its options]``,
  ``torchrun [its options]``, ``bash``/``sh`` or the script path alone) names a script that exists, where the path
  is under ``scripts/`` or ``bench/`` or something runs it (a bare missing ``x.py`` in prose may be another
  tool's: sd-scripts' ``train_db.py``);
* each ``--flag`` (or ``--flag=value``) it passes is an option string of the script's argparse parser, and its
  literal values convert with the flag's type and are among its choices; ``EXTRA_ARGS="..."`` / ``EVAL_ARGS="..."`` (the
  launchers') are checked against the training / evaluation parser; a shell script that hands ``"$@"`` to a
  Python script (``scripts/demo.sh``) is checked against that script's parser;
* a value naming a file under configs/, scripts/, bench/, library/, docs/, networks/ or tests/ exists;
* an environment variable set for a ``bash scripts/...sh`` command is read by that script (or a .sh it sources).

What is not: placeholder values (``--threads N``: an upper-case word), missing values and required flags (prose
quotes partial commands), flags named in prose or comments outside a command, other tools' commands (pip, git,
ruff, pytest via ``-m``), fragments that start with ``...``, and anything after ``git checkout <commit>`` on the
same line (a past measurement, run with that commit's flags). Placeholders (``<x>``, ``$VAR``, ``*``, ``...``,
``{a,b}``) are never checked as flags or paths.

The parsers are the scripts' own: each script is run in-process with ``--help`` until its parser reads
``sys.argv``, where it is captured and the script stops (nothing after the parse runs); a parse of an
explicit list before that (a sweep file's flags) goes through as usual.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import io
import os
import re
import runpy
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # an inline code span, wrapped at most once
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PYTHON = re.compile(r"^(?:\S*/)?python3?$|^\$\{?PYTHON\}?$")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"[<>$*…{}]|\.\.\.")
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
TRACKED_DIRS = ("configs/", "scripts/", "bench/", "library/", "docs/", "networks/", "tests/")
LAUNCHER_VARIABLES = {"EXTRA_ARGS": "train_smp_lora.py", "EVAL_ARGS": "evaluate_mia.py"}
UPPER_WORD = re.compile(r"^[A-Z][A-Z0-9_]*$")
PLACEHOLDER_FLAGS = {"--flag", "--no-flag"}  # "[--flag value ...]" in usage lines


@dataclasses.dataclass
class Command:
    """One invocation of a script: where it is written, the script's path, its arguments and its env assignments."""

    where: str
    entry: str | None
    args: list[str]
    env: dict[str, str]
    launched: bool  # by python, accelerate, bash ...: not a bare path in prose


# --- extraction ----------------------------------------------------------------------------------------------


def _block_lines(block: str, first: int) -> Iterator[tuple[int, str]]:
    """The lines of a code block with ``\\`` continuations joined, each with the number of its first line."""
    pending, start = "", first
    for number, line in enumerate(block.splitlines(), first):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def markdown_lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, shell line)`` of the shell code blocks, then of the inline code spans, of a markdown text."""
    for match in FENCE.finditer(text):
        if match.group(1) in SHELL_LANGS:
            yield from _block_lines(match.group(2), text.count("\n", 0, match.start(2)) + 1)
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers, no blocks
    for match in SPAN.finditer(prose):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1).replace("\n", " ")


def docstring_lines(source: str) -> Iterator[tuple[int, str]]:
    """The lines of a module docstring (``Usage:`` dropped), numbered from the docstring's first line."""
    doc = ast.get_docstring(ast.parse(source)) or ""
    for number, line in _block_lines(doc, 1):
        yield number, re.sub(r"^\s*Usage:\s*", "", line)


def segments(line: str) -> Iterator[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``|``, ``;`` ...), comments dropped; none after
    ``git checkout`` (what follows runs another commit's code)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return
    current: list[str] = []
    for token in [*tokens, ";"]:
        if token not in SEPARATORS:
            current.append(token)
            continue
        if current[:2] == ["git", "checkout"]:
            return
        if current:
            yield current
        current = []


def _script_and_args(tokens: list[str]) -> tuple[str | None, list[str], bool]:
    """``(script, its arguments, whether an interpreter or launcher runs it)`` of a command's words after the env
    assignments; no script: ``(None, [], False)``."""
    head, rest = (tokens[0], tokens[1:]) if tokens else ("", [])
    launched = True
    if PYTHON.match(head):
        if rest[:1] in (["-m"], ["-c"]):  # a module (pytest, pip) or inline code: not an entry script
            return None, [], False
        rest = rest[next((i for i, t in enumerate(rest) if not t.startswith("-")), len(rest)):]
    elif head in ("accelerate", "torchrun"):  # the launcher's own options run up to the script
        rest = rest[next((i for i, t in enumerate(rest) if t.endswith(".py")), len(rest)):]
    elif head not in ("bash", "sh"):
        rest, launched = tokens, False
    if rest and rest[0].endswith((".py", ".sh")):
        return rest[0].removeprefix("./"), rest[1:], launched
    return None, [], False


def parse_command(tokens: list[str], where: str) -> Command:
    """The :class:`Command` of one simple command's words."""
    count = next((i for i, t in enumerate(tokens) if not ENV_ASSIGNMENT.match(t)), len(tokens))
    env = dict(t.split("=", 1) for t in tokens[:count])
    entry, args, launched = _script_and_args(tokens[count:])
    return Command(where, entry, args, env, launched)


def commands_in(lines: Iterator[tuple[int, str]], name: str) -> list[Command]:
    """Every command (with or without a script) of numbered shell lines from the file ``name``."""
    return [parse_command(tokens, f"{name}:{number}") for number, line in lines for tokens in segments(line)]


def documented_commands() -> list[Command]:
    """The commands of README.md, docs/*.md and the entry points' docstrings."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        found += commands_in(markdown_lines(path.read_text(encoding="utf-8")), str(path.relative_to(REPO)))
    for path in entry_points():
        found += commands_in(docstring_lines(path.read_text(encoding="utf-8")), str(path.relative_to(REPO)))
    return found


def entry_points() -> list[Path]:
    return sorted([*REPO.glob("*.py"), *REPO.glob("scripts/*.py"), *REPO.glob("bench/*.py")])


# --- the parsers -----------------------------------------------------------------------------------------------


class _Captured(BaseException):
    """Raised at the script's own parse (a BaseException: ``run_cli`` lets it through)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


@functools.cache
def entry_parser(script: str) -> argparse.ArgumentParser | None:
    """The argparse parser ``script`` (a path relative to the repository) builds, or None where it has none."""
    path = REPO / script
    if not path.is_file() or path.suffix != ".py" or not re.search(r"^(?:from|import) (?:library|argparse)\b",
                                                                    path.read_text(encoding="utf-8"), re.MULTILINE):
        return None  # not an argparse CLI of ours: running it might do its work
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        if args is None or list(args) == ["--help"]:  # the script's own parse of its command line
            raise _Captured(self)
        return original(self, args, namespace)

    saved_env, saved_argv = dict(os.environ), sys.argv
    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [str(path), "--help"]  # should the capture miss, argparse prints the help and exits: no work done
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except _Captured as captured:
        return captured.parser
    except SystemExit:
        return None
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
        for name in set(os.environ) - set(saved_env):  # the scripts set HF_HUB_OFFLINE & co.: keep ours as it was
            del os.environ[name]
        os.environ.update(saved_env)
    return None


@functools.cache
def forwarded_script(shell_script: str) -> str | None:
    """The Python script a shell script hands its arguments to (``... scripts/demo.py "$@"``), if any."""
    match = re.search(r"""(?:\$\w+|\$\{\w+\}|"\$\w+")?/?([\w/]+\.py)"?\s+"\$@\"""",
                      (REPO / shell_script).read_text(encoding="utf-8"))
    return match.group(1) if match else None


# --- the checks ------------------------------------------------------------------------------------------------


def _values(args: list[str], index: int, action: argparse.Action) -> list[str]:
    """The literal words given to the flag at ``args[index]``."""
    flag = args[index]
    if "=" in flag:
        return [flag.split("=", 1)[1]]
    following = []
    for word in args[index + 1:]:
        if word.startswith("-"):
            break
        following.append(word)
    return following if action.nargs in ("*", "+") else following[:1] if action.nargs in (None, "?") else []


def flag_problems(script: str, args: list[str], where: str) -> list[str]:
    """What in ``args`` the parser of ``script`` would refuse: unknown flags, and literal values of a wrong type or
    outside the flag's choices."""
    parser = entry_parser(script)
    flags = [i for i, a in enumerate(args) if a.strip("[").startswith("--") and len(a.strip("[")) > 2]
    if parser is None:
        return [f"{where}: {script} takes no flags (no argparse parser), given {args[flags[0]]}"] if flags else []
    words = [a.strip("[]") for a in args]
    problems = []
    for index in flags:
        name = words[index].split("=", 1)[0]
        if PLACEHOLDER.search(name) or name in PLACEHOLDER_FLAGS:
            continue
        action = parser._option_string_actions.get(name)
        if action is None:
            problems.append(f"{where}: {script} has no flag {name}")
            continue
        problems += [f"{where}: {script} {name}: {problem}" for value in _values(words, index, action)
                     if (problem := _value_problem(action, value))]
    return problems


def _value_problem(action: argparse.Action, value: str) -> str:
    """Why argparse would refuse a literal ``value`` of ``action`` (its type or its choices), or ``""``."""
    if PLACEHOLDER.search(value) or UPPER_WORD.match(value):  # "--threads N", "--sweep SWEEP": placeholders
        return ""
    try:
        converted = action.type(value) if callable(action.type) else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        return f"{value!r} is refused ({exc or 'not a ' + getattr(action.type, '__name__', 'valid value')})"
    if action.choices is not None and converted not in action.choices:
        return f"{value!r} is not one of {', '.join(map(str, action.choices))}"
    return ""


def _path_problems(command: Command) -> list[str]:
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a.strip("[]") for a in command.args]
    return [f"{command.where}: no such file {v}" for v in values
            if v.startswith(TRACKED_DIRS) and not PLACEHOLDER.search(v) and not (REPO / v).exists()]


def _env_problems(command: Command) -> list[str]:
    """Env variables set for a shell script that neither it nor a .sh it names reads (a renamed variable)."""
    script = REPO / command.entry
    text = script.read_text(encoding="utf-8")
    text += "".join(p.read_text(encoding="utf-8") for p in script.parent.glob("*.sh") if p.name in text)
    return [f"{command.where}: {command.entry} reads no {var}" for var in command.env
            if var not in LAUNCHER_VARIABLES and not re.search(r"\$\{?" + var + r"\b", text)]


def command_problems(command: Command) -> list[str]:
    """Everything wrong with one documented command (see the module docstring)."""
    problems = []
    for var, script in LAUNCHER_VARIABLES.items():
        if var in command.env and not PLACEHOLDER.search(command.env[var]):
            problems += flag_problems(script, shlex.split(command.env[var]), f"{command.where} ({var})")
    entry = command.entry
    if entry is None or not (entry.endswith(".sh") or "/" not in entry or entry.startswith(("scripts/", "bench/"))):
        return problems  # not one of ours (tests/x.py is a path, not a command)
    if PLACEHOLDER.search(entry):
        return problems
    if not (REPO / entry).is_file():  # a bare name in prose may be another tool's (sd-scripts' train_db.py)
        missing = "/" in entry or command.launched
        return problems + ([f"{command.where}: no such script {entry}"] if missing else [])
    problems += _path_problems(command)
    if entry.endswith(".sh"):
        problems += _env_problems(command)
        entry = forwarded_script(entry)
    if entry is not None:
        problems += flag_problems(entry, command.args, command.where)
    return problems


def problems_in_markdown(text: str, name: str = "doc.md") -> list[str]:
    return [p for c in commands_in(markdown_lines(text), name) for p in command_problems(c)]


# --- the tests -------------------------------------------------------------------------------------------------


def test_documented_commands_pass_only_flags_and_files_that_exist():
    commands = documented_commands()
    entries = {c.entry for c in commands}
    # The extractor finds the main commands at all (an empty list would pass every check below).
    assert {"train_smp_lora.py", "evaluate_mia.py", "scripts/demo.sh", "scripts/make_split.py"} <= entries
    problems = [p for c in commands for p in command_problems(c)]
    assert not problems, "stale documented commands:\n" + "\n".join(problems)


def test_a_made_up_flag_is_caught():
    doc = "Run\n\n```bash\npython evaluate_mia.py --split_manifest s.json --made_up_flag 3\n```\n"
    assert problems_in_markdown(doc) == ["doc.md:4: evaluate_mia.py has no flag --made_up_flag"]
    assert problems_in_markdown("Or `.venv/bin/python scripts/demo.py --retrian` once.") == [
        "doc.md:1: scripts/demo.py has no flag --retrian"]


def test_continuations_launcher_options_and_placeholders():
    doc = ("```bash\nMODEL=m accelerate launch --num_processes 2 train_smp_lora.py \\\n"
           "  --config_file configs/<yours>.toml --resolution $RES \\\n"
           "  --lambda_ 0.5   # a comment --not_a_flag\n```\n")
    assert problems_in_markdown(doc) == ["doc.md:2: train_smp_lora.py has no flag --lambda_"]


def test_launcher_variables_and_forwarded_arguments():
    doc = ('Add `EXTRA_ARGS="--resolution 256 --optimiser AdamW"` or `EVAL_ARGS=--attacks loss`; '
           "`bash scripts/demo.sh --set_size 100 --sett_size 1`.")
    assert problems_in_markdown(doc) == ["doc.md:1 (EXTRA_ARGS): train_smp_lora.py has no flag --optimiser",
                                         "doc.md:1: scripts/demo.py has no flag --sett_size"]


def test_paths_choices_and_environment():
    doc = ("```bash\npython scripts/make_split.py --preset no_such_preset --config configs/none/x.toml\n"
           "NO_SUCH_VAR=1 bash scripts/launch/pokemon.sh\npython scripts/no_such_script.py --x 1\n"
           "accelerate launch train_smp_lor.py --seed 1\n```\n")
    problems = problems_in_markdown(doc)
    assert problems[1].startswith("doc.md:2: scripts/make_split.py --preset: 'no_such_preset' is not one of ")
    assert problems[:1] + problems[2:] == [
        "doc.md:2: no such file configs/none/x.toml", "doc.md:2: scripts/make_split.py has no flag --config",
        "doc.md:3: scripts/launch/pokemon.sh reads no NO_SUCH_VAR",
        "doc.md:4: no such script scripts/no_such_script.py", "doc.md:5: no such script train_smp_lor.py"]


@pytest.mark.parametrize("line", [
    "pip install --no-deps torch==2.13.0 --index-url https://x",
    ".venv/bin/ruff check --select F,I library tests",
    "git checkout 9bf1198 && .venv/bin/python scripts/demo.py --old_flag 1",
    ".venv/bin/python -m pytest -q -p no:cacheprovider tests/test_x.py",
    "... --rediffuse_timestep 50",
    "train_db.py --some_sd_scripts_flag",
    "python train_<method>.py --flag value",
])
def test_other_tools_history_and_placeholders_are_left_alone(line):
    assert problems_in_markdown(f"```bash\n{line}\n```\n") == []


def test_values_of_the_wrong_type_are_caught_and_placeholders_are_not():
    doc = ("```bash\npython scripts/make_split.py --seed one --pretrain rest --member_aux N --output <out>\n"
           "accelerate launch train_smp_lora.py --network_dim 8.5 --privacy_lambda 0.5 --save_state\n```\n")
    problems = problems_in_markdown(doc)
    assert [p.split(" is refused")[0] for p in problems] == ["doc.md:2: scripts/make_split.py --seed: 'one'",
                                                            "doc.md:3: train_smp_lora.py --network_dim: '8.5'"]
