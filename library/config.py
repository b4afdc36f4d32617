"""Typed run configuration: one dataclass is the single source of truth for CLI flags and TOML keys.

A field ``learning_rate: float = 1e-4`` becomes the flag ``--learning_rate`` and the TOML key
``learning_rate`` (sd-scripts' names, so a kohya user's TOML mostly just works). ``--config_file x.toml``
supplies defaults; flags given on the command line win. TOML tables (``[training]``, ``[privacy]`` ...)
are flattened, as sd-scripts does, so users may group keys under any of :data:`TOML_SECTIONS`.

The command line wins also over *related* keys: a config class may declare ``OVERRIDE_GROUPS``, tuples of
options that override one another (``("max_train_steps", "max_train_epochs")``: epochs, when set, replace
steps). A flag of such a group on the command line drops the TOML's values of the others, so
``--max_train_steps 100`` really trains 100 steps under a TOML that sets ``max_train_epochs``. An ``Optional``
value of the TOML is unset from the command line with ``none`` (``--max_train_epochs none``; an empty value
for text options: ``--resume ''``).

Every mistake gets one :class:`ConfigError` line: an unknown key or section (with the closest known one
suggested), a value of the wrong type, a value outside its choices or its ``minimum`` / ``maximum``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

import toml

from library.cli import ArgumentParser
from library.errors import ConfigError, warn
from library.foreign_keys import SiblingKeys

ConfigT = TypeVar("ConfigT")

#: The TOML tables a config file may group its keys under (a config class may replace them with its own
#: ``TOML_SECTIONS``): this project's (configs/*/*.toml use model, data, network, training, privacy and output),
#: then those of kohya sd-scripts' config files.
KOHYA_SECTIONS: tuple[str, ...] = (
    "general", "model_arguments", "additional_network_arguments", "optimizer_arguments", "dataset_arguments",
    "training_arguments", "sample_prompt_arguments", "saving_arguments", "logging_arguments",
)
TOML_SECTIONS: tuple[str, ...] = (
    "model", "data", "network", "training", "optimisation", "optimization", "privacy", "attacker", "baselines", "dreambooth",
    "smoothness", "output", "logging", "sampling", "evaluation", "features", "attacks", "quality", "metrics",
) + KOHYA_SECTIONS
COMMAND_LINE = "command line"
DEFAULT = "default"
_SOURCES_ATTR = "_value_sources"


def option(default: Any, help: str, choices: Sequence[Any] | None = None, *,
           minimum: float | None = None, maximum: float | None = None,
           parse: Callable[[str], Any] | None = None, path: bool = False) -> Any:
    """A dataclass field carrying its CLI help text, allowed values and numeric bounds (both inclusive).

    ``seed: int = option(0, "...", minimum=0, maximum=2**63 - 1)``: a value outside the bounds, from the command
    line, a TOML file or :func:`load_config`'s overrides, is one ConfigError line (``None`` is always allowed for
    an ``Optional`` field, and each item of a list is checked). ``parse``: how the text of a flag, or a TOML
    string, becomes the value (for forms like sd-scripts' ``resolution = "512,512"``); a ValueError from it is
    the error message. ``path``: a file or folder, whose leading ``~`` is the home folder wherever it is given (a
    shell expands it in ``--flag ~/x`` only, not in ``--flag=~/x`` or a TOML file, where an output path would
    otherwise become a folder named ``~``).
    """
    metadata = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "parse": parse,
                "path": path}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def square_size(text: str) -> int:
    """A square image size from its text: ``512`` or sd-scripts' ``512,512`` (width,height); other forms are a
    ValueError whose message says what to write."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        sizes = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"must be a size in pixels like 512 or 512,512, got {text!r}") from None
    if len(sizes) > 2 or len(set(sizes)) != 1:
        raise ValueError(f"must be square (images are resized and centre-cropped to one size; aspect-ratio "
                         f"bucketing is not supported), got {text!r}: use 512 or 512,512")
    return sizes[0]


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``Optional[int]`` -> (int, True); ``int`` -> (int, False)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """Check/convert one TOML value to the field's type, or raise a ConfigError naming the key."""
    base, optional = _unwrap_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{name}' must not be empty")
    if typing.get_origin(base) is list:
        (item_type,) = typing.get_args(base)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(name, v, item_type, source) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{name}' must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{name}' must be an integer, got {value!r}")
    if base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{source}: '{name}' must be a number, got {value!r}")
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: '{name}' must be a string, got {value!r}")
    raise AssertionError(f"unsupported config type {annotation!r} for {name}")


def _closest(word: str, known: Sequence[str], fmt: str) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {fmt.format(close[0])}?)" if close else ""


