"""The README's main job, end to end with a tiny budget: data -> base -> 3 methods -> evaluate -> report."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load_file

from library.demo.run import run_demo, train_methods


def test_small_demo_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys, small_demo_settings):
    settings = small_demo_settings(tmp_path / "demo")
    report_md = run_demo(settings)
    report = json.loads((settings.workdir / "eval" / "report.json").read_text())
    models = {row["model"] for row in report["results"]}
    assert models == {"base", "lora", "mp_lora", "smp_lora"}
    assert {row["attack"] for row in report["results"]} >= {"paper", "loss", "calibrated"}
    text = report_md.read_text()
    assert "| smp_lora |" in text and "roc.png" in text
    for name in ("roc.png", "roc_loglog.png", "scores.csv", "samples_smp_lora.png"):
        assert (settings.workdir / "eval" / name).is_file(), name
    out = capsys.readouterr().out
    assert "| base |" in out  # the table is printed

    # A second run reuses the data, the base model and the LoRA files (nothing is retrained).
    stamp = (settings.workdir / "base_model" / "model_index.json").stat().st_mtime_ns
    lora_stamp = (settings.workdir / "lora" / "lora.safetensors").stat().st_mtime_ns
    run_demo(settings)
    assert (settings.workdir / "base_model" / "model_index.json").stat().st_mtime_ns == stamp
    assert (settings.workdir / "lora" / "lora.safetensors").stat().st_mtime_ns == lora_stamp

    # The trainings ran in parallel worker processes (3 at once, one thread each); one at a time in this
    # process, also with one thread, gives the very same files: each run is seeded, the schedule changes nothing.
    assert settings.jobs == 3 and torch.get_num_threads() == 1  # run_demo restored the tests' thread count
    serial = dataclasses.replace(settings, workdir=tmp_path / "serial", jobs=1, threads=1)
    files = train_methods(serial, settings.workdir / "base_model", settings.workdir / "data" / "split.json")
    for method, path in files.items():
        ours, theirs = load_file(path), load_file(settings.workdir / method / f"{method}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), method
