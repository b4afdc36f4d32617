"""Keys of other tools in a config file, and what each means here.

An sd-scripts or diffusers option this project does not take (``ForeignKey``, a config class's ``FOREIGN_KEYS``)
is refused with what to do instead, or loaded with a warning when its value changes nothing. A key that only the
project's other command takes (``SiblingKeys``, a config class's ``SIBLING_KEYS``) shows a file written for that
command: a training TOML given to ``evaluate_mia.py``, or an evaluation TOML to a training script.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from library.errors import ConfigError

#: What a config class's ``--vae`` (kohya's flag) advises: the VAE is part of the base model here.
BAKE_VAE_ADVICE = ("not supported: the base model's own VAE is used; put the VAE into the base model (a single file: "
                   "python scripts/bake_vae.py --checkpoint BASE.safetensors --vae VAE --output NEW.safetensors; a "
                   "diffusers folder: replace its vae/ folder) and train and evaluate with that")


@dataclasses.dataclass(frozen=True)
class ForeignKey:
    """What another tool's option (a config class's ``FOREIGN_KEYS``) means here (``advice``) and which TOML values
    change nothing (``harmless``: loaded with a warning; any other value is refused with the advice)."""

    advice: str
    harmless: Callable[[Any], bool] | None = None

    def is_harmless(self, value: Any) -> bool:
        return self.harmless is not None and self.harmless(value)


@dataclasses.dataclass(frozen=True)
class SiblingKeys:
    """Keys that only the project's other command takes (a config class's ``SIBLING_KEYS``): a file holding any of
    them was written for ``command`` (a training TOML given to evaluate_mia.py), so its error says that and
    ``advice``, not a "did you mean" for each of its keys."""

    command: str
    keys: frozenset[str]
    advice: str

    def error(self, path: Path, unknown: Sequence[str]) -> ConfigError | None:
        theirs = [key for key in unknown if key in self.keys]
        if not theirs:
            return None
        return ConfigError(f"{path} is a config file of {self.command} ({', '.join(map(repr, theirs[:4]))}"
                           f"{' ...' if len(theirs) > 4 else ''} are its options, not this command's): {self.advice}")


#: kohya's ``--vae``, which training and evaluation both refuse with the same advice (an empty value is harmless).
VAE_FOREIGN_KEY = ForeignKey(BAKE_VAE_ADVICE, lambda v: v in ("", None))

__all__ = ["BAKE_VAE_ADVICE", "VAE_FOREIGN_KEY", "ForeignKey", "SiblingKeys"]
