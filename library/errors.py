"""One exception type for every mistake a user can fix.

Entry scripts catch :class:`UserError`, print its message on one line and exit with status 2, so bad
input (a misspelled TOML key, a corrupt image, a LoRA for another model, ...) never surfaces as a
traceback from deep inside torch. Raise it with a message that names the file or key and says what to do.
"""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """An error caused by the user's input: its message is shown as-is, without a traceback."""


class ConfigError(UserError):
    """A bad configuration value, key or combination of flags."""


class DataError(UserError):
    """A missing, corrupt or inconsistent image, caption, latent cache or split manifest."""


class ModelError(UserError):
    """A model or LoRA file that is missing, corrupt or does not match the base model."""


class OutputError(UserError):
    """A file that cannot be written: the disk or quota is full, the file system is read-only."""


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); the last good state has been kept."""


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr (the run goes on), once per launch: in a multi-process run only the
    main process prints (``RANK``, set by accelerate and torchrun, is 0 or unset), as the checks that warn run
    in every process."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)
