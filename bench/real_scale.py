#!/usr/bin/env python
"""Step time and memory of plain LoRA, MP-LoRA, SMP-LoRA and the holding SMP-LoRA variant at SD v1.5 scale.

The SD v1.5 architecture itself (UNet, VAE and CLIP ViT-L text tower from the built-in configs of
:mod:`library.sd.configs`), random weights (nothing to download: step time does not depend on the weights),
512 px, batch 1, the Pokemon configs of the paper (``configs/pokemon/*.toml``: rank 64, text-encoder LoRA, clip
skip 2, 225 tokens, attacker batch 1 + 1). Each method runs through the real trainer on a few packaged digits
upscaled to 512 px.

    python bench/real_scale.py                      # CPU, fp32, one timed step each (~15 min on 2 cores)
    python bench/real_scale.py --device cuda        # a GPU box: bf16 autocast, diffusers' SDPA attention,
                                                    # max_memory_allocated, MFU (with --peak_tflops)
    python bench/real_scale.py --architecture tiny --resolution 64 --precision bf16   # the bench's own smoke run
                                                    # (tests/test_benches.py): the same code on the tiny stack

The methods run one after another (five SD-sized copies would not fit in memory at once), plain LoRA first (and,
with ``--drift``, again last, so that the drift of the machine over the run shows). Memory: on CUDA the peak
``max_memory_allocated`` of each method's steps; on the CPU the process's peak RSS after each method (a running
maximum: a method that needs no more than the ones before it shows the same value). FLOPs of a step are counted
once per method with ``torch.utils.flop_counter`` (a forward/backward count, independent of the device); with
``--peak_tflops`` (the device's dense bf16 peak) the bench prints the model FLOPs utilisation.

Prints a table; never used as a timed test.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, offline_environment, run_cli

offline_environment()

import torch  # noqa: E402 - after offline_environment()

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "mp_lora", "smp_lora", "smp_calibrated", "smp_t_loss", "smp_t_band")
# --attacker_every_n_steps 2 (not by default): the variant's name -> the variant it halves the attacker phase of
EVERY2 = {"mp_lora_every2": "mp_lora", "smp_lora_every2": "smp_lora", "smp_t_band_every2": "smp_t_band"}
LABELS = {"lora": "LoRA", "mp_lora": "MP-LoRA (paper features)", "smp_lora": "SMP-LoRA (paper features)",
          "smp_calibrated": "SMP-LoRA, calibrated multi-t proxy (the frontier's)",
          "smp_t_loss": "SMP-LoRA, calibrated (t, loss) proxy (issue 17 candidate)",
          "smp_t_band": "SMP-LoRA, calibrated (t, loss) proxy banded at t < 400",
          "mp_lora_every2": "MP-LoRA (paper features), attacker phase every 2nd step",
          "smp_lora_every2": "SMP-LoRA (paper features), attacker phase every 2nd step",
          "smp_t_band_every2": "SMP-LoRA, banded calibrated (t, loss) proxy, attacker phase every 2nd step"}


def variant_flags(variant: str) -> tuple[str, list[str]]:
    """(training method, extra flags) of a variant; the SMP-LoRA variants of the frontier take their flags from its
    sweep file (configs/frontier/demo.toml), at lambda 1, so the bench measures what the frontier measured."""
    if variant in ("lora", "mp_lora", "smp_lora"):
        return variant, []
    if variant in EVERY2:
        method, flags = variant_flags(EVERY2[variant])
        return method, [*flags, "--attacker_every_n_steps", "2"]
    import toml

    sweep = toml.loads((REPO_ROOT / "configs" / "frontier" / "demo.toml").read_text())
    run = next(r for r in sweep["run"] if r.get("label") == variant)
    return run["method"], [str(f) for f in run.get("flags", [])] + ["--privacy_lambda", "1.0"]


def build_sd15_stack(seed: int = 0):
    """SD v1.5's UNet, VAE and text encoder with seeded random weights, and the demo's small CLIP tokenizer."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.demo.tiny import DIGIT_WORDS
    from library.sd.bundle import ModelBundle, make_noise_scheduler
    from library.sd.configs import (
        SD15_TEXT_ENCODER_CONFIG,
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
    )
    from library.sd.text import build_clip_tokenizer, small_clip_vocab

    tokenizer = build_clip_tokenizer(*small_clip_vocab(DIGIT_WORDS), model_max_length=77)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_ENCODER_CONFIG, **ids}))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return ModelBundle(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                       noise_scheduler=make_noise_scheduler(), source=f"sd15-random:seed={seed}")


def make_fixture(root: Path, architecture: str = "sd15", resolution: int = 512) -> tuple[Path, Path]:
    """The random model folder (SD v1.5, or the demo's tiny stack) and a split of 8 digits at ``resolution`` px (2 per
    membership set)."""
    from library.data.dataset import scan_dataset
    from library.data.manifest import write_manifest
    from library.data.splits import make_split
    from library.demo.digits import write_digits_dataset
    from library.demo.tiny import build_tiny_stack, save_tiny_folder

    save_tiny_folder(build_sd15_stack() if architecture == "sd15" else build_tiny_stack(), root / "model")
    write_digits_dataset(root / "images", resolution=resolution, limit=8)
    sizes = {"member_aux": 2, "member_test": 2, "nonmember_aux": 2, "nonmember_test": 2}
    write_manifest(make_split(scan_dataset(root / "images"), sizes=sizes, seed=0, dataset_root=root / "images"),
                   root / "split.json")
    return root / "model", root / "split.json"