def _flatten_toml(data: dict[str, Any], source: str, sections: Sequence[str], prefix: str = "") -> dict[str, Any]:
    """The keys of every table, in one dict; a table not named in ``sections`` is an error (a typo, not a group)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            name = prefix + key
            if key not in sections:
                raise _unknown_section(name, sections, source)
            items = _flatten_toml(value, source, sections, name + ".").items()
        else:
            items = [(key, value)]
        for sub_key, sub_value in items:
            if sub_key in flat:
                raise ConfigError(f"{source}: key '{sub_key}' is given twice")
            flat[sub_key] = sub_value
    return flat


def _unknown_section(name: str, sections: Sequence[str], source: str) -> ConfigError:
    known = ", ".join(s for s in sections if s not in KOHYA_SECTIONS)
    if set(KOHYA_SECTIONS) <= set(sections):
        known += " and sd-scripts' general and *_arguments"
    hint = _closest(name.rsplit(".", 1)[-1], sections, "[{}]")
    return ConfigError(f"{source}: unknown section [{name}]{hint}; known sections: {known} (or put the keys "
                       "before any section)")


def _unknown_key_message(key: str, cls: type) -> str:
    return f"unknown key '{key}'" + _closest(key, list(_field_types(cls)), "'{}'")


def load_toml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a TOML config file into checked ``{field: value}`` for dataclass ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = toml.loads(path.read_text(encoding="utf-8"))
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    types_by_name = _field_types(cls)
    foreign = getattr(cls, "FOREIGN_KEYS", {})
    values: dict[str, Any] = {}
    unknown: dict[str, str] = {}  # every unknown key of the file in one message, not one per run
    for key, value in _flatten_toml(raw, str(path), getattr(cls, "TOML_SECTIONS", TOML_SECTIONS)).items():
        if key == "config_file":
            raise ConfigError(f"{path}: 'config_file' cannot be set inside a config file")
        if key in foreign and foreign[key].is_harmless(value):
            warn(f"{path}: '{key} = {value!r}' is ignored ({foreign[key].advice})")
        elif key in foreign:
            unknown[key] = f"'{key}' is an sd-scripts or diffusers option: {foreign[key].advice}"
        elif key not in types_by_name:
            unknown[key] = _unknown_key_message(key, cls)
        else:
            value = _parsed(cls, key, value, f"{path}: '{key}'")
            values[key] = _coerce(key, value, types_by_name[key], str(path))
    sibling: SiblingKeys | None = getattr(cls, "SIBLING_KEYS", None)
    if unknown and sibling is not None and (error := sibling.error(path, list(unknown))) is not None:
        raise error
    if unknown:
        raise ConfigError(f"{path}: " + "; ".join(unknown.values()))
    return values


def _parsed(cls: type, key: str, value: Any, where: str) -> Any:
    """A TOML or overrides ``value`` of field ``key``: a string read by the field's parse function (:func:`option`)
    if it has one, anything else as it is (the type check follows)."""
    parse = next((f.metadata.get("parse") for f in dataclasses.fields(cls) if f.name == key), None)
    if parse is None or not isinstance(value, str):
        return value
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class _ChoicesOrNone(tuple):
    """The choices of an ``Optional`` field: argparse's membership test also lets ``none`` (None) through,
    while ``--help`` and the error message list the real choices only."""

    def __contains__(self, item: object) -> bool:
        return item is None or tuple.__contains__(self, item)


def _cli_type(base: type, optional: bool, parse: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """argparse's converter of a field: ``base`` (or the field's ``parse`` function, whose ValueError message
    becomes argparse's), where ``none`` (numbers) or ``''`` gives None for Optional fields.

    Text options take only ``''`` as None: ``none`` may be a real name (``--output_name none``).
    """
    if not optional and parse is None:
        return base

    def convert(text: str) -> Any:
        if optional and (text == "" or (base is not str and text.strip().lower() == "none")):
            return None
        if parse is None:
            return base(text)
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = base.__name__  # argparse names the type in "invalid int value: 'x'"
    return convert


def _with_default(help_text: str, f: dataclasses.Field) -> str:
    """``help_text`` ending in "(default: X)" (the parser's own defaults are suppressed, see :func:`build_parser`),
    unless the help already says its default or there is none to show."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return help_text
    if default in (None, "", [], False) or "(default:" in help_text:
        return help_text
    shown = "on" if default is True else " ".join(map(str, default)) if isinstance(default, list) else default
    return f"{help_text} (default: {shown})"


def build_parser(cls: type, description: str, **parser_kwargs: Any) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (plus ``--config_file``); parse errors are ConfigErrors.

    Flags not given are absent from the parsed namespace (``argparse.SUPPRESS``): defaults are applied later,
    TOML first, then the dataclass's.
    """
    parser = ArgumentParser(description=description, allow_abbrev=False, foreign=getattr(cls, "FOREIGN_KEYS", None),
                            **parser_kwargs)
    parser.add_argument("--config_file", type=str, default=None, help="TOML file holding any of the flags below")
    types_by_name = _field_types(cls)
    for f in dataclasses.fields(cls):
        base, optional = _unwrap_optional(types_by_name[f.name])
        help_text = _with_default(f.metadata.get("help", ""), f).replace("%", "%%")  # argparse formats with %
        choices = f.metadata.get("choices")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if base is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            parser.add_argument(f"--{f.name}", type=item_type, nargs="*", choices=choices, **kwargs)
            continue
        if choices and optional:
            choices = _ChoicesOrNone(choices)
        parser.add_argument(f"--{f.name}", type=_cli_type(base, optional, f.metadata.get("parse")), choices=choices,
                            **kwargs)
    return parser


def parse_config(cls: type[ConfigT], argv: Sequence[str] | None, description: str = "") -> ConfigT:
    """Parse ``argv`` (CLI flags, optionally ``--config_file``) into an instance of dataclass ``cls``."""
    given = vars(build_parser(cls, description).parse_args(argv))
    config_file = given.pop("config_file")
    file_values = load_toml(config_file, cls) if config_file else {}
    return _combine(cls, file_values, str(config_file), given, COMMAND_LINE)


def _combine(cls: type[ConfigT], file_values: dict[str, Any], file_source: str, given: Mapping[str, Any],
             given_source: str) -> ConfigT:
    """``given`` on top of ``file_values``, less the file's values that a given member of an override group drops."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for group in getattr(cls, "OVERRIDE_GROUPS", ()):
        setter = next((name for name in group if name in given), None)
        for name in group:
            if setter is not None and name not in given and name in file_values:
                del file_values[name]
                sources[name] = f"{DEFAULT} ({file_source}'s value dropped: {given_source} sets {setter})"
    for name, value in file_values.items():
        values[name], sources[name] = value, file_source
    for name, value in given.items():
        values[name], sources[name] = value, given_source
    return make_config(cls, values, sources)


def _check_finite(name: str, value: Any, annotation: Any) -> None:
    """No option means anything by NaN or infinity (a NaN passes every ``<`` check and switches features off
    silently; an infinite noise multiplier hangs the DP accountant): one ConfigError line for either."""
    base, _ = _unwrap_optional(annotation)
    if base is float or (typing.get_origin(base) is list and typing.get_args(base) == (float,)):
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not math.isfinite(item):
                raise ConfigError(f"'{name}' must be a finite number, got {item!r}")


def _check_bounds(f: dataclasses.Field, value: Any) -> None:
    minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
    if value is None or (minimum is None and maximum is None):
        return
    for item in value if isinstance(value, list) else [value]:
        low_ok = minimum is None or item >= minimum  # written so that NaN fails both
        high_ok = maximum is None or item <= maximum
        if low_ok and high_ok:
            continue
        if minimum is not None and maximum is not None:
            bound = f"in [{minimum}, {maximum}]"
        else:
            bound = f">= {minimum}" if minimum is not None else f"<= {maximum}"
        raise ConfigError(f"'{f.name}' must be {bound}, got {item!r}")


def make_config(cls: type[ConfigT], values: dict[str, Any], sources: Mapping[str, str] | None = None) -> ConfigT:
    """Build ``cls(**values)`` checking choices, bounds and required fields; run ``cls.validate()`` if present.

    ``sources`` (``{field: where its value came from}``) is kept for :func:`value_sources`.
    """
    types_by_name = _field_types(cls)
    for key in values:
        if key not in types_by_name:
            raise ConfigError(f"unknown option '{key}'")
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and f.name in values and values[f.name] is not None:
            given = values[f.name] if isinstance(values[f.name], list) else [values[f.name]]
            for item in given:
                if item not in choices:
                    source = (sources or {}).get(f.name, COMMAND_LINE)
                    where = "" if source == COMMAND_LINE else f"{source}: "  # a file's value: name the file
                    raise ConfigError(f"{where}'{f.name}' must be one of {list(choices)}, got {item!r}"
                                      f"{_closest(str(item), [str(c) for c in choices], '{!r}')}")
        if f.name in values:
            _check_finite(f.name, values[f.name], types_by_name[f.name])
            _check_bounds(f, values[f.name])
            if f.metadata.get("path") and values[f.name] is not None:
                value = values[f.name]
                values[f.name] = [os.path.expanduser(v) for v in value] if isinstance(value, list) else \
                    os.path.expanduser(value)
    config = cls(**values)
    if sources is not None:
        # Not a field: equality, asdict() and run records are unchanged.
        object.__setattr__(config, _SOURCES_ATTR,
                           {f.name: sources.get(f.name, DEFAULT) for f in dataclasses.fields(cls)})
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def value_sources(config: Any) -> dict[str, str]:
    """``{field: source}`` of a config built by :func:`parse_config` / :func:`load_config`, else ``{}``.

    A source is ``"command line"``, the TOML file's path, ``"overrides"`` (:func:`load_config`) or ``"default"``
    (with a note when an override group dropped the file's value), e.g. for a ``--dry_run`` plan.
    """
    return dict(getattr(config, _SOURCES_ATTR, {}))


def load_config(cls: type[ConfigT], config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> ConfigT:
    """``config_file`` (TOML, optional) plus ``overrides`` (``{field: value}``) -> a checked instance of ``cls``.

    The typed twin of :func:`parse_config`: ``load_config(C, "x.toml", {"seed": 3})`` equals
    ``parse_config(C, ["--config_file", "x.toml", "--seed", "3"])`` (same defaults, checks and precedence: an
    override beats the file, also the file's other members of its override group; the file beats the dataclass
    default). Values are checked and converted as TOML values are (an ``int`` for a ``float`` field becomes a
    float); paths are accepted for string fields.
    """
    file_values = load_toml(config_file, cls) if config_file else {}
    given = {key: typed_value(cls, key, value) for key, value in (overrides or {}).items()}
    return _combine(cls, file_values, str(config_file), given, "overrides")


def typed_value(cls: type, key: str, value: Any, source: str = "overrides") -> Any:
    """``value`` of field ``key`` checked and converted as a TOML value is (a ConfigError line naming ``source``
    otherwise); paths are accepted for string fields."""
    types_by_name = _field_types(cls)
    if key not in types_by_name:
        raise ConfigError(f"{source}: {_unknown_key_message(key, cls)}")
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    elif isinstance(value, (list, tuple)):
        value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    value = _parsed(cls, key, value, f"{source}: '{key}'")  # as in a TOML file
    return _coerce(key, value, types_by_name[key], source)


def parse_flags(cls: type, argv: Sequence[str], source: str = "flags") -> dict[str, Any]:
    """Command-line flags of ``cls`` (e.g. ``["--seed", "3", "--no-progress_bar"]``) as typed ``{field: value}``.

    Only the flags given appear (the last one wins, as on a command line; ``none`` gives an explicit None), ready
    for :func:`load_config`'s ``overrides``; a bad flag is one ConfigError line starting with ``source``.
    """
    parser = build_parser(cls, "", error_prefix=f"{source}: ", help_hint=None)
    given = vars(parser.parse_args(list(argv)))
    if given.pop("config_file") is not None:
        raise ConfigError(f"{source}: '--config_file' cannot be given here")
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of the config (for run records)."""
    return dataclasses.asdict(config)
