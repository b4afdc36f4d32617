"""Training methods as strategies plugged into the one loop of :mod:`library.train.trainer`, and their registry.

* :class:`PlainLoRA` (``lora``) — minimise L_ada (Eq. 3). The baseline.
* :class:`MPLoRA` (``mp_lora``) and :class:`SMPLoRA` (``smp_lora``) — the min-max game with a proxy attacker,
  Eq. 6 and Eq. 10 (:mod:`library.train.methods.adversarial`).
* Baselines a reviewer asks for (issue 7): :class:`RelaxLoss` (a loss-level target for members) and
  :class:`DPLoRA` (DP-SGD on the LoRA parameters, :mod:`library.train.dp`). Early stopping needs no method: it
  is plain LoRA saved every N epochs (``--save_every_n_epochs``), each file an early-stopped model.

:data:`METHOD_REGISTRY` is the one list of methods: the entry scripts, ``TrainConfig``'s method checks, the
demo and the frontier read it. A new method is one module with a :class:`TrainingMethod` subclass (its
capabilities as class attributes) and one line below.
"""

from __future__ import annotations

from library.errors import ConfigError
from library.train.methods.adversarial import AdversarialLoRA, MPLoRA, SMPLoRA
from library.train.methods.base import (
    AuxData,
    ForwardResult,
    MethodSetup,
    SampleSet,
    StepContext,
    TrainingMethod,
)
from library.train.methods.dp import DPLoRA
from library.train.methods.plain import PlainLoRA
from library.train.methods.relaxloss import RelaxLoss

# name -> method, in the order the methods are listed everywhere (the paper's three first).
METHOD_REGISTRY: dict[str, type[TrainingMethod]] = {
    method.name: method for method in (PlainLoRA, MPLoRA, SMPLoRA, RelaxLoss, DPLoRA)
}


def method_names(*, in_paper: bool | None = None) -> tuple[str, ...]:
    """The registered method names; ``in_paper=True`` only the paper's three, ``False`` only the baselines."""
    return tuple(name for name, method in METHOD_REGISTRY.items() if in_paper is None or method.in_paper == in_paper)


def method_class(name: str) -> type[TrainingMethod]:
    """The registered method called ``name`` (a ConfigError line for an unknown one)."""
    try:
        return METHOD_REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHOD_REGISTRY)}") from None


__all__ = ["METHOD_REGISTRY", "AdversarialLoRA", "AuxData", "DPLoRA", "ForwardResult", "MPLoRA", "MethodSetup",
           "PlainLoRA", "RelaxLoss", "SMPLoRA", "SampleSet", "StepContext", "TrainingMethod",
           "method_class", "method_names"]
