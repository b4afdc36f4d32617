"""Shared plumbing of the entry scripts: parse, run, and turn user errors into one clear line."""

from __future__ import annotations

import argparse
import difflib
import os
import re
import select
import signal
import sys
import threading
from typing import Any, Callable, Mapping, NoReturn, Sequence

from library.errors import ConfigError, UserError

HELP_HINT = "run with --help for the flags"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose parse errors are one :class:`ConfigError` line, not 70 lines of usage.

    An unknown flag, a bad number or a value outside the choices raises ``ConfigError("<what>; run with --help
    for the flags")`` (with the closest flag or choice suggested); :func:`run_cli` prints it as ``error: ...``
    and exits with status 2, as argparse would. ``--help`` still prints the full usage. ``error_prefix`` (e.g.
    the sweep file a flag list came from) starts every message; ``help_hint`` ends it (None: no hint).
    """

    def __init__(self, *args: Any, error_prefix: str = "", help_hint: str | None = HELP_HINT,
                 foreign: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        """``foreign``: other tools' flags we do not take, each with an ``advice`` (what to do instead)."""
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-3" for a flag ("expected one argument"); a number in exponent form is a value too.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
        self.error_prefix = error_prefix
        self.help_hint = help_hint
        self.foreign = dict(foreign or {})

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
                   ) -> argparse.Namespace:  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(self._unrecognized(extras))
        return namespace

    def _unrecognized(self, extras: list[str]) -> str:
        """argparse's ``unrecognized arguments: --lerning_rate 1e-4`` plus ``(did you mean --learning_rate?)``."""
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
        names = [f[5:] if f.startswith("--no-") and f[5:] in self.foreign else f[2:] for f in flags]
        advice = [f"--{name}: {self.foreign[name].advice}" for name in names if name in self.foreign]
        if advice:  # an sd-scripts flag: say what to do instead, not which of ours looks alike
            return "; ".join(advice)
        message = "unrecognized arguments: " + " ".join(extras)
        if flags:
            close = difflib.get_close_matches(flags[0], list(self._option_string_actions), n=1)
            if close:
                message += f" (did you mean {close[0]}?)"
        return message

    def error(self, message: str) -> NoReturn:
        """Raise the parse error as one ConfigError line (argparse would print the usage and exit)."""
        message = " ".join(message.split())  # one line, whatever argparse composed
        if message.startswith("argument "):  # "argument --seed: invalid int value: 'x'" -> "--seed: ..."
            message = message[len("argument "):]
        message += _closest_choice(message, self._actions)
        parts = [self.error_prefix + message] + ([self.help_hint] if self.help_hint else [])
        raise ConfigError("; ".join(parts))


def _closest_choice(message: str, actions: Sequence[argparse.Action]) -> str:
    """`` (did you mean 'bf16'?)`` for argparse's ``--x: invalid choice: 'bf61' (...)`` message, else ``""``."""
    flag, sep, rest = message.partition(": invalid choice: ")
    if not sep:
        return ""
    action = next((a for a in actions if "/".join(a.option_strings) == flag or a.dest == flag), None)
    if action is None or not action.choices or not all(isinstance(c, str) for c in action.choices):
        return ""  # near numbers are no better guesses than far ones
    given = rest.split(" (choose from", 1)[0].strip("'\"")
    close = difflib.get_close_matches(given, [str(c) for c in action.choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def offline_environment() -> None:
    """Never touch a model hub: every model is a local folder or file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # transformers 5 prints a progress bar per model load and warnings about optional image backends
    # (torchvision) that this toolkit never uses; keep the console for our own messages.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit), raised where Ctrl-C would be: the same clean-up runs
    (worker processes stopped, locks released), where the default action would leave worker processes running."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no fileno (captured), or no poll on this platform
        return False


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main``; a :class:`UserError` prints ``error: <message>`` on stderr and returns exit status 2.

    The exit status is ``main``'s return value when that is an int (scripts that report their own status), else 0;
    Ctrl-C gives 130, SIGTERM 143 (after the same clean-up); output piped into a reader that stops early
    (``| head``) ends the run quietly with 141, as a shell tool killed by SIGPIPE does.
    """
    offline_environment()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        status = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr, flush=True)
        return 143 if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a worker process's): a real failure
        # The reader has gone: send the rest of stdout, and the flush at exit, to /dev/null (Python's advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
