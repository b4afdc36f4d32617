#!/usr/bin/env python
"""Step-time overhead of MP-LoRA, SMP-LoRA and the baselines against plain LoRA (and plain LoRA against a bare loop).

Builds the tiny SD-shaped stack and a small embedded-digits split in a temp dir, sets up one trainer per
method with the same config, batch and seed, then times their training steps *interleaved* in one
process (CPU timings here drift by up to 2x between runs; ratios taken side by side do not). A bare
loop — cached latents and text states, UNet forward, MSE, backward, AdamW — is the floor.

Peak memory, each method alone in a fresh subprocess: on CUDA, ``torch.cuda.max_memory_allocated`` over its
timed steps; on the CPU, the growth of the process's peak RSS over them.

    python bench/step_overhead.py [--steps 20] [--rounds 5] [--batch_size 8] [--threads N]

Prints a table of median step time per method and the ratios; never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, offline_environment, run_cli

offline_environment()

import torch  # noqa: E402 - after offline_environment()

# The banded calibrated (t, loss) proxy: the frontier's best defence (configs/frontier/demo.toml, smp_t_band).
T_BAND_FLAGS = ["--attacker_features", "t_loss", "--attacker_noise", "fresh", "--attacker_calibration", "base",
                "--attacker_normalization", "standardize", "--attacker_max_timestep", "400"]

ATTACKER_CYCLE = 2  # the *_every2 variants' --attacker_every_n_steps

# name -> (training method, extra flags). smp_calibrated is the frontier's SMP-LoRA (configs/frontier/demo.toml):
# base-calibrated losses at five timesteps, fresh noise; the attacker batch stays --batch_size for every method.
VARIANTS = {
    "lora": ("lora", []),
    "mp_lora": ("mp_lora", []),
    "smp_lora": ("smp_lora", []),
    # Algorithm 1's attacker phase (lines 4-6) on every second LoRA step only: half its no-grad pass
    "mp_lora_every2": ("mp_lora", ["--attacker_every_n_steps", str(ATTACKER_CYCLE)]),
    "smp_lora_every2": ("smp_lora", ["--attacker_every_n_steps", str(ATTACKER_CYCLE)]),
    "smp_calibrated": ("smp_lora", ["--attacker_features", "multi_t_loss", "--attacker_timesteps", "25", "100", "200",
                                    "300", "400", "--attacker_noise", "fresh", "--attacker_calibration", "base",
                                    "--attacker_normalization", "standardize"]),
    # issue 17's cheaper candidate: base-calibrated (t, loss) at one random t, G read from L_ada's own forward
    "smp_t_loss": ("smp_lora", ["--attacker_features", "t_loss", "--attacker_noise", "fresh",
                                "--attacker_calibration", "base", "--attacker_normalization", "standardize"]),
    # ... with the proxy's t banded below 400 and G read from L_ada's rows in that band only
    "smp_t_band": ("smp_lora", T_BAND_FLAGS),
    # ... and its attacker phase on every second LoRA step (G still on every step)
    "smp_t_band_every2": ("smp_lora", [*T_BAND_FLAGS, "--attacker_every_n_steps", str(ATTACKER_CYCLE)]),
    "relaxloss": ("relaxloss", ["--relaxloss_alpha", "0.1"]),
    "dp_lora": ("dp_lora", ["--dp_clip_norm", "0.05"]),
}


def make_fixture(root: Path) -> tuple[Path, Path]:
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.demo.digits import write_digits_dataset
    from library.demo.tiny import save_tiny_model

    save_tiny_model(root / "model")
    write_digits_dataset(root / "images", resolution=32, limit=200)
    sizes = {"member_aux": 32, "member_test": 32, "nonmember_aux": 32, "nonmember_test": 32}
    write_manifest(make_split(scan_dataset(root / "images"), sizes=sizes, seed=0, dataset_root=root / "images"),
                   root / "split.json")
    return root / "model", root / "split.json"


def make_trainer(variant: str, model: Path, manifest: Path, out: Path, args: argparse.Namespace):
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.methods import method_class
    from library.train.trainer import Trainer

    method, extra = VARIANTS[variant]
    attacker = ["--attacker_batch_size", str(args.batch_size), "--g_noise", args.g_noise] \
        if method_class(method).has_attacker else []
    argv = ["--pretrained_model_name_or_path", str(model), "--split_manifest", str(manifest), "--resolution", "32",
            "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only",
            "--train_batch_size", str(args.batch_size), "--max_train_steps", "100000",
            "--output_dir", str(out / variant), "--no-progress_bar", *attacker, *extra]
    trainer = Trainer(parse_config(TrainConfig, argv), method)
    trainer.prepare()
    return trainer


def bare_loop(trainer):
    """The floor: one UNet pass on cached latents and conditioning, MSE, backward, AdamW step."""
    from library.sd.diffusion import draw_noise

    members = trainer.data.members
    conditioning = trainer.conditioner(members.captions[: trainer.config.train_batch_size])
    optimizer = torch.optim.AdamW(trainer.trained.params, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    unet, scheduler = trainer.bundle.unet, trainer.bundle.noise_scheduler

    def step() -> None:
        latents = members.latents[: trainer.config.train_batch_size]
        draw = draw_noise(latents, generator)
        noisy = scheduler.add_noise(latents, draw.noise, draw.timesteps)
        loss = torch.nn.functional.mse_loss(unet(noisy, draw.timesteps, encoder_hidden_states=conditioning).sample,
                                            draw.noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def time_steps(step_fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def peak_memory_child(method: str, model: Path, manifest: Path, out: Path, args: argparse.Namespace) -> float:
    """MiB of peak memory while ``method`` trains alone in a fresh subprocess: the CUDA peak allocation on a GPU,
    the growth of the peak RSS on the CPU."""
    cmd = [sys.executable, __file__, "--_child", method, "--_model", str(model), "--_manifest", str(manifest),
           "--_out", str(out), "--steps", str(args.steps), "--batch_size", str(args.batch_size),
           "--threads", str(args.threads), "--g_noise", args.g_noise]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def child(args: argparse.Namespace) -> None:
    trainer = make_trainer(args._child, Path(args._model), Path(args._manifest), Path(args._out), args)
    trainer.step()  # warm-up allocations common to every method are not the method's overhead
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.steps):
        trainer.step()
    if cuda:
        torch.cuda.synchronize()
        print(json.dumps({"peak_mib": torch.cuda.max_memory_allocated() / 2**20}))
        return
    print(json.dumps({"peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="steps per method per round (rounded up to an even count: whole attacker cycles)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--g_noise", default="reuse", choices=["reuse", "independent"])
    parser.add_argument("--no_memory", action="store_true", help="skip the per-method memory subprocesses")
    for hidden in ("--_child", "--_model", "--_manifest", "--_out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Whole attacker cycles of the *_every2 variants: their steps with and without the attacker phase in proportion
    args.steps = -(-args.steps // ATTACKER_CYCLE) * ATTACKER_CYCLE
    torch.set_num_threads(args.threads)
    if args._child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, manifest = make_fixture(root)
        trainers = {v: make_trainer(v, model, manifest, root / "out", args) for v in VARIANTS}
        steps = {m: t.step for m, t in trainers.items()}
        steps["bare"] = bare_loop(trainers["lora"])
        for fn in steps.values():  # warm-up
            fn()
        samples: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, fn in steps.items():
                samples[name].append(time_steps(fn, args.steps))
        median = {name: statistics.median(v) for name, v in samples.items()}
        memory = {} if args.no_memory else {v: peak_memory_child(v, model, manifest, root / "mem", args) for v in VARIANTS}

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"machine: {platform.machine()} {device}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s); tiny SD stack, batch {args.batch_size}, 8x8 latents, rank 16, "
          f"g_noise={args.g_noise}; median of {args.rounds} interleaved rounds x {args.steps} steps")
    memory_name = "CUDA peak MiB" if torch.cuda.is_available() else "peak RSS growth MiB"
    print(f"{'method':<18}{'s/step':>10}{'img/s':>10}{'x plain':>10}{memory_name:>22}")
    for name in ("bare", *VARIANTS):
        mem = f"{memory[name]:.1f}" if name in memory else "-"
        print(f"{name:<18}{median[name]:>10.4f}{args.batch_size / median[name]:>10.1f}"
              f"{median[name] / median['lora']:>10.2f}{mem:>22}")
    print(f"plain LoRA / bare loop: {median['lora'] / median['bare']:.2f}x; " + "; ".join(
        f"{name} / plain: {median[name] / median['lora']:.2f}x" for name in VARIANTS if name != "lora"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
