#!/usr/bin/env python
"""LoRA vs MP-LoRA vs SMP-LoRA on packaged digits, attacked with the evaluate_mia suite (see library/demo/run.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, run_cli


def _main(argv: Sequence[str] | None) -> None:
    from library.data.manifest import CORE_SPLITS  # noqa: PLC0415
    from library.demo.run import DemoSettings, run_demo  # noqa: PLC0415
    from library.errors import ConfigError  # noqa: PLC0415

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=DemoSettings().workdir,
                        help="where everything is written (default: runs/demo in the repository; a relative path is "
                             "taken from the current folder)")
    parser.add_argument("--threads", type=int, default=DemoSettings().threads,
                        help="torch threads for pre-training the base model (default 1: with more it is faster, but its "
                             "weights are no longer bit-identical from run to run); trainings and evaluation use one each")
    parser.add_argument("--retrain", action="store_true", help="retrain the LoRAs even if their files exist")
    parser.add_argument("--jobs", type=int, default=DemoSettings().jobs,
                        help="trainings run at once, one process each (default 3)")
    parser.add_argument("--defence", default=DemoSettings().defence,
                        help="the run of configs/frontier/demo.toml trained beside the paper's three methods (default: "
                             "the best the frontier found); 'none' trains the three only (~3 min less)")
    parser.add_argument("--eval_jobs", type=int, default=DemoSettings().eval_jobs,
                        help="models evaluated at once, one process each (default: min(2, CPU cores))")
    parser.add_argument("--set_size", type=int, default=50,
                        help="images in each membership set (D_aux and D_te, members and non-members; default 50): "
                             "100 gives the 100 + 100 test set the data allows, at about twice the training and "
                             "evaluation time")
    args = parser.parse_args(argv)
    if min(args.jobs, args.threads, args.eval_jobs, args.set_size) < 1:
        raise ConfigError("--jobs, --eval_jobs, --threads and --set_size must be at least 1")
    defence = None if str(args.defence).lower() == "none" else args.defence
    run_demo(DemoSettings(workdir=args.workdir, threads=args.threads, retrain=args.retrain, jobs=args.jobs,
                          eval_jobs=args.eval_jobs, defence=defence,
                          split_sizes=dict.fromkeys(CORE_SPLITS, args.set_size)))


if __name__ == "__main__":
    sys.exit(run_cli(_main))
