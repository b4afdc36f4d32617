#!/usr/bin/env python
"""The privacy-utility frontier on the demo data: sweep each method's knob, attack every run (see library/demo/frontier.py).

    bash scripts/setup.sh && .venv/bin/python scripts/frontier.py               # configs/frontier/demo.toml
    .venv/bin/python scripts/frontier.py --only smp_calibrated dp_sgd          # some curves of the sweep

Reuses the demo's data, base model and latents (runs/demo; built if missing); trained runs are kept, so a second
call only evaluates and re-plots. Writes runs/demo/frontier/{frontier.md, frontier.png, frontier.json}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, run_cli


def _main(argv: Sequence[str] | None) -> None:
    from library.data.manifest import CORE_SPLITS, read_manifest  # noqa: PLC0415
    from library.demo.frontier import FrontierSettings, run_frontier  # noqa: PLC0415
    from library.demo.run import DemoSettings  # noqa: PLC0415
    from library.errors import ConfigError  # noqa: PLC0415

    defaults = FrontierSettings()
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, default=defaults.sweep, help="sweep file (TOML, [[run]] tables)")
    parser.add_argument("--workdir", type=Path, default=DemoSettings().workdir,
                        help="the demo's work dir, reused (default: runs/demo in the repository)")
    parser.add_argument("--out_dir", type=Path, default=None, help="default: <workdir>/frontier")
    parser.add_argument("--only", nargs="+", default=[], help="train and plot only these curves (labels)")
    parser.add_argument("--jobs", type=int, default=DemoSettings().jobs, help="trainings at once, one process each")
    parser.add_argument("--eval_jobs", type=int, default=DemoSettings().eval_jobs, help="models evaluated at once")
    parser.add_argument("--retrain", action="store_true", help="retrain runs whose LoRA file exists")
    parser.add_argument("--set_size", type=int, default=None,
                        help="images per membership set, as demo.py's (default: the work dir's split, else 50)")
    args = parser.parse_args(argv)
    if min(args.jobs, args.eval_jobs, args.set_size or 1) < 1:
        raise ConfigError("--jobs, --eval_jobs and --set_size must be at least 1")
    manifest = args.workdir / "data" / "split.json"
    if args.set_size is None and manifest.is_file():  # the demo's work dir (runs/demo100 too): its own sizes
        sizes = {k: v for k, v in read_manifest(manifest, verify=False).sizes().items() if k in CORE_SPLITS}
    else:
        sizes = dict.fromkeys(CORE_SPLITS, args.set_size or 50)
    demo = DemoSettings(workdir=args.workdir, jobs=args.jobs, eval_jobs=args.eval_jobs, retrain=args.retrain,
                        split_sizes=sizes)
    run_frontier(FrontierSettings(demo=demo, sweep=args.sweep, out_dir=args.out_dir, runs_filter=args.only))


if __name__ == "__main__":
    sys.exit(run_cli(_main))
