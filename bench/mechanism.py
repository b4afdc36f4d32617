#!/usr/bin/env python
"""Does the proxy attacker h_w separate members from non-members, and does SMP-LoRA take that away?

The experiment behind the paper's claim, at CPU scale: a small member set is fine-tuned for many epochs
(over-fitted) on a briefly pre-trained tiny base, once with the SMP-LoRA objective at ``lambda = 0`` (the
plain-LoRA objective ``L_ada / (1 + delta)``, with the proxy trained alongside as a pure monitor: it never
reaches the LoRA's gradient) and once per ``--lambdas`` value. Every ``--eval_every`` epochs the trainer's
monitor measures the proxy's accuracy on D_aux (the proxy's own training images, fresh noise) and on D_te
(images it never saw). The table reports the mean over the last ``--last`` measurements with its binomial
standard error, so a single lucky draw on a few images does not decide the answer.

    python bench/mechanism.py                  # tests/test_mechanism.py's setting: 8+8 members, LoCon, 200 steps
    python bench/mechanism.py --members 16 --steps 800 --lambdas 0.05 1 --conv_dim 0

Everything is built in a temp dir (digits, split, pre-trained base), nothing is downloaded. It reports
what it measured; it is not a test (a run takes minutes, and the outcome is the finding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, offline_environment, run_cli

offline_environment()

import torch  # noqa: E402 - after offline_environment()


def make_world(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Digits, a split with ``--members`` images in each of the four membership lists, a pre-trained base."""
    from library.data.dataset import scan_dataset
    from library.data.manifest import pretrain_records, write_manifest
    from library.data.splits import make_split
    from library.demo import pretrain
    from library.demo.digits import write_digits_dataset

    write_digits_dataset(root / "images", resolution=32, limit=args.images)
    n = args.members
    sizes = {"member_aux": n, "member_test": n, "nonmember_aux": n, "nonmember_test": n}
    manifest = root / "split.json"
    write_manifest(make_split(scan_dataset(root / "images"), sizes=sizes, seed=args.seed, pretrain="rest",
                              dataset_root=root / "images"), manifest)
    base = pretrain.pretrain_base_model(
        pretrain_records(manifest), root / "base", seed=args.seed, vae_steps=args.vae_steps,
        unet_steps=args.unet_steps, vae_batch_size=8, batch_size=16, threads=args.threads, log=lambda _: None,
    )
    return base, manifest


def train(base: Path, manifest: Path, out: Path, privacy_lambda: float, args: argparse.Namespace) -> dict:
    """One SMP-LoRA run; returns its run record (``<name>.json``)."""
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.trainer import train as run

    batch, attacker_batch = min(8, 2 * args.members), min(8, args.members)
    argv = ["--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
            "--resolution", "32", "--network_dim", str(args.rank), "--network_alpha", str(args.rank),
            "--network_train_unet_only", "--train_batch_size", str(batch), "--learning_rate", str(args.lr),
            "--max_train_steps", str(args.steps), "--seed", str(args.seed), "--save_precision", "float",
            "--output_dir", str(out), "--output_name", "run", "--no-progress_bar", "--log_every_n_steps", "1000",
            "--privacy_lambda", str(privacy_lambda), "--attacker_batch_size", str(attacker_batch),
            "--k_steps", str(args.k_steps), "--attacker_lr", str(args.attacker_lr),
            "--attacker_features", args.features, "--attacker_timesteps", *map(str, args.timesteps),
            "--attacker_eval_every_n_epochs", str(args.eval_every)]
    if args.conv_dim:
        argv += ["--network_args", f"conv_dim={args.conv_dim}", f"conv_alpha={args.conv_dim}"]
    run(parse_config(TrainConfig, argv), "smp_lora")
    return json.loads((out / "run.json").read_text())


def summarise(record: dict, last: int, n_eval: int) -> dict[str, float]:
    epochs = record["epochs"]
    monitored = [e for e in epochs if "proxy_acc_aux" in e][-last:]
    row: dict[str, float] = {"evaluations": len(monitored)}
    for split in ("aux", "test"):
        values = [e[f"proxy_acc_{split}"] for e in monitored]
        mean = statistics.fmean(values)
        row[split] = mean
        # each measurement scores n_eval images once: binomial s.e. of the mean of `last` such measurements
        row[f"{split}_se"] = math.sqrt(max(mean * (1 - mean), 1e-12) / (n_eval * len(values)))
    tail = epochs[-max(last * 5, 1):]
    row["l_ada"] = statistics.fmean(e["l_ada"] for e in tail if "l_ada" in e)
    row["g"] = statistics.fmean(e["g"] for e in tail if "g" in e)
    return row


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8, help="images in each of the four membership lists")
    parser.add_argument("--images", type=int, default=600, help="digits written (the rest pre-trains the base)")
    parser.add_argument("--vae_steps", type=int, default=100)
    parser.add_argument("--unet_steps", type=int, default=400)  # tests/test_mechanism.py's
    parser.add_argument("--steps", type=int, default=200, help="LoRA steps per run (batch 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--conv_dim", type=int, default=16, help="LoCon rank of the ResNet convs (0: attention only)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1.0], help="SMP lambdas to compare with 0")
    parser.add_argument("--features", default="multi_t_loss", choices=["error_map", "loss", "multi_t_loss"])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[20, 50, 100, 200])
    parser.add_argument("--attacker_lr", type=float, default=1e-3)
    parser.add_argument("--k_steps", type=int, default=2)
    parser.add_argument("--eval_every", type=int, default=5, help="epochs between proxy measurements")
    parser.add_argument("--last", type=int, default=8, help="average the last N proxy measurements")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, manifest = make_world(root, args)
        for lam in [0.0, *args.lambdas]:
            rows[lam] = summarise(train(base, manifest, root / f"lambda_{lam}", lam, args), args.last,
                                  2 * args.members)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
          f"thread(s); {args.members}+{args.members} members (D_aux + D_te halves), as many non-members; "
          f"{args.steps} LoRA steps (rank {args.rank}, conv_dim {args.conv_dim}, lr {args.lr}); "
          f"proxy on {args.features} "
          f"{args.timesteps}, attacker lr {args.attacker_lr}, k {args.k_steps}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"proxy accuracy, mean of the last {args.last} measurements (every {args.eval_every} epochs) ± s.e.; "
          "chance = 0.5")
    print(f"{'lambda':>8}{'acc D_aux':>16}{'acc D_te':>16}{'L_ada':>9}{'G':>9}")
    for lam, row in rows.items():
        print(f"{lam:>8g}{row['aux']:>10.3f} ±{row['aux_se']:.3f}{row['test']:>10.3f} ±{row['test_se']:.3f}"
              f"{row['l_ada']:>9.4f}{row['g']:>9.3f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
