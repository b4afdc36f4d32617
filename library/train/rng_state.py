"""Each process's random streams in the resumable state, so that ``--resume`` continues every one of them.

Every process draws its own (t, eps) stream (seeded by its rank), and dropout draws from torch's global RNG
and, on a GPU, the device's. The main process writes the one state file, so the streams of all processes are
gathered into it (``rank_rng``, a list in rank order) and each process takes its own back on resume.
"""

from __future__ import annotations

from typing import Any

import torch


def process_rng_state(noise_generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random streams: its (t, eps) generator, torch's global one and, on a GPU, the device's."""
    state = {"noise_generator": noise_generator.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_process_rng_state(state: dict[str, Any], noise_generator: torch.Generator, device: torch.device,
                              rank: int, world_size: int) -> str | None:
    """Give this process its own streams back from a trainer state; returns a warning when it cannot.

    A state of another process count (or one written before 2026-12-05, which kept the main process's streams
    only) cannot continue every stream: each process keeps its freshly seeded ones and the run is no longer the
    uninterrupted one, which the returned line says."""
    ranks = state.get("rank_rng") or [{"noise_generator": state["noise_generator"], "torch_rng": state["torch_rng"]}]
    if len(ranks) != world_size:
        written = (f"was written by {len(ranks)} process(es)" if "rank_rng" in state
                   else "keeps one process's random streams (written before 2026-12-05)")
        return (f"warning: the state {written}, this run has {world_size}: training goes on, but with new random "
                "streams, not as the uninterrupted run would")
    mine = ranks[rank]
    noise_generator.set_state(mine["noise_generator"])
    torch.set_rng_state(mine["torch_rng"])
    if "cuda_rng" in mine and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda_rng"], device)
    return None
