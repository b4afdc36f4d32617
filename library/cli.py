"""Shared plumbing of the entry scripts: parse, run, and turn user errors into one clear line."""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from library.errors import UserError


def offline_environment() -> None:
    """Never touch a model hub: every model is a local folder or file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 5 prints a progress bar per model load and warnings about optional image backends
    # (torchvision) that this toolkit never uses; keep the console for our own messages.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a :class:`UserError` prints ``error: <message>`` on stderr and returns exit status 2."""
    offline_environment()
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0
