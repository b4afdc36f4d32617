"""The main job on the embedded default: LoRA vs MP-LoRA vs SMP-LoRA on packaged digits, then attack them.

Steps (each cached in the work dir, so a second run reuses the data, base model and latents):

1. scikit-learn's digits -> a captioned 32 px image folder ("a handwritten digit seven").
2. A split manifest: members / non-members (D^m_aux, D^m_te, D^nm_aux, D^nm_te) and a DISJOINT
   ``pretrain`` portion.
3. A tiny SD-shaped base model pre-trained on the ``pretrain`` portion only (no member or non-member
   image is ever seen by the base), and a small digit classifier whose features give a proxy
   Fréchet distance (learned features, not Inception: labelled as a proxy).
4. LoRA, MP-LoRA and SMP-LoRA from ``configs/tiny/*.toml``, and the best defence of the frontier's sweep
   (``DemoSettings.defence``), with the same budget and seed (``jobs`` of them at a time, in worker processes,
   by :func:`train_all`: each run is seeded and runs on :data:`TRAINING_THREADS` torch threads whatever ``jobs``,
   so the files are bit-identical for any ``jobs``; docs/determinism.md). Each run is a
   :class:`~library.train.config.TrainConfig` built here (:func:`tiny_train_config`) and handed to the worker as is.
5. ``evaluate_mia`` on the LoRA files and the base model, with the quality proxy (an
   :class:`~library.eval.config.EvalConfig` from :func:`demo_eval_config`).
6. A Table-1-style summary read from ``eval/report.json`` (the worst case over the attacks per model:
   :func:`library.eval.summary.worst_case`), printed and written to ``<workdir>/report.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from library.config import load_config, parse_flags
from library.data.dataset import scan_dataset
from library.data.digit_captions import digit_label
from library.data.manifest import pretrain_records, read_manifest, write_manifest
from library.data.splits import make_split
from library.demo.findings import findings
from library.demo.sweep import sweep_run
from library.errors import ConfigError
from library.eval.config import EvalConfig
from library.eval.summary import main_results_table, privacy_utility_table
from library.outputs import OutputLock, check_output_dir
from library.train.config import METHODS, TrainConfig
from library.train.methods import method_class

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_SWEEP = REPO_ROOT / "configs" / "frontier" / "demo.toml"  # the privacy-utility sweep on the demo
#: torch threads of every demo training, in a worker or in this process: a thread count changes a LoRA file's last
#: bits, so it must not follow ``jobs``. One: what the tiny stack runs fastest on (see library/workers.py).
TRAINING_THREADS = 1


# The best defence the privacy-utility sweep found on this demo (docs/results.md, 2026-12-04)
DEFAULT_DEFENCE = "smp_t_band-privacy_lambda2p0"


@dataclass
class DemoSettings:
    """Everything the demo varies; the defaults are the README's main command."""

    workdir: Path = REPO_ROOT / "runs" / "demo"  # a relative --workdir is the caller's, as the launchers' paths
    # torch threads for pre-training the base model. One by default: with two, the pre-trained weights differ in
    # their last bits from run to run on CPU (measured 2026-12-03, docs/determinism.md), and every later number
    # with them; two are ~30 % faster (VAE 141 s -> 100 s) for who does not need bit-identical reruns. Evaluation
    # and every training run on one thread whatever this says (TRAINING_THREADS).
    threads: int = 1
    seed: int = 0
    split_sizes: dict[str, int] = field(default_factory=lambda: {
        "member_aux": 50, "member_test": 50, "nonmember_aux": 50, "nonmember_test": 50})
    # The new concept (issue 16): the base model is pre-trained on these digits only, and the membership sets are
    # drawn from the others, so the LoRA learns classes the base never saw and its utility is measurable apart from
    # memorisation. None: the first edition's i.i.d. demo (base pre-trained on every class, minus the sets).
    base_digits: tuple[int, ...] | None = (0, 1, 2, 3, 4)
    pretrain_images: int | None = None  # None = every image not in the membership sets (base_digits None only)
    pretrain_kwargs: dict = field(default_factory=dict)  # budget overrides for library.demo.pretrain
    feature_net_kwargs: dict = field(default_factory=dict)
    # TrainConfig / EvalConfig fields set for every training run / for the evaluation (beating configs/tiny);
    # a list of command-line flags (["--max_train_epochs", "2"]) is accepted and converted.
    train_overrides: dict[str, Any] = field(default_factory=dict)
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    # The run of configs/frontier/demo.toml with this name (default: DEFAULT_DEFENCE), trained and attacked by the
    # demo itself beside the paper's three methods, so that its table shows what does hold without the ~70 min
    # sweep. None: the paper's three only.
    defence: str | None = DEFAULT_DEFENCE
    retrain: bool = False  # retrain the LoRAs even when their files exist
    jobs: int = 3  # trainings run at once (both cores stay busy to the end)
    # models evaluated at once (evaluate_mia --jobs), one process and thread each
    eval_jobs: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        if self.base_digits is not None and self.pretrain_images is not None:
            raise ConfigError("pretrain_images applies to the i.i.d. demo only (base_digits None): the new-concept "
                              "base pre-trains on every image of its base_digits")
        if self.defence:  # an unknown run name, or one the demo cannot train and audit, fails now, not after
            run = sweep_run(DEMO_SWEEP, self.defence)  # pre-training
            if (run.overrides.get("train_mode") == "full" or run.overrides.get("with_prior_preservation")
                    or run.save_every_n_epochs):
                raise ConfigError(f"--defence {self.defence}: the demo's fifth row is a LoRA run of the sweep (not a "
                                  "full fine-tune, a DreamBooth run or an early-stopping curve, which the frontier "
                                  f"trains and attacks: scripts/frontier.py --only {run.label})")
        if isinstance(self.train_overrides, (list, tuple)):
            self.train_overrides = parse_flags(TrainConfig, self.train_overrides, "train_overrides")
        if isinstance(self.eval_overrides, (list, tuple)):
            self.eval_overrides = parse_flags(EvalConfig, self.eval_overrides, "eval_overrides")


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _timed(step: str, fn: Callable[[], object], timings: dict[str, float]) -> object:
    start = time.perf_counter()
    result = fn()
    timings[step] = round(time.perf_counter() - start, 1)
    _log(f"{step}: {timings[step]:.1f} s")
    return result


