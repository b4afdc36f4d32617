"""Epoch-cycling index samplers with a tiny, exactly restorable state.

Used for D_tr and for the attacker's D^m_aux / D^nm_aux streams. Each epoch is a fresh permutation
derived from ``(seed, epoch)`` alone, so the whole state is two integers and ``--resume`` continues
the very same sequence. When fewer than a full batch remain, the sampler starts the next epoch and
draws a *new* batch from it: the upstream code instead re-served the previous aux batch whenever its
iterator ran out (upstream-analysis §6.6).

Multi-process: every process holds the same sampler; a global batch of ``batch_size * world_size``
indices is drawn and process ``rank`` takes its slice, so processes never see the same sample at once.
"""

from __future__ import annotations

import torch

from library.errors import ConfigError


def check_batch_fits(num_items: int, batch_size: int, world_size: int, what: str) -> None:
    """One ConfigError line when a set of ``num_items`` cannot fill one global batch (``what`` names the set and
    the flag that sizes its batches)."""
    if num_items < batch_size * world_size:
        raise ConfigError(
            f"{what} has {num_items} image(s), fewer than one batch of {batch_size * world_size} "
            f"({batch_size} per process x {world_size} process(es)); lower the batch size or give the split "
            "more images (scripts/make_split.py)"
        )


class EpochCyclingSampler:
    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 what: str = "the dataset"):
        """``what`` names the set and the flag that sizes its batches, for the error when it is too small."""
        check_batch_fits(num_items, batch_size, world_size, what)
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._permutation = self._make_permutation(0)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch_size

    def _make_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        return torch.randperm(self.num_items, generator=generator)

    def next_indices(self) -> list[int]:
        """This process's indices of the next batch (advances the state)."""
        if self.position + self.global_batch_size > self.num_items:
            self.epoch += 1
            self.position = 0
            self._permutation = self._make_permutation(self.epoch)
        start = self.position + self.rank * self.batch_size
        indices = self._permutation[start:start + self.batch_size].tolist()
        self.position += self.global_batch_size
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_items"] != self.num_items or state["seed"] != self.seed:
            raise ValueError("sampler state belongs to a different dataset or seed")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._permutation = self._make_permutation(self.epoch)
