"""The whole body of the training entry scripts: ``train_<name>.py`` for each name of the method registry."""

from __future__ import annotations

from typing import Sequence

from library.cli import run_cli


def train_entry(method: str, description: str, argv: Sequence[str] | None = None) -> int:
    """The whole body of ``train_<method>.py``; ``method`` is a key of ``library.train.methods.METHOD_REGISTRY``."""

    def main(args: Sequence[str] | None) -> None:
        from library.config import parse_config  # noqa: PLC0415 - fast --help and clean error paths
        from library.train.config import TrainConfig  # noqa: PLC0415
        from library.train.trainer import train  # noqa: PLC0415

        config = parse_config(TrainConfig, args, description)
        train(config, method)

    return run_cli(main, argv)
