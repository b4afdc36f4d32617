"""The few collectives the loop needs across processes (the LoRA runs inside the UNet's forward, outside DDP)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from library.errors import UserError

T = TypeVar("T")


class Collectives:
    """Gradient and buffer averaging, and a bit-exact sync check, over the processes of ``accelerator``."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average gradients across processes."""
        self.all_reduce_mean([p.grad for p in params if p.grad is not None])

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean over processes of float tensors, as one flat collective."""
        tensors = [t for t in tensors if t.is_floating_point()]
        if self.accelerator.num_processes == 1 or not tensors:
            return
        flat = self.accelerator.reduce(torch.cat([t.flatten() for t in tensors]), reduction="mean")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one (a refusal every rank must act on)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order, on every process (a list of one with one process)."""
        if self.accelerator.num_processes == 1:
            return [obj]
        return gather_object([obj])

    def on_main(self, produce: Callable[[], T]) -> T:
        """``produce()`` run by the main process alone, its value given to every process (a broadcast).

        Its refusal (a :class:`~library.errors.UserError`) is broadcast too and raised on every rank: raised on the
        main one alone, it would leave the others waiting for the value until the distributed timeout. Any other
        exception is raised as it is on the main process (its traceback is the diagnosis) and as one line naming
        it on the others.
        """
        if self.accelerator.num_processes == 1:
            return produce()
        outcome: T | UserError | None = None
        failure: Exception | None = None
        if self.accelerator.is_main_process:
            try:
                outcome = produce()
            except UserError as exc:
                outcome = exc
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
                failure = exc
                outcome = UserError(f"the main process stopped with {type(exc).__name__}: {exc} (its traceback is "
                                    "in its output)")
        outcome = broadcast_object_list([outcome], from_process=0)[0]
        if failure is not None:
            raise failure
        if isinstance(outcome, UserError):
            raise outcome
        return outcome  # type: ignore[return-value]

    def in_sync(self, tensors: list[torch.Tensor]) -> bool:
        """True when every process holds bit-identical ``tensors`` (compared by two float64 checksums)."""
        if self.accelerator.num_processes == 1:
            return True
        flat = torch.cat([t.detach().flatten() for t in tensors]).to(torch.float64)
        digest = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum()])
        gathered = self.accelerator.gather(digest[None].to(self.accelerator.device)).cpu()
        return bool((gathered == gathered[0]).all())
