"""A sweep file (``configs/frontier/*.toml``): the training runs of the privacy-utility frontier.

Each ``[[run]]`` names a method, the knob it sweeps, its values and extra training flags; each (method, value) is
one :class:`SweepRun`, whose ``overrides`` go on top of the demo's ``configs/tiny/<config>.toml``. Read by the
frontier (:mod:`library.demo.frontier`, every run) and by the demo (:mod:`library.demo.run`, which trains the one
run the frontier found best).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.config import parse_flags, typed_value
from library.errors import ConfigError
from library.train.config import ALL_METHODS, TrainConfig

SWEEP_KEYS = {"method", "label", "knob", "values", "flags", "save_every_n_epochs"}


@dataclass
class SweepRun:
    """One training run of the sweep (one LoRA file, or several when plain LoRA saves checkpoints)."""

    name: str
    method: str
    label: str  # the curve it belongs to
    knob: str
    value: Any
    overrides: dict[str, Any]  # TrainConfig fields on top of configs/tiny: the run's flags, then knob = value
    save_every_n_epochs: int | None = None


def _flag_value(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def read_sweep(path: Path) -> list[SweepRun]:
    """The runs of a sweep file; unknown keys, unknown methods and duplicate names are one ConfigError line."""
    import toml

    try:
        doc = toml.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, toml.TomlDecodeError) as exc:
        raise ConfigError(f"sweep file {path}: {exc}") from None
    entries = doc.get("run")
    if not isinstance(entries, list) or not entries or set(doc) - {"run"}:
        raise ConfigError(f"sweep file {path}: expected only [[run]] tables")
    runs: list[SweepRun] = []
    for i, entry in enumerate(entries, 1):
        unknown = set(entry) - SWEEP_KEYS
        if unknown:
            raise ConfigError(f"sweep file {path}, run {i}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SWEEP_KEYS)}")
        method = entry.get("method")
        if method not in ALL_METHODS:
            raise ConfigError(f"sweep file {path}, run {i}: 'method' must be one of {', '.join(ALL_METHODS)}")
        label, knob = entry.get("label", method), entry.get("knob", "epochs")
        flags = parse_flags(TrainConfig, [str(f) for f in entry.get("flags", [])], f"sweep file {path}, run {i}")
        every = entry.get("save_every_n_epochs")
        values = entry.get("values")
        if values is None:  # one run; its checkpoints (if any) are the points
            runs.append(SweepRun(label, method, label, knob, None, flags, every))
            continue
        where = f"sweep file {path}, run {i} ({label})"
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: 'values' must be a list of the knob's values, e.g. values = [1.0, 2.0]")
        for value in values:  # each value as the training reads it: a typo'd knob or a bad value fails now
            typed = typed_value(TrainConfig, knob, value, where)
            suffix = "_".join(_flag_value(value)).replace(".", "p").replace("-", "m")
            runs.append(SweepRun(f"{label}-{knob}{suffix}", method, label, knob, value, {**flags, knob: typed}, every))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep file {path}: two runs are both named {next(n for n in names if names.count(n) > 1)!r}; "
                          "give them different labels")
    return runs


def sweep_run(path: Path, name: str) -> SweepRun:
    """The run of a sweep file called ``name`` (``<label>-<knob><value>``, e.g. ``smp_t_band-privacy_lambda2p0``);
    one ConfigError line listing the names there are otherwise."""
    runs = {run.name: run for run in read_sweep(path)}
    if name not in runs:
        raise ConfigError(f"sweep file {path} has no run named {name!r}; its runs: {', '.join(runs)}")
    return runs[name]


__all__ = ["SWEEP_KEYS", "SweepRun", "read_sweep", "sweep_run"]
