"""Membership-inference attacks, one module each, behind the :class:`~library.eval.attacks.base.Attack` interface.

:mod:`library.eval.attacks.registry` maps each ``--attacks`` name to its class; adding an attack is its module
plus one line there. Importing this package imports only the registry (names, no torch): the classes and the
interface are imported from their modules (``library.eval.attacks.base``, ``.loss_threshold``, ...).
"""

from __future__ import annotations

from library.eval.attacks.registry import (
    ATTACK_CLASSES,
    ATTACK_NAMES,
    DEFAULT_ATTACKS,
    attack_class,
    build_attacks,
)

__all__ = ["ATTACK_CLASSES", "ATTACK_NAMES", "DEFAULT_ATTACKS", "attack_class", "build_attacks"]
