"""sd-scripts' tensorboard loss curves, so a kohya user's dashboards read our runs too.

``loss/current`` is the step's training objective (the method's ``loss``; plain LoRA's is L_ada, Eq. 3),
``loss/average`` its mean over the last epoch's worth of steps (sd-scripts' ``LossRecorder`` moving average) and
``loss/epoch_average`` the mean over each epoch's steps, logged at the epoch's number as sd-scripts logs it.
Only tensorboard gets these; the run record ``<name>.json`` keeps this project's own names. The losses they are
means of go into the training state (an epoch's worth of floats at most), so a resumed run's curves go on as the
uninterrupted run's would.
"""

from __future__ import annotations

from collections import deque


def mean_logs(micro_batches: list[dict[str, float]]) -> dict[str, float]:
    """One optimisation step's logs from its micro-batches' (``--gradient_accumulation_steps``): each value's mean
    over the micro-batches that logged it, as the step's objective is their mean (one micro-batch: its own)."""
    keys = dict.fromkeys(key for logs in micro_batches for key in logs)
    return {key: sum(values) / len(values)
            for key in keys if (values := [logs[key] for logs in micro_batches if key in logs])}


class LossRecorder:
    def __init__(self, steps_per_epoch: int) -> None:
        self.window: deque[float] = deque(maxlen=max(1, steps_per_epoch))
        self.epoch: list[float] = []

    def add(self, logs: dict[str, float]) -> dict[str, float]:
        """Record one optimisation step's logs; its ``loss/current`` and ``loss/average`` (none without a loss)."""
        loss = logs.get("loss", logs.get("l_ada"))
        if loss is None:
            return {}
        self.window.append(loss)
        self.epoch.append(loss)
        return {"loss/current": loss, "loss/average": sum(self.window) / len(self.window)}

    def end_epoch(self) -> dict[str, float]:
        """``loss/epoch_average`` of the steps since the last epoch ended (none when no step ended there: a long
        accumulation can end two epochs at once, or a run resumed from an older state, which kept no losses, its
        first epoch without its earlier steps)."""
        steps, self.epoch = self.epoch, []
        return {"loss/epoch_average": sum(steps) / len(steps)} if steps else {}

    def state_dict(self) -> dict[str, list[float]]:
        return {"window": list(self.window), "epoch": list(self.epoch)}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        """Continue from :meth:`state_dict`'s; an empty ``state`` (an older training state's) starts afresh, as
        before. The window keeps its own length: the newest losses fit it."""
        self.window = deque(state.get("window", []), maxlen=self.window.maxlen)
        self.epoch = list(state.get("epoch", []))
