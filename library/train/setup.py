"""Set-up of a training run: the accelerator, the models in their dtypes, the text conditioning, optimiser and
schedule (what is trained is :mod:`library.train.parametrization`).

The order of the calls in :class:`library.train.trainer.Trainer` matters: the global seed is set before the
models load and the LoRA is created (its initialisation draws from torch's global RNG).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, ContextManager

import torch
from accelerate import Accelerator

from library.errors import ConfigError
from library.runtime import PRECISION_DTYPES
from library.sd.bundle import ModelBundle, cast_weights
from library.sd.loading import load_sd_model
from library.sd.text import check_clip_skip, encode_prompts
from library.train.config import TrainConfig
from library.train.samplers import EpochCyclingSampler


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The launcher's processes and device, tensorboard under ``logging_dir``; no mixed precision (see load_models)."""
    return Accelerator(
        # cpu=True on a CPU-only machine lets torchrun / `accelerate launch --multi_gpu` start a gloo
        # process group there (multi-process tests and CPU debugging of the distributed path).
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard" if config.logging_dir else None,
        project_dir=config.logging_dir,
    )


def load_models(config: TrainConfig, device: torch.device,
                ) -> tuple[ModelBundle, Callable[[], ContextManager], torch.amp.GradScaler]:
    """The SD model on ``device``, the run's autocast and its fp16 loss scaler."""
    bundle = load_sd_model(config.pretrained_model_name_or_path, tokenizer_path=config.tokenizer_path,
                           allow_pickle=config.allow_pickle)
    bundle.loaded_fingerprint = bundle.fingerprint()  # ~2-4 s for SD v1.5; recorded in what the run saves
    # Frozen UNet and text encoder in the autocast dtype (memory); the VAE stays fp32 (fp16 SD VAEs
    # overflow to NaN, sd-scripts' --no_half_vae) and so do the LoRA weights, which the optimiser updates.
    weight_dtype = PRECISION_DTYPES[config.mixed_precision]
    # Autocast and loss scaling are ours rather than accelerate's: accelerate keeps one process-wide
    # precision, and several trainers may run in one process (the demo, the benchmark, the tests).
    autocast = functools.partial(torch.autocast, device.type, dtype=weight_dtype,
                                 enabled=config.mixed_precision != "no")
    grad_scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    for module in (bundle.vae, bundle.unet, bundle.text_encoder):
        module.to(device)
    if weight_dtype != torch.float32:  # what full fine-tuning trains keeps fp32 master weights under autocast
        if config.train_mode != "full":
            cast_weights(bundle.unet, weight_dtype)
        if config.train_mode != "full" or not config.train_text_encoder:
            cast_weights(bundle.text_encoder, weight_dtype)
    return bundle, autocast, grad_scaler


class TextConditioner:
    """Caption -> CLIP conditioning; cached per caption when the text encoder is frozen and captions fixed."""

    def __init__(self, bundle: ModelBundle, config: TrainConfig, trains_text_encoder: bool):
        self.bundle = bundle
        self.config = config
        self.cacheable = not trains_text_encoder and not config.shuffle_caption
        self._cache: dict[str, torch.Tensor] = {}
        check_clip_skip(bundle.text_encoder, config.clip_skip)  # now, so --dry_run says it

    def __call__(self, captions: list[str]) -> torch.Tensor:
        if self.cacheable:
            missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
            if missing:
                with torch.no_grad():
                    encoded = self._encode(missing)
                self._cache.update(zip(missing, encoded))
            return torch.stack([self._cache[c] for c in captions])
        return self._encode(captions)

    def _encode(self, captions: list[str]) -> torch.Tensor:
        return encode_prompts(self.bundle.tokenizer, self.bundle.text_encoder, captions,
                              max_token_length=self.config.max_token_length, clip_skip=self.config.clip_skip)


def total_steps(config: TrainConfig, sampler: EpochCyclingSampler) -> int:
    """Optimisation steps of the run: ``max_train_epochs`` over D_tr when given, else ``max_train_steps``."""
    if config.max_train_epochs is not None:
        return math.ceil(config.max_train_epochs * sampler.batches_per_epoch / config.gradient_accumulation_steps)
    return config.max_train_steps


def build_optimizer(config: TrainConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW (or bitsandbytes' AdamW8bit) over the trained parts' parameter groups."""
    if config.optimizer_type == "AdamW8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415 - optional GPU-box dependency
        except ImportError:
            raise ConfigError("optimizer_type 'AdamW8bit' needs bitsandbytes (pip install bitsandbytes on a "
                              "CUDA machine); use 'AdamW' here") from None
        return bnb.optim.AdamW8bit(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(param_groups, lr=config.learning_rate, weight_decay=config.weight_decay)


# sd-scripts' tensorboard names of the parameter groups' learning rates
_KOHYA_LR_NAMES = {"unet": "lr/unet", "text_encoder": "lr/textencoder"}


def learning_rates(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, float]:
    """The step's learning rates for the logs: ``lr`` (the UNet's, else the only group's) and each named group's
    under sd-scripts' name (``lr/unet``, ``lr/textencoder``)."""
    rates = {group.get("name", str(i)): lr
             for i, (group, lr) in enumerate(zip(optimizer.param_groups, scheduler.get_last_lr()))}
    main = rates.get("unet", next(iter(rates.values())))
    return {"lr": main, **{_KOHYA_LR_NAMES[name]: lr for name, lr in rates.items() if name in _KOHYA_LR_NAMES}}


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``lr_scheduler`` over the run's ``total_steps``, after ``lr_warmup_steps`` of warm-up."""
    from diffusers.optimization import get_scheduler  # noqa: PLC0415 - keeps import time down for --help

    warmup = config.lr_warmup_steps  # below 1: a ratio of the run's steps, rounded down as sd-scripts rounds it
    warmup = int(warmup * total_steps) if warmup < 1 else int(warmup)
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