def make_trainer(variant: str, model: Path, manifest: Path, out: Path, args: argparse.Namespace):
    from library.config import parse_config
    from library.train.config import TrainConfig
    from library.train.methods import method_class
    from library.train.trainer import Trainer

    method, extra = variant_flags(variant)
    # the frontier's flags set an attacker batch of 4, the paper's is 1; no proxy monitor in the timed steps
    attacker = ["--attacker_batch_size", "1", "--attacker_eval_every_n_epochs", "100000"] \
        if method_class(method).has_attacker else []
    argv = ["--config_file", str(REPO_ROOT / "configs" / "pokemon" / f"{method}.toml"),
            "--pretrained_model_name_or_path", str(model), "--split_manifest", str(manifest),
            "--output_dir", str(out / variant), "--max_train_steps", "100000", "--no-progress_bar",
            "--save_every_n_epochs", "100000", "--mixed_precision", precision(args),
            "--resolution", str(args.resolution),
            # the 512 px latents are encoded once, by the first method, and read from disk by the others
            "--cache_latents_to_disk", "--latent_cache_dir", str(out / "latents"),
            *extra, *attacker]
    trainer = Trainer(parse_config(TrainConfig, argv), method)
    trainer.prepare()
    return trainer


def step_flops(trainer, cycle: int) -> float:
    """FLOPs per training step (forward and backward of every pass the method makes), over ``cycle`` steps."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for _ in range(cycle):
            trainer.step()
    return float(counter.get_total_flops()) / cycle


def measure(variant: str, model: Path, manifest: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step (mean of ``args.steps`` after the warm-up, rounded up to whole attacker cycles), FLOPs per
    step and peak memory."""
    cuda = args.device == "cuda"
    trainer = make_trainer(variant, model, manifest, out, args)
    cycle = trainer.config.attacker_every_n_steps  # steps with and without the attacker phase, in proportion
    flops = step_flops(trainer, cycle)  # also the warm-up: allocations and lazy initialisation are not the cost
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(-(-args.steps // cycle) * cycle):
        start = time.perf_counter()
        trainer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    memory = (torch.cuda.max_memory_allocated() if cuda
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del trainer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"s_step": statistics.mean(times), "flops": flops, "memory_gib": memory}


def precision(args: argparse.Namespace) -> str:
    """The trainer's ``--mixed_precision``: ``--precision``, where ``auto`` is bf16 autocast on CUDA, fp32 on the CPU."""
    if args.precision == "auto":
        return "bf16" if args.device == "cuda" else "no"
    return {"fp32": "no"}.get(args.precision, args.precision)


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where the trainer runs (it takes the GPU whenever one is visible)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method (after one warm-up step)")
    parser.add_argument("--drift", action="store_true",
                        help="time plain LoRA again at the end (the machine's drift; needs lora in --methods)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's dense peak TFLOP/s (e.g. 989 for an H100 SXM in bf16): prints MFU")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *EVERY2])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    parser.add_argument("--architecture", default="sd15", choices=["sd15", "tiny"],
                        help="sd15: the bench; tiny: the demo's stack, a smoke run of this script")
    parser.add_argument("--resolution", type=int, default=512, help="image size in pixels (the paper: 512)")
    args = parser.parse_args(argv)
    if args.drift and "lora" not in args.methods:
        parser.error("--drift times plain LoRA again at the end: add lora to --methods")
    torch.set_num_threads(args.threads)
    if (args.device == "cuda") != torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {'sees no' if args.device == 'cuda' else 'sees a'} CUDA device "
                         "(the trainer uses one whenever it is visible; CUDA_VISIBLE_DEVICES= hides it)")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, manifest = make_fixture(root, args.architecture, args.resolution)
        order = [*args.methods, "lora"] if args.drift and "lora" in args.methods else list(args.methods)
        results: list[tuple[str, dict[str, float]]] = []
        for variant in order:
            results.append((variant, measure(variant, model, manifest, root / "out", args)))
            print(f"  {variant}: {results[-1][1]['s_step']:.2f} s/step", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    plain = statistics.mean(r["s_step"] for v, r in results if v == "lora") if "lora" in args.methods else None
    print(f"machine: {platform.machine()} {device}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), {'bf16 autocast' if precision(args) == 'bf16' else 'fp32'}; "
          f"{'SD v1.5' if args.architecture == 'sd15' else 'the tiny'} architecture (random weights), "
          f"{args.resolution} px, batch 1, Pokemon configs (rank 64, text-encoder LoRA, attacker batch 1+1); "
          f"mean of {args.steps} step(s) (whole attacker cycles) after a warm-up; "
          f"{(time.perf_counter() - started) / 60:.1f} min in all")
    memory_name = "peak GiB (max_memory_allocated)" if args.device == "cuda" else "peak RSS GiB (running max)"
    print(f"| method | s/step | x plain | TFLOP/step | achieved TFLOP/s | {memory_name} |"
          + (" MFU |" if args.peak_tflops else ""))
    print("|---|---:|---:|---:|---:|---:|" + ("---:|" if args.peak_tflops else ""))
    for variant, r in results:
        ratio = f"{r['s_step'] / plain:.2f}" if plain else "-"
        achieved = r["flops"] / r["s_step"] / 1e12
        mfu = f" {100 * achieved / args.peak_tflops:.1f} % |" if args.peak_tflops else ""
        print(f"| {LABELS[variant]} | {r['s_step']:.2f} | {ratio} | {r['flops'] / 1e12:.2f} | {achieved:.2f} "
              f"| {r['memory_gib']:.1f} |{mfu}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
