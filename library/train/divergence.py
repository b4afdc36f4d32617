"""What stops a diverging run: a non-finite loss, or a non-finite gradient caught *before* the optimizer step
that would write it into the weights, so the ``<name>-last-good`` file kept beside the error is the model as it
was before the step that failed, never a NaN one.

The advice fits the run: privacy_lambda only where there is a proxy attacker, fp16 only under fp16 autocast,
the clip norm and noise of DP-SGD for a DP run, gradient clipping where it is off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Iterator, NoReturn

import torch

from library.errors import TrainingError
from library.train import artifacts

if TYPE_CHECKING:
    from library.train.methods import ForwardResult, StepContext
    from library.train.trainer import Trainer


def advice(trainer: Trainer) -> str:
    """What to change, for this run's settings."""
    config, method = trainer.config, trainer.method_class
    options = ["the learning rate"]
    if method.has_attacker:
        options.append("privacy_lambda")
    if method.divergence_advice:
        options.append(method.divergence_advice)
    text = "Lower " + " or ".join(options)
    if config.max_grad_norm == 0:
        text += ", clip gradients (max_grad_norm 1)"
    if config.mixed_precision == "fp16":
        text += ", or use mixed_precision bf16/no instead of fp16"
    return text + "."


def stop(trainer: Trainer, what: str) -> NoReturn:
    """Keep the weights as they are (the last good ones) and stop the run with one line saying why and where."""
    artifacts.save_last_good(trainer)
    what = what.rstrip() if what.rstrip().endswith((".", "!", "?")) else what.rstrip() + "."
    raise TrainingError(f"step {trainer.global_step}: {what} The last good LoRA was kept (in float32) as "
                        f"{artifacts.last_good_path(trainer)}.")


def checked_loss(trainer: Trainer, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's loss for ``result`` (DreamBooth's prior term added as configured); a non-finite one, or a
    method's own refusal (SMP-LoRA's unusable denominator), stops the run."""
    prior_loss = result.prior_loss
    if prior_loss is not None and not trainer.config.prior_in_objective:
        result = dataclasses.replace(result, prior_loss=None)
    try:
        loss, logs = trainer.method.lora_loss(ctx, result)
        if prior_loss is not None:
            logs["prior_loss"] = prior_loss.item()
            if not trainer.config.prior_in_objective:
                loss = loss + prior_loss
                logs["loss"] = loss.item()
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite training loss ({logs}). {advice(trainer)}")
    except TrainingError as exc:
        stop(trainer, str(exc))
    return loss, logs


def check_gradient_norm(trainer: Trainer, grad_norm: float) -> None:
    """Stop before the optimizer step when the gradients are not finite (a finite loss can still give them:
    an overflow in the backward pass, DP-SGD's noise); fp16's gradient scaler skips such steps itself."""
    if not math.isfinite(grad_norm) and not trainer.grad_scaler.is_enabled():
        stop(trainer, f"non-finite gradients (norm {grad_norm}), the weights are left as they were. "
                      f"{advice(trainer)}")


@contextlib.contextmanager
def optimizer_overflow(trainer: Trainer) -> Iterator[None]:
    """The optimizer step, where a float32 overflow (a learning rate near 1e38: AdamW divides it by 1 - beta1)
    is torch's multi-line RuntimeError from inside the optimizer; it fails before any weight moves, so the run
    stops with one line and the weights as they were."""
    try:
        yield
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        stop(trainer, f"the optimizer step overflowed float32 ({exc}): a learning rate this large "
                      f"(learning_rate {trainer.config.learning_rate}) cannot train. {advice(trainer)}")
