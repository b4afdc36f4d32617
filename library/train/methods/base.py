"""What every training method shares: the data it sees from the loop, and the hooks and capabilities it declares.

The loop (:mod:`library.train.trainer`) never asks a method's class or name what to do; it reads the
capabilities below (does it need the attacker's auxiliary sets? does it train an attacker? may it run in
several processes?) and calls the hooks of :class:`TrainingMethod`, which are no-ops unless overridden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Sequence

import torch

from library.sd.diffusion import NoiseDraw

if TYPE_CHECKING:
    from library.train.config import TrainConfig


@dataclass
class ForwardResult:
    """The differentiable forward of a D_tr batch (Eq. 1-3)."""

    errors: torch.Tensor  # (B, C, H, W) squared errors, with grad
    losses: torch.Tensor  # (B,) per-sample l_ada
    latents: torch.Tensor
    conditioning: torch.Tensor
    keys: list[str] | None = None  # the samples' identities (image paths): they seed fixed proxy noise
    draw: NoiseDraw | None = None  # the (t, eps) of this forward (t_loss features read its timesteps)
    prior_loss: torch.Tensor | None = None  # DreamBooth: prior_loss_weight x the class images' mean loss
    captions: list[str] | None = None  # as encoded into ``conditioning`` (a base-model term re-encodes them)

    def adaptation_loss(self) -> torch.Tensor:
        """L_ada (Eq. 3), the batch mean of the members' losses; with DreamBooth's prior preservation in the
        objective, plus the weighted prior loss (the DreamBooth loss is then the adaptation loss of Eq. 6 / 10)."""
        l_ada = self.losses.mean()
        return l_ada if self.prior_loss is None else l_ada + self.prior_loss


@dataclass
class AuxData:
    """Clean latents, captions and keys (image paths) of the attacker's auxiliary sets D^m_aux and D^nm_aux."""

    member_latents: torch.Tensor
    member_captions: list[str]
    nonmember_latents: torch.Tensor
    nonmember_captions: list[str]
    member_keys: list[str] = field(default_factory=list)
    nonmember_keys: list[str] = field(default_factory=list)


@dataclass
class SampleSet:
    """Clean latents with their captions and keys: one labelled set the loop hands a method before training."""

    latents: torch.Tensor
    captions: list[str]
    keys: list[str]


@dataclass
class StepContext:
    """What a method may use from the loop: the patched UNet and how to condition and noise it."""

    unet: torch.nn.Module
    noise_scheduler: Any
    encode_text: Callable[[list[str]], torch.Tensor]
    noise_generator: torch.Generator
    reduce_gradients: Callable[[list[torch.nn.Parameter]], None]
    all_reduce_mean: Callable[[list[torch.Tensor]], None]
    autocast: Callable[[], ContextManager]
    min_timestep: int
    max_timestep: int
    base_model: Callable[[], ContextManager] | None = None  # the LoRA switched off for the block


@dataclass
class MethodSetup:
    """Everything a method may be built from (:meth:`TrainingMethod.build` takes what it needs)."""

    config: TrainConfig
    device: torch.device
    aux: AuxData | None = None  # D^m_aux / D^nm_aux, when the method ``needs_aux``
    rank: int = 0
    world_size: int = 1
    network: torch.nn.Module | None = None  # the LoRA network (DP-SGD hooks its layers)
    params: list[torch.nn.Parameter] | None = None  # its trainable parameters
    num_members: int = 0  # |D_tr|


class TrainingMethod:
    """The hooks the loop calls; every one is a no-op here, so a method overrides only what it changes.

    A method also declares, as class attributes, what the loop must provide or do for it. Adding a method
    is one module with a subclass and one line in :data:`library.train.methods.METHOD_REGISTRY`.
    """

    name: ClassVar[str] = "method"  # the registry key, the ``smp_lora.method`` metadata and the default output name
    in_paper: ClassVar[bool] = False  # one of the paper's three methods (the demo trains those)
    needs_aux: ClassVar[bool] = False  # loads the attacker's auxiliary sets D^m_aux and D^nm_aux
    has_attacker: ClassVar[bool] = False  # trains a proxy attacker (``self.attacker``, saved next to the LoRA)
    single_process: ClassVar[str | None] = None  # why it cannot run across processes (None: it can)
    distinct_members: ClassVar[str | None] = None  # why each member image must occur once in D_tr (None: repeats ok)
    base_config: ClassVar[str] = "lora"  # the configs/<set>/<base_config>.toml a run of it starts from
    step_cost: ClassVar[int] = 1  # rough cost of a step relative to plain LoRA (schedules slow runs first)
    divergence_advice: ClassVar[str | None] = None  # its own settings to lower when a run diverges

    @classmethod
    def build(cls, setup: MethodSetup) -> TrainingMethod:
        """The method for a run (called once the latents exist)."""
        return cls()

    @classmethod
    def needs_base_model(cls, config: TrainConfig) -> bool:
        """Whether a run compares with the frozen base model (``StepContext.base_model``): a full fine-tune keeps a
        copy of the initial weights only then."""
        return False

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Method-specific config checks; a ConfigError line each (see
        :func:`library.train.config_scope.check_for_method`)."""

    @classmethod
    def check_data(cls, config: TrainConfig, num_members: int) -> None:
        """Checks that need |D_tr| (``num_members``), before any model work (``--dry_run`` runs them)."""

    @classmethod
    def check_parent(cls, config: TrainConfig, seen: Sequence[str], split: str | None) -> None:
        """Checks of a LoRA continued with ``--network_weights``: ``seen`` the splits its weights saw
        (:func:`library.data.lineage.splits_seen`), ``split`` this run's (None: a folder without manifest)."""

    def before_training(self, ctx: StepContext, sets: Sequence[SampleSet]) -> None:
        """Called once, after :meth:`build` and before any step or resume, with every set of the split."""

    def attacker_phase(self, ctx: StepContext) -> dict[str, float]:
        """Algorithm 1, lines 4-6 (MP/SMP-LoRA only)."""
        return {}

    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to back-propagate for a D_tr batch (L_ada of Eq. 3; MP/SMP-LoRA: Eq. 6 / 10) and its logs."""
        raise NotImplementedError

    def process_gradients(self, batch_size: int) -> dict[str, float]:
        """Called between backward and the optimiser step (DP-SGD replaces the gradients here)."""
        return {}

    def end_of_epoch(self, epoch: int) -> dict[str, float]:
        """Called after each epoch of D_tr (``epoch`` counts from 1); what it returns joins that epoch's record."""
        return {}

    def final_logs(self) -> dict[str, float]:
        """What the run record's ``final`` block adds to the last step's logs."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The method's own resumable state (the proxy attacker and its samplers; DP-SGD's accountant and noise)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def metadata(self) -> dict[str, str]:
        """The method's ``smp_lora.*`` entries in the saved LoRA's safetensors metadata (its settings)."""
        return {}
