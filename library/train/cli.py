"""The whole body of the training entry scripts (``train_lora.py``, ``train_smp_lora.py``, ...)."""

from __future__ import annotations

from typing import Sequence

from library.cli import run_cli


def train_entry(method: str, description: str, argv: Sequence[str] | None = None) -> int:
    """The whole body of ``train_lora.py`` / ``train_mp_lora.py`` / ``train_smp_lora.py``."""

    def main(args: Sequence[str] | None) -> None:
        from library.config import parse_config  # noqa: PLC0415 - fast --help and clean error paths
        from library.train.config import TrainConfig  # noqa: PLC0415
        from library.train.trainer import train  # noqa: PLC0415

        config = parse_config(TrainConfig, args, description)
        train(config, method)

    return run_cli(main, argv)
