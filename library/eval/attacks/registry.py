"""The attack registry: each ``--attacks`` name -> the :class:`~library.eval.attacks.base.Attack` subclass that
implements it, named as ``"module:Class"``.

**Adding an attack** (SecMI, PIA, CLiD, ...) is one module under ``library/eval/attacks/`` holding one
``Attack`` subclass (its ``name``, ``fit``, ``score`` and, when it has options, a ``from_config`` classmethod
reading them from :class:`~library.eval.config.EvalConfig`) plus one line in :data:`ATTACK_CLASSES`.
``EvalConfig`` reads its ``--attacks`` choices from here.

Why names and not the classes themselves: the config (and so ``evaluate_mia.py --help``) needs only the names,
and importing every attack would import torch, scipy and every attack's dependencies for them. A class is
imported when an attack is built (:func:`attack_class`). This module imports nothing heavy and nothing of
``library.eval`` (the attack modules never import the config at run time), so there is no import cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from library.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from library.eval.attacks.base import Attack
    from library.eval.config import EvalConfig

ATTACK_CLASSES: dict[str, str] = {
    "paper": "library.eval.attacks.paper_mlp:PaperMLPAttack",
    "loss": "library.eval.attacks.loss_threshold:LossThresholdAttack",
    "calibrated": "library.eval.attacks.calibrated:CalibratedLossAttack",
    "secmi": "library.eval.attacks.secmi:SecMIAttack",
    "pia": "library.eval.attacks.pia:PIAAttack",
    "pian": "library.eval.attacks.pia:PIANAttack",
    "clid": "library.eval.attacks.clid:CLiDAttack",
    "gsa": "library.eval.attacks.gsa:GSAAttack",
    "sima": "library.eval.attacks.sima:SimAAttack",
    "pfami": "library.eval.attacks.pfami:PFAMIAttack",
    "blackbox": "library.eval.attacks.blackbox:BlackBoxAttack",
    "reconstruction": "library.eval.attacks.reconstruction:ReconstructionAttack",
    "rediffuse": "library.eval.attacks.rediffuse:ReDiffuseAttack",
    "blind": "library.eval.attacks.blind:BlindAttack",
}
ATTACK_NAMES = tuple(ATTACK_CLASSES)
# What runs without --attacks: the whole suite (docs/attacks.md), so that a model's headline is its worst case
# over all of it. Kept apart from the registry so that registering an attack does not add it here by itself.
DEFAULT_ATTACKS = ("paper", "loss", "calibrated", "secmi", "pia", "pian", "clid", "gsa", "sima", "blackbox",
                   "reconstruction", "rediffuse", "blind")


def attack_class(name: str) -> type[Attack]:
    """The class registered as ``name`` (imported on first use)."""
    if name not in ATTACK_CLASSES:
        raise ConfigError(f"unknown attack {name!r}; registered attacks: {list(ATTACK_NAMES)}")
    module_name, _, class_name = ATTACK_CLASSES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if cls.name != name:
        raise AssertionError(f"attack registry: {ATTACK_CLASSES[name]} is named {cls.name!r}, registered as {name!r}")
    return cls


def build_attacks(config: EvalConfig, device: torch.device) -> list[Attack]:
    """One fresh attack per name of ``config.attacks``, in that order, each built by its own ``from_config``."""
    return [attack_class(name).from_config(config, device) for name in config.attacks]


__all__ = ["ATTACK_CLASSES", "ATTACK_NAMES", "DEFAULT_ATTACKS", "attack_class", "build_attacks"]
