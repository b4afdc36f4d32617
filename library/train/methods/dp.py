"""DP-LoRA, a reviewer's baseline (issue 7): plain LoRA trained with DP-SGD (:mod:`library.train.dp`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from library.data.lineage import UNRECORDED
from library.errors import ConfigError, warn
from library.train.methods.base import MethodSetup
from library.train.methods.plain import PlainLoRA

if TYPE_CHECKING:
    from library.train.config import TrainConfig


class DPLoRA(PlainLoRA):
    """Plain LoRA trained with DP-SGD (:class:`library.train.dp.DPSGD`); epsilon is logged every epoch and saved."""

    name = "dp_lora"
    in_paper = False
    single_process = "DP-SGD runs in one process (its per-sample clipping and accountant are per process)"
    distinct_members = ("DP-SGD's accountant bounds what one training record changes; an image that occurs k times "
                        "is k records, so its epsilon would be understated")
    step_cost = 2
    divergence_advice = "dp_clip_norm / dp_noise_multiplier"

    def __init__(self, config: TrainConfig, network: torch.nn.Module, params: list[torch.nn.Parameter],
                 num_members: int) -> None:
        from library.train.dp import DPSGD  # noqa: PLC0415 - opacus only when DP is asked for

        self.config = config
        self.dp = DPSGD(network, params, noise_multiplier=config.dp_noise_multiplier, clip_norm=config.dp_clip_norm,
                        sample_rate=min(1.0, config.train_batch_size / num_members), delta=config.dp_delta,
                        seed=config.seed + 5)

    @classmethod
    def build(cls, setup: MethodSetup) -> DPLoRA:
        assert setup.network is not None and setup.params is not None and setup.num_members > 0, \
            "DP-SGD needs the network"
        return cls(setup.config, setup.network, setup.params, setup.num_members)

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        if config.dp_noise_multiplier < 0 or config.dp_clip_norm <= 0 or not 0 < config.dp_delta < 1:
            raise ConfigError("DP-SGD needs 'dp_noise_multiplier' >= 0, 'dp_clip_norm' > 0 and 0 < 'dp_delta' < 1")
        if config.train_mode != "lora":
            raise ConfigError("DP-SGD trains adapters only here ('train_mode = lora'): per-sample gradients of a "
                              "whole UNet do not fit in memory; use train_mode lora")
        refused = {"with_prior_preservation": config.with_prior_preservation,
                   "gradient_accumulation_steps": config.gradient_accumulation_steps > 1,
                   "mixed_precision = fp16": config.mixed_precision == "fp16",
                   "track_smoothness": config.track_smoothness, "grad_normalize": config.grad_normalize,
                   "gradient_checkpointing": config.gradient_checkpointing}
        for flag, used in refused.items():
            if used:
                raise ConfigError(f"DP-SGD does not support '{flag}' (Opacus takes per-sample gradients from one "
                                  "plain fp32/bf16 forward and backward per batch); drop it")

    @classmethod
    def check_data(cls, config: TrainConfig, num_members: int) -> None:
        if num_members and config.dp_delta >= 1 / num_members:  # delta: the chance the guarantee fails outright
            warn(f"'dp_delta' {config.dp_delta:g} is not below 1/|D_tr| = 1/{num_members}: an (epsilon, delta) "
                 "guarantee with such a delta allows leaking a whole training image; use a smaller one "
                 f"(e.g. {0.1 / num_members:.1g})")

    @classmethod
    def check_parent(cls, config: TrainConfig, seen: Sequence[str], split: str | None) -> None:
        # The accountant counts this run's steps only: a starting LoRA that saw these members is outside its epsilon.
        if split is not None and split in seen:
            raise ConfigError(
                f"--network_weights {config.network_weights} was trained on this split's members, and DP-SGD's "
                "epsilon counts this run's steps only, so it would bound nothing; continue a DP-SGD run with "
                "--resume (its accountant goes on), or start from scratch or from a LoRA that never saw these images")
        warn(f"--network_weights {config.network_weights}: the saved epsilon counts this run's DP-SGD steps only; it "
             "bounds what the LoRA reveals of D_tr only if that starting LoRA never saw these images"
             + (" (it records no split)" if UNRECORDED in seen else ""))

    def process_gradients(self, batch_size: int) -> dict[str, float]:
        return self.dp.privatize(batch_size)

    def end_of_epoch(self, epoch: int) -> dict[str, float]:
        return {"dp_epsilon": self.dp.epsilon()}

    def final_logs(self) -> dict[str, float]:
        return {"dp_epsilon": self.dp.epsilon()}  # the metadata's, also after a last partial epoch

    def state_dict(self) -> dict[str, Any]:
        return self.dp.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dp.load_state_dict(state)

    def metadata(self) -> dict[str, str]:
        cfg = self.config
        return {"smp_lora.dp_noise_multiplier": str(cfg.dp_noise_multiplier),
                "smp_lora.dp_clip_norm": str(cfg.dp_clip_norm), "smp_lora.dp_delta": str(cfg.dp_delta),
                "smp_lora.dp_epsilon": f"{self.dp.epsilon():.4g}",
                "smp_lora.dp_accountant": "opacus RDP, q = batch / |D_tr| (shuffled batches, not Poisson)"}