def prepare_data(settings: DemoSettings) -> Path:
    """Digits folder and split manifest (cached)."""
    from library.demo.digits import write_digits_dataset

    images = settings.workdir / "data" / "images"
    manifest = settings.workdir / "data" / "split.json"
    if manifest.is_file():
        # Everything in a work dir (LoRAs, caches, reports) belongs to its split: another size needs another dir.
        existing = {k: v for k, v in read_manifest(manifest, verify=False).sizes().items() if k in settings.split_sizes}
        if existing != settings.split_sizes:
            raise ConfigError(f"{manifest} holds a split of {existing}, not the {settings.split_sizes} asked for: give "
                              "another --workdir (its LoRAs and reports belong to that split)")
    else:
        if images.exists():
            shutil.rmtree(images)
        write_digits_dataset(images, resolution=32)
        if settings.base_digits is None:
            pretrain = "rest" if settings.pretrain_images is None else settings.pretrain_images
            split = make_split(scan_dataset(images), sizes=settings.split_sizes, seed=settings.seed,
                               dataset_root=images, pretrain=pretrain)
        else:
            base_digits = set(settings.base_digits)
            split = make_split(scan_dataset(images), sizes=settings.split_sizes, seed=settings.seed,
                               dataset_root=images, base_domain=lambda r: digit_label(r.caption) in base_digits)
        write_manifest(split, manifest)
    return manifest


def classifier_records(manifest: Path) -> list:
    """The images the digit classifier trains on: every image outside the member and non-member sets (the
    base's pre-training images and the unused ones), so that it reads the new classes too and is independent of
    what it judges."""
    from library.data.dataset import ImageCaption

    split = read_manifest(manifest, verify=False)
    return [ImageCaption(split.abs_path(e), e.caption, e.repeats) for e in split.pretrain + split.unused]


def prepare_base_model(settings: DemoSettings, manifest: Path) -> Path:
    """The tiny base model, pre-trained on the pretrain portion only (cached)."""
    from library.demo.pretrain import pretrain_base_model

    base = settings.workdir / "base_model"
    if not (base / "model_index.json").is_file():
        pretrain_base_model(pretrain_records(manifest), base, seed=settings.seed, threads=settings.threads,
                            log=_log, **settings.pretrain_kwargs)
    return base


def prepare_feature_net(settings: DemoSettings, manifest: Path) -> Path:
    """The digit classifier behind the proxy Fréchet distance and the conditional accuracy (cached)."""
    from library.demo.digit_classifier import train_digit_feature_net_on_records

    path = settings.workdir / "digit_features.safetensors"
    if not path.is_file():
        train_digit_feature_net_on_records(classifier_records(manifest), out_path=path, seed=settings.seed,
                                           **settings.feature_net_kwargs)
    return path


