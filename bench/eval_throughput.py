#!/usr/bin/env python
"""Throughput of the MIA feature engine against a bare batched UNet forward over the same latents (issue 17).

On the demo's base model, split and a LoRA file (``runs/demo`` from ``bash scripts/demo.sh``), the feature engine
computes the fixed-t losses of every sample (K timesteps x M noise draws, each query with its own seeded noise,
the captions encoded, the LoRA applied; no cache) and the paper's random-t queries. The floor is a bare loop over
the same number of rows in the same batch size: ``unet(noisy, t, states)`` on pre-built inputs, nothing else.
The ratio engine / bare is how much of the UNet's throughput the engine's bookkeeping keeps.

    .venv/bin/python bench/eval_throughput.py [--workdir runs/demo] [--lora runs/demo/lora/lora.safetensors]

Prints queries per second for both and their ratio (the median of ``--rounds`` interleaved rounds); never a test.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from library.cli import ArgumentParser, offline_environment, run_cli

offline_environment()

import torch  # noqa: E402 - after offline_environment()


def main(argv: Sequence[str] | None = None) -> None:
    from library.data.latents import LatentCache
    from library.data.manifest import read_manifest
    from library.eval.features import (
        FeatureEngine,
        FeatureSettings,
        Sample,
        applied_lora,
    )
    from library.sd.bundle import vae_fingerprint
    from library.sd.loading import load_sd_model
    from library.sd.text import encode_prompts

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--lora", type=Path, default=None, help="default: <workdir>/lora/lora.safetensors")
    parser.add_argument("--batch_size", type=int, default=16, help="queries per UNet pass (evaluate_mia's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lora = args.lora or args.workdir / "lora" / "lora.safetensors"

    bundle = load_sd_model(args.workdir / "base_model")
    split = read_manifest(args.workdir / "data" / "split.json", verify=False)
    entries = split.member_aux + split.member_test + split.nonmember_aux + split.nonmember_test
    samples = [Sample(split.abs_path(e), e.caption, e.sha256) for e in entries]
    latents = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), 32).get_many([s.path for s in samples])
    # The demo's evaluation settings: 4 timesteps x 2 draws, and h''s 16 random-t draws per sample.
    settings = FeatureSettings(timesteps=(50, 100, 200, 350), num_noise_draws=2, seed=0, paper_features="error_map",
                               paper_max_timestep=500, paper_draws=16, resolution=32)
    engine = FeatureEngine(bundle, settings, device=torch.device("cpu"), batch_size=args.batch_size, cache_dir=None,
                           base_fingerprint="bench", manifest_sha256="bench", progress=False)
    n_queries = len(samples) * (len(settings.timesteps) * settings.num_noise_draws + settings.paper_draws)

    def engine_run() -> float:
        start = time.perf_counter()
        engine.compute("lora", samples, latents, lora, "bench")
        return time.perf_counter() - start

    with applied_lora(bundle, lora, 1.0, torch.device("cpu"), torch.float32):
        states = encode_prompts(bundle.tokenizer, bundle.text_encoder, [s.caption for s in samples])
    rows = torch.arange(n_queries) % len(samples)
    generator = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, 1000, (n_queries,), generator=generator)
    clean = latents[rows]
    noisy = bundle.noise_scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), timesteps)
    conditioning = states[rows]

    @torch.no_grad()
    def bare_run() -> float:
        with applied_lora(bundle, lora, 1.0, torch.device("cpu"), torch.float32):
            start = time.perf_counter()
            for i in range(0, n_queries, args.batch_size):
                part = slice(i, i + args.batch_size)
                bundle.unet(noisy[part], timesteps[part], encoder_hidden_states=conditioning[part])
            return time.perf_counter() - start

    engine_run(), bare_run()  # warm-up
    times = {"engine": [], "bare": []}
    for _ in range(args.rounds):
        times["engine"].append(engine_run())
        times["bare"].append(bare_run())
    qps = {name: n_queries / statistics.median(values) for name, values in times.items()}
    print(f"machine: {platform.machine()} {platform.processor() or 'cpu'}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {len(samples)} samples x {n_queries // len(samples)} queries, batch "
          f"{args.batch_size}, LoRA {lora.name}; median of {args.rounds} interleaved rounds")
    print(f"feature engine: {qps['engine']:.0f} queries/s; bare UNet forward: {qps['bare']:.0f} queries/s; "
          f"engine / bare: {100 * qps['engine'] / qps['bare']:.1f} %")


if __name__ == "__main__":
    sys.exit(run_cli(main))
