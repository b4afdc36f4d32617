"""Digit captions: "a handwritten digit seven" <-> 7 (the demo's data, and the digit classifier's labels).

A data-layer module of its own because three layers read it: the demo writes the captions, evaluation's digit
extractor reads a prompt's class back for the conditional accuracy, and the demo's classifier trains on them.
"""

from __future__ import annotations

import re

from library.errors import DataError

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WORD = re.compile(r"[a-z]+|[0-9]+")


def digit_caption(label: int) -> str:
    """Caption of a digit image, e.g. ``digit_caption(7) == "a handwritten digit seven"``."""
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def digits_named(caption: str) -> set[int]:
    """Every digit a caption names, by word or numeral ("digit seven", "digit 7")."""
    found = set()
    for word in _WORD.findall(str(caption).lower()):
        if word in DIGIT_NAMES:
            found.add(DIGIT_NAMES.index(word))
        elif word.isdigit() and len(word) == 1:
            found.add(int(word))
    return found


def digit_label(caption: str) -> int:
    """The digit a caption names: ``"a handwritten digit seven"`` -> 7 (also accepts a numeral, "digit 7").

    Exactly one digit must be named (repeats of the same digit are fine). A caption naming none, or two
    different digits, raises :class:`DataError`.
    """
    found = digits_named(caption)
    if len(found) == 1:
        return found.pop()
    if not found:
        raise DataError(
            f"caption {caption!r} names no digit; digit captions must contain one of "
            f"{', '.join(DIGIT_NAMES)} (e.g. 'a handwritten digit seven')"
        )
    raise DataError(f"caption {caption!r} names several digits ({sorted(found)}); a digit caption must name one")


def digit_label_or_none(caption: str) -> int | None:
    """:func:`digit_label`, or None for a caption that does not name exactly one digit."""
    found = digits_named(caption)
    return found.pop() if len(found) == 1 else None
