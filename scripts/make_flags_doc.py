#!/usr/bin/env python
"""Write docs/flags.md, the flag reference of every CLI, from the config dataclasses, so it cannot drift.

Usage: python scripts/make_flags_doc.py           # (re)write docs/flags.md
       python scripts/make_flags_doc.py --check   # exit 1 if docs/flags.md is not what the code says

Each CLI's flags are the fields of one dataclass (:mod:`library.config`): a field's name is the flag and the
TOML key, its ``option(...)`` metadata holds the help text and the allowed values. Fields are grouped by the
``# --- section ---`` comments of the class body (or by a ``section`` metadata entry, where a config has one).
``tests/test_docs.py`` fails when the file is stale: rerun this script after changing a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
DOC_PATH = REPO / "docs" / "flags.md"


@dataclasses.dataclass(frozen=True)
class Cli:
    """One configuration class and the entry scripts that parse it."""

    title: str
    scripts: str  # a glob relative to the repo root
    config: str  # "module:Class"
    note: str


CLIS = (
    Cli("Training", "train_*.py", "library.train.config:TrainConfig",
        "Every training script parses the same flags; each uses the ones of its method (the privacy section "
        "matters to MP-/SMP-LoRA, the baselines section to RelaxLoss and DP-SGD)."),
    Cli("Evaluation", "evaluate_mia.py", "library.eval.config:EvalConfig",
        "Membership-inference attacks and quality metrics (see docs/evaluation.md)."),
)

_SECTION = re.compile(r"^\s*#\s*-{2,}\s*(?P<name>.*?)\s*-*\s*$")
_FIELD = re.compile(r"^\s+(?P<name>[A-Za-z_]\w*)\s*:")


def _load(spec: str) -> type:
    module_name, _, class_name = spec.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _sections_from_source(cls: type) -> dict[str, str]:
    """``{field: section}`` read from the ``# --- name ---`` comments of ``cls`` and its dataclass bases."""
    sections: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        current = ""
        own = set(getattr(klass, "__annotations__", {}))
        for line in lines[1:]:
            match = _SECTION.match(line)
            if match:
                current = match.group("name")
                continue
            match = _FIELD.match(line)
            if match and match.group("name") in own:
                sections[match.group("name")] = current
    return sections


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if args and len(args) < len(typing.get_args(annotation)):  # Optional[X]
        return _type_name(args[0]) if len(args) == 1 else " or ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(_value(v) for v in value) if value else "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (``<output_dir>`` would otherwise render as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ").strip()


def _code(text: str) -> str:
    return text if text == "—" else "`" + text.replace("|", "\\|") + "`"


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None


def _flag(field: dataclasses.Field, annotation: Any) -> str:
    base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if base[0] is bool:
        return f"`--{field.name}` / `--no-{field.name}`"
    return f"`--{field.name}`"


def render_config(cli: Cli, repo: Path = REPO) -> list[str]:
    """The markdown of one CLI: a heading, its scripts and one table per section of its config."""
    cls = _load(cli.config)
    hints = typing.get_type_hints(cls)
    sections = _sections_from_source(cls)
    scripts = sorted(p.name for p in repo.glob(cli.scripts)) or [cli.scripts]
    module, _, name = cli.config.partition(":")
    lines = [f"## {cli.title}", "", f"Scripts: {', '.join(f'`{s}`' for s in scripts)}. Config class `{name}` in "
             f"`{module.replace('.', '/')}.py`. {cli.note}", ""]
    groups: dict[str, list[dataclasses.Field]] = {}
    for field in dataclasses.fields(cls):
        section = field.metadata.get("section") or sections.get(field.name, "")
        groups.setdefault(section, []).append(field)
    for section, fields in groups.items():
        if section:
            lines += [f"### {section[0].upper()}{section[1:]}", ""]
        lines += ["| flag | type | default | meaning |", "|---|---|---|---|"]
        for field in fields:
            annotation = hints[field.name]
            meaning = field.metadata.get("help", "")
            choices = field.metadata.get("choices")
            if choices:
                meaning += f" (one of: {', '.join(_value(c) for c in choices)})"
            lines.append(f"| {_flag(field, annotation)} | {_cell(_type_name(annotation))} | "
                         f"{_code(_value(_default(field)))} | {_cell(meaning)} |")
        lines.append("")
    return lines


def render(repo: Path = REPO) -> str:
    """The whole docs/flags.md."""
    lines = ["# Command-line flags", "",
             "<!-- Generated by scripts/make_flags_doc.py from the config dataclasses; do not edit by hand. -->", "",
             "Every flag is also a key of the TOML file given with `--config_file` (TOML tables such as `[data]` "
             "are flattened, so keys may be grouped freely); flags on the command line win over the file. "
             "Boolean flags take `--flag` / `--no-flag`; list flags take several values (`--timesteps 50 100`). "
             "A mistyped key, a wrong type or a value outside its choices is one `error:` line. "
             "`—` means no default (unset).", ""]
    for cli in CLIS:
        lines += render_config(cli, repo)
    return "\n".join(lines).rstrip("\n") + "\n"


def is_current(path: Path = DOC_PATH, repo: Path = REPO) -> bool:
    """True when ``path`` holds exactly what :func:`render` writes."""
    return path.is_file() and path.read_text(encoding="utf-8") == render(repo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale instead of writing it")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="default: docs/flags.md")
    args = parser.parse_args(argv)
    if args.check:
        if is_current(args.output):
            return 0
        print(f"{args.output} is stale: run python scripts/make_flags_doc.py", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