def tiny_train_config(settings: DemoSettings, config_name: str, base: Path, manifest: Path, output_dir: Path,
                      output_name: str, overrides: Mapping[str, Any]) -> TrainConfig:
    """``configs/tiny/<config_name>.toml`` pointed at the demo's base model, split and latent cache, writing
    ``<output_dir>/<output_name>.safetensors``; ``overrides`` (TrainConfig fields) beat all of it."""
    return load_config(TrainConfig, REPO_ROOT / "configs" / "tiny" / f"{config_name}.toml", {
        "pretrained_model_name_or_path": str(base), "split_manifest": str(manifest), "output_dir": str(output_dir),
        "output_name": output_name, "latent_cache_dir": str(settings.workdir / "latent_cache"), **overrides})


def demo_eval_config(settings: DemoSettings, base: Path, manifest: Path, loras: list[Path], output_dir: Path,
                     feature_net: Path | None, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
    """evaluate_mia on ``loras`` (and the base model) at 32 px with the demo's caches, plus the digit-feature
    quality proxy when ``feature_net`` is given; ``overrides``, then ``settings.eval_overrides``, beat all of it."""
    values: dict[str, Any] = {
        "pretrained_model_name_or_path": str(base), "split_manifest": str(manifest),
        "network_weights": [str(p) for p in loras], "resolution": 32, "output_dir": str(output_dir),
        "cache_dir": str(settings.workdir / "eval_cache"), "jobs": settings.eval_jobs,
        "overwrite": True,  # the demo's own folder: each demo run evaluates again, from the cached features
        # The paper's h' (its MLP, optimiser, 100 epochs, balanced batches), given 16 (t, eps) draws per sample with
        # t < 500, where membership lives; the paper says neither. With upstream's one draw at t ~ U[0, 1000) it was
        # at chance on a plain LoRA that the loss attack catches at AUC 0.92 (docs/results.md section 12).
        "paper_draws": 16, "paper_max_timestep": 500, **(overrides or {})}
    if feature_net is not None:
        # Samples are compared with the non-members (images of the fine-tuned classes the LoRA never saw), never
        # with the members: utility must measure what generalises.
        values.update(quality=True, quality_features="digits", digit_feature_weights=str(feature_net),
                      quality_reference="nonmembers")
    return load_config(EvalConfig, None, {**values, **settings.eval_overrides})


def train_one(job: tuple[str, TrainConfig]) -> None:
    """One training run (``(method, config)``); also the body of a worker process."""
    from library.train.trainer import train

    method, config = job
    train(config, method)


def fill_latent_caches(configs: list[TrainConfig]) -> None:
    """Encode the images of runs that share an on-disk latent cache into it now, in this process, with the
    trainer's own code (:func:`library.train.data.attach_latents`) on :data:`TRAINING_THREADS` threads.

    Why: each image is then encoded once, not once per worker. The bits do not rest on it any more: the cache
    encodes a request in fixed batches and keys each latent on its batch's size and the thread count, so a run
    reads only what it would encode itself (docs/determinism.md). Before both, runs filling one cache at once
    could find another run's batch half written, encode the rest in other batches (an image encoded in a batch of
    one differs in the last bits from the same image in a batch of eight) and train on latents ~1e-6 apart (issue
    14's flaky demo test).
    """
    import torch

    from library.runtime import torch_threads
    from library.train.data import attach_latents, load_training_records
    from library.train.setup import load_models

    groups: dict[tuple, list[TrainConfig]] = {}
    for config in configs:
        if config.cache_latents_to_disk and config.latent_cache_dir:  # else each run has a cache of its own
            groups.setdefault((config.latent_cache_dir, config.pretrained_model_name_or_path, config.split_manifest,
                               config.train_data_dir, config.resolution, config.vae_batch_size, config.latent_mode,
                               config.seed if config.latent_mode == "sample" else None), []).append(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the trainer's (make_accelerator)
    for config, *others in groups.values():
        if not others:
            continue
        with torch_threads(TRAINING_THREADS), torch.random.fork_rng(devices=[]):
            bundle, _, _ = load_models(config, device)
            attach_latents(load_training_records(config, needs_aux=False), bundle, config, device)


def train_all(runs: list[tuple[str, TrainConfig]], jobs: int) -> None:
    """Train ``runs`` (``(method, config)`` pairs, started in order), ``jobs`` at a time in worker processes.

    The files are bit-identical to training the runs one by one in this process: every run gets
    :data:`TRAINING_THREADS` threads in either, and a latent cache they share is filled before they start
    (:func:`fill_latent_caches`).
    """
    from library.workers import WorkerPool

    jobs = max(1, min(jobs, len(runs)))
    if jobs > 1:
        fill_latent_caches([config for _, config in runs])
    with WorkerPool(jobs, TRAINING_THREADS) as pool:
        pool.map(train_one, runs)


def demo_runs(settings: DemoSettings) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``{name: (method, configs/tiny config, overrides)}`` of the demo's trainings: LoRA, MP-LoRA and SMP-LoRA,
    then ``settings.defence`` (its method, config and flags from the frontier's sweep file)."""
    runs: dict[str, tuple[str, str, dict[str, Any]]] = {m: (m, m, {}) for m in METHODS}
    if settings.defence:
        run = sweep_run(DEMO_SWEEP, settings.defence)
        runs[run.name] = (run.method, method_class(run.method).base_config, run.overrides)
    return runs


_PRESENTATION = frozenset({"progress_bar", "log_every_n_steps", "logging_dir"})  # change no trained weight


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def unfinished_reason(final: Path, overrides: Mapping[str, Any]) -> str | None:
    """Why the run that writes ``final`` is not done (None when it is): no final file or record (the record is
    written after the LoRA: a run killed between, say by an interrupted retrain, is redone), or a record trained
    with other settings than ``overrides`` (TrainConfig fields) now give."""
    record = final.with_suffix(".json")
    if not (final.is_file() and record.is_file()):
        return "not trained yet"
    try:
        trained = json.loads(record.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its run record is unreadable"
    for key, value in overrides.items():
        if key not in _PRESENTATION and _normal(trained.get(key)) != _normal(value):
            return f"its settings changed since it was trained ({key} = {trained.get(key)!r}, now {value!r})"
    return None


def train_methods(settings: DemoSettings, base: Path, manifest: Path) -> dict[str, Path]:
    """The runs of :func:`demo_runs` from configs/tiny with the same budget and seed (those not done yet)."""
    runs = demo_runs(settings)
    paths = {name: settings.workdir / name / f"{name}.safetensors" for name in runs}
    todo = []
    for name in runs:
        reason = unfinished_reason(paths[name], {**settings.train_overrides, **runs[name][2]})
        if reason is not None and reason != "not trained yet":
            _log(f"{name}: trained again, {reason}")
        if settings.retrain or reason is not None:
            todo.append(name)
    jobs = min(settings.jobs, len(todo)) if todo else 1
    # Progress bars from several processes would interleave, so parallel runs print their plan and result lines
    # only (this beats settings.train_overrides).
    quiet = {"progress_bar": False} if jobs > 1 else {}
    configs = {name: tiny_train_config(settings, runs[name][1], base, manifest, settings.workdir / name, name,
                                       {"overwrite": settings.retrain or paths[name].is_file(),
                                        **settings.train_overrides, **runs[name][2],
                                        **quiet}) for name in todo}
    # The slowest runs first, so the plain run fills the gap.
    order = sorted(todo, key=lambda name: -method_class(runs[name][0]).step_cost)
    if jobs > 1:
        _log(f"training {', '.join(order)}: {jobs} at a time, {TRAINING_THREADS} thread(s) each")
    train_all([(runs[name][0], configs[name]) for name in order], jobs)
    return paths


def evaluate_methods(settings: DemoSettings, base: Path, manifest: Path, loras: dict[str, Path],
                     feature_net: Path | None) -> Path:
    """evaluate_mia on the three LoRA files (plus the base model, always included)."""
    from library.eval.run import evaluate

    out = settings.workdir / "eval"
    evaluate(demo_eval_config(settings, base, manifest, list(loras.values()), out, feature_net))
    return out


def frontier_rows(workdir: Path) -> list[tuple[str, dict, str]]:
    """The last row of the demo's table: the best defence ``scripts/frontier.py`` found on this work dir (its
    ``frontier.json``), from the frontier's own report (same D_te, same attack settings); none before it ran."""
    folder = workdir / "frontier"
    try:
        best = json.loads((folder / "frontier.json").read_text()).get("best_defence")
        report = json.loads((folder / "eval" / "report.json").read_text())
    except (OSError, ValueError):
        return []
    if not best:
        return []
    value = f" = {best['value']}" if best.get("knob") else ""
    return [(f"{best['model']} (frontier's best: {best['curve']}, {best.get('knob') or ''}{value})", report,
             best["model"])]


def _machine_line(report: dict[str, Any]) -> str:
    """The evaluation's machine in words (MP-LoRA's and the banded row's numbers depend on the CPU model)."""
    machine = report.get("machine") or {}
    return f"{machine.get('cpu', 'an unrecorded CPU')} ({machine.get('cores', '?')} cores), torch {machine.get('torch', '?')}"


def summarise(settings: DemoSettings, eval_dir: Path, timings: dict[str, float]) -> Path:
    """Print the headline table and write <workdir>/report.md pointing at every artefact."""
    report = json.loads((eval_dir / "report.json").read_text())
    eval_md = (eval_dir / "report.md").read_text()
    extra = frontier_rows(settings.workdir)
    chosen = "is the best defence the privacy-utility sweep found on this demo (configs/frontier/demo.toml, " \
        "measured in docs/results.md)" if settings.defence == DEFAULT_DEFENCE else \
        "is a run of the privacy-utility sweep (configs/frontier/demo.toml) chosen with --defence"
    note = (f"`{settings.defence}` {chosen}, trained here with the same budget and seed. " if settings.defence else "")
    note += ("The last row is the best defence `scripts/frontier.py` found on this work dir (of the runs keeping "
              "U >= 0.9: the most U at worst-case AUC <= 0.60, else the most U with no detectable signal (suite-wide "
              "p >= 0.05), else the lowest worst-case AUC; the lowest of all when none keeps U), from its own "
              "evaluation on the same D_te."
              if extra else f"`.venv/bin/python scripts/frontier.py --workdir {settings.workdir}` re-runs the whole "
              "sweep on this work dir (about 70 min on 2 cores at 50 + 50 images) and adds its best defence as a "
              "last row.")
    total = sum(timings.values())
    split = read_manifest(settings.workdir / "data" / "split.json", verify=False)
    base_classes = sorted({digit_label(e.caption) for e in split.pretrain})
    new_classes = sorted({digit_label(e.caption) for e in split.members()})
    lines = [
        "# smp-lora demo: membership inference against LoRA, MP-LoRA and SMP-LoRA",
        "",
        f"A tiny SD-shaped model pre-trained on {len(split.pretrain)} packaged digit images (digits "
        f"{', '.join(map(str, base_classes))}); each method fine-tuned on the same {len(split.members())} member "
        f"digits (D_tr; digits {', '.join(map(str, new_classes))}) with the same budget and seed; the attacks fit on "
        f"D_aux ({len(split.member_aux)} members + {len(split.nonmember_aux)} non-members) and are scored on D_te "
        f"({len(split.member_test)} members vs {len(split.nonmember_test)} non-members). See the README, "
        "'Reading the demo table'.",
        "",
        f"Wall time: {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}), "
        f"pre-training on {settings.threads} torch thread(s), {settings.jobs} trainings and {settings.eval_jobs} "
        f"evaluated models at once, one thread each; on {_machine_line(report)}.",
        "",
        "## Privacy and utility",
        "",
        *privacy_utility_table(report, extra),
        "",
        note,
        "",
        *findings(report),
        "Plots: [ROC](eval/roc.png), [ROC log-log](eval/roc_loglog.png), [score histograms](eval/hist.png); "
        "samples: `eval/samples_*.png`; per-sample scores: `eval/scores.csv`; every number: `eval/report.json`.",
        "",
        eval_md.replace("# Membership-inference evaluation", "## Membership-inference evaluation"),
    ]
    path = settings.workdir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(main_results_table(report)))
    print("\n" + "\n".join(privacy_utility_table(report, extra)) + "\n" + note)
    print("\n".join(findings(report)[2:]))
    _log(f"report: {path} ({len(report['results'])} rows); plots and samples in {eval_dir}")
    return path


def shared_preparation(workdir: Path) -> OutputLock:
    """The lock around building what every run on ``workdir`` shares (data, base model, digit feature net): a second
    demo or frontier started on the same work dir waits for it, then finds them built (without it, one deleted the
    images the other was writing)."""
    check_output_dir(workdir, "--workdir")
    return OutputLock(workdir, "--workdir", wait=True)


def run_demo(settings: DemoSettings) -> Path:
    from library.runtime import torch_threads

    timings: dict[str, float] = {}
    with shared_preparation(settings.workdir):
        with torch_threads(settings.threads):  # restored afterwards (the tests run the demo in-process)
            manifest = _timed("data", lambda: prepare_data(settings), timings)
            base = _timed("base model", lambda: prepare_base_model(settings, manifest), timings)
        with torch_threads(1):
            feature_net = _timed("digit feature net", lambda: prepare_feature_net(settings, manifest), timings)
    with torch_threads(1):
        loras = _timed("training", lambda: train_methods(settings, base, manifest), timings)
        eval_dir = _timed("evaluation", lambda: evaluate_methods(settings, base, manifest, loras, feature_net),
                          timings)
        return summarise(settings, eval_dir, timings)

