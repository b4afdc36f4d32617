"""Typed run configuration: one dataclass is the single source of truth for CLI flags and TOML keys.

A field ``learning_rate: float = 1e-4`` becomes the flag ``--learning_rate`` and the TOML key
``learning_rate`` (sd-scripts' names, so a kohya user's TOML mostly just works). ``--config_file x.toml``
supplies defaults; flags given on the command line win. TOML tables (``[training]``, ``[privacy]`` ...)
are flattened, as sd-scripts does, so users may group keys however they like.

Every mistake gets one :class:`ConfigError` line: an unknown key (with the closest known key suggested),
a value of the wrong type, a value outside its choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence, TypeVar, Union

import toml

from library.errors import ConfigError

ConfigT = TypeVar("ConfigT")


def option(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """A dataclass field carrying its CLI help text (and allowed values)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


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


def _flatten_toml(data: dict[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = _flatten_toml(value, source).items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            if sub_key in flat:
                raise ConfigError(f"{source}: key '{sub_key}' is given twice")
            flat[sub_key] = sub_value
    return flat


def _unknown_key(key: str, cls: type, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_field_types(cls)), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{source}: unknown key '{key}'{hint}")


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
    values: dict[str, Any] = {}
    for key, value in _flatten_toml(raw, str(path)).items():
        if key == "config_file":
            raise ConfigError(f"{path}: 'config_file' cannot be set inside a config file")
        if key not in types_by_name:
            raise _unknown_key(key, cls, str(path))
        values[key] = _coerce(key, value, types_by_name[key], str(path))
    return values


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field (plus ``--config_file``)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config_file", type=str, default=None, help="TOML file holding any of the flags below")
    for f in dataclasses.fields(cls):
        annotation = _field_types(cls)[f.name]
        base, _ = _unwrap_optional(annotation)
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        choices = f.metadata.get("choices")
        # Defaults are applied later (TOML first, then dataclass), so argparse defaults stay None.
        kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": f.name}
        if base is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            parser.add_argument(f"--{f.name}", type=item_type, nargs="*", choices=choices, **kwargs)
            continue
        parser.add_argument(f"--{f.name}", type=base, choices=choices, **kwargs)
    return parser


def parse_config(cls: type[ConfigT], argv: Sequence[str] | None, description: str = "") -> ConfigT:
    """Parse ``argv`` (CLI flags, optionally ``--config_file``) into an instance of dataclass ``cls``."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config_file:
        values.update(load_toml(args.config_file, cls))
    for f in dataclasses.fields(cls):
        cli_value = getattr(args, f.name)
        if cli_value is not None:
            values[f.name] = cli_value
    return make_config(cls, values)


def make_config(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
    """Build ``cls(**values)`` checking choices and required fields; run ``cls.validate()`` if present."""
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
                    raise ConfigError(f"'{f.name}' must be one of {list(choices)}, got {item!r}")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def load_config(cls: type[ConfigT], config_file: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> ConfigT:
    """``config_file`` (TOML, optional) plus ``overrides`` (``{field: value}``) -> a checked instance of ``cls``.

    The typed twin of :func:`parse_config`: ``load_config(C, "x.toml", {"seed": 3})`` equals
    ``parse_config(C, ["--config_file", "x.toml", "--seed", "3"])`` (same defaults, checks and precedence: an
    override beats the file, the file beats the dataclass default). Values are checked and converted as TOML
    values are (an ``int`` for a ``float`` field becomes a float); paths are accepted for string fields.
    """
    values = load_toml(config_file, cls) if config_file else {}
    types_by_name = _field_types(cls)
    for key, value in (overrides or {}).items():
        if key not in types_by_name:
            raise _unknown_key(key, cls, "overrides")
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif isinstance(value, (list, tuple)):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        values[key] = _coerce(key, value, types_by_name[key], "overrides")
    return make_config(cls, values)


def parse_flags(cls: type, argv: Sequence[str], source: str = "flags") -> dict[str, Any]:
    """Command-line flags of ``cls`` (e.g. ``["--seed", "3", "--no-progress_bar"]``) as typed ``{field: value}``.

    Only the flags given appear (the last one wins, as on a command line), ready for :func:`load_config`'s
    ``overrides``; a bad flag is one ConfigError line naming ``source`` (argparse would exit instead).
    """
    parser = build_parser(cls, "")

    def error(message: str) -> NoReturn:
        raise ConfigError(f"{source}: {message}")

    parser.error = error  # type: ignore[method-assign]  # argparse reports every parse error through it
    args = parser.parse_args(list(argv))
    if args.config_file is not None:
        raise ConfigError(f"{source}: '--config_file' cannot be given here")
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name) is not None}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of the config (for run records)."""
    return dataclasses.asdict(config)
