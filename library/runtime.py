"""Process-level knobs shared by every layer: dtype names, torch thread control, hashed seeds, progress output."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

from library.errors import ConfigError

#: ``--mixed_precision`` name -> the dtype the frozen models run in.
PRECISION_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--save_precision`` name -> the dtype a LoRA file is written in.
SAVE_DTYPES: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hashed_seed(*parts: object) -> int:
    """A 63-bit generator seed from ``parts`` joined with ``|``.

    Seeds derived this way depend only on what names the draw (a purpose, the run seed, a sample's key or
    hash, a slot), never on batch composition, order or process layout, which keeps seeded runs bit-identical.
    """
    text = "|".join(str(part) for part in parts)
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) & ((1 << 63) - 1)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then restore the previous setting.

    Tiny models are dominated by per-op overhead; on a busy 2-core box one thread per process is often
    faster than two (threads spin waiting for each other), so the caller chooses. ``None`` keeps the setting.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def echo(message: str) -> None:
    """Default progress sink: print and flush, so lines appear promptly when stdout is a file or a pipe."""
    print(message, flush=True)
