"""Orchestration of ``evaluate_mia.py``: manifest -> latents -> features per model -> attacks -> metrics -> report.

Models: the base model (row ``base``, the sanity reference: with an IID split its AUC should be ~0.5) and every
LoRA given. Samples: D_aux = member_aux + nonmember_aux (what attacks fit on) and D_te = member_test +
nonmember_test (where every reported number comes from). Metric conventions (``docs/evaluation.md``):

* AUC from the full ROC; |AUC - 0.5| / 0.5 is the paper's Table 1 "AUC" column;
* TPR at the largest FPR <= alpha (5 %, 1 %, 0.1 %), ``None`` ("n/a") when alpha * N_nonmembers < 1;
* ASR, oracle: best-threshold balanced accuracy on D_te (threshold attacks) or h''s argmax accuracy at the epoch
  chosen on D_te (the paper); ASR, honest: the threshold fitted on D_aux applied to D_te, or h' at the epoch chosen
  on a held-out part of D_aux;
* stratified percentile-bootstrap 95 % CIs for AUC and TPR@5%FPR.

The stages live in their own modules, which never import this one: the records passed between them
(:mod:`library.eval.records`), the manifest and LoRA files (:mod:`library.eval.inputs`), the base model
(:mod:`library.eval.models`), the features (:mod:`library.eval.features`), the attacks
(:mod:`library.eval.attacks`), utility and sample quality (:mod:`library.eval.quality`) and the report
(:mod:`library.eval.report`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.errors import ConfigError
from library.eval import audit, metrics, quality, report
from library.eval.attacks.base import AttackInputs, FeatureSet, ScoreSet
from library.eval.attacks.registry import build_attacks
from library.eval.bootstrap import bootstrap_auc_tpr_ci
from library.eval.conditioning import Conditioning, resolve_conditioning
from library.eval.config import EvalConfig
from library.eval.extractors import load_extractors
from library.eval.features import FeatureEngine, FeatureSettings, ModelFeatures, Sample
from library.eval.inputs import (
    SplitIdentity,
    check_base_model,
    check_lora_layouts,
    load_samples,
    model_specs,
)
from library.eval.models import load_bundle, process_bundle, resolve_device
from library.eval.probes import evaluation_latent_seed
from library.eval.records import (
    BASE_NAME,
    EVAL_SPLITS,
    EvalResult,
    EvalSamples,
    ModelSpec,
)
from library.outputs import OutputLock, check_output_dir
from library.runtime import (
    PRECISION_DTYPES,
    machine,
    provenance,
    use_deterministic_kernels,
)
from library.sd.loading import native_resolution, text_encoder_layers
from library.sd.text import check_clip_skip_layers
from library.workers import WorkerPool

if TYPE_CHECKING:
    from library.data.manifest import SplitManifest

FPR_TARGETS = (0.05, 0.01, 0.001)


# ------------------------------------------------------------------------------------------------ metrics


def score_metrics(labels: np.ndarray, score_set: ScoreSet, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Every number of one (model, attack variant) on D_te (``labels`` and the score set restricted to D_te)."""
    y, s = labels, score_set.scores
    auc = metrics.roc_auc(y, s)
    out: dict[str, Any] = {
        "n_members": int(y.sum()),
        "n_nonmembers": int(y.size - y.sum()),
        "auc": auc,
        "auc_deviation": metrics.auc_deviation(auc),
        "tpr_at_fpr": {str(a): metrics.tpr_at_fpr(y, s, a) for a in FPR_TARGETS},
        "asr_oracle": None,
        "asr_honest": None,
    }
    _, best_bal = metrics.best_threshold(y, s)
    out["best_threshold_balanced_accuracy"] = best_bal
    if score_set.kind == "threshold":
        out["asr_oracle"] = best_bal
        if score_set.threshold is not None:
            tau = score_set.threshold
            tpr, fpr = metrics.rates_at_threshold(y, s, tau)
            out["asr_honest"] = 0.5 * (tpr + 1.0 - fpr)
            out["honest_threshold"] = tau
            out["honest_tpr"], out["honest_fpr"] = tpr, fpr
    else:
        assert score_set.member_probs is not None
        # The column's measure for every attack, so "private = 50" holds on an unbalanced D_te too (Pokemon's
        # 233/200): balanced accuracy of the classifier's own decision, p(member) > 0.5. The paper's ASR is the
        # plain accuracy of that decision (argmax_asr); on a balanced D_te the two are one number.
        asr = metrics.balanced_accuracy(y, score_set.member_probs > 0.5)
        out["asr_oracle" if score_set.checkpoint == "oracle" else "asr_honest"] = asr
        out["argmax_asr"] = metrics.argmax_asr(y, score_set.member_probs)
    if n_bootstrap > 0:
        ci, ci5 = bootstrap_auc_tpr_ci(y, s, 0.05, n_boot=n_bootstrap, seed=seed)
        out["auc_ci"] = list(ci)
        out["tpr_at_5pct_fpr_ci"] = list(ci5) if ci5 else None
    else:
        out["auc_ci"] = out["tpr_at_5pct_fpr_ci"] = None
    return out


# ------------------------------------------------------------------------------------------------ the run


def _feature_set(features: ModelFeatures, timesteps: tuple[int, ...]) -> FeatureSet:
    paper = None if features.paper is None else features.paper.numpy()
    probes = {probe: {name: value.double().numpy() for name, value in outputs.items()}
              for probe, outputs in features.probes.items()}
    return FeatureSet(features.losses.double().numpy(), timesteps, paper, probes)


@dataclass
class FeatureJob:
    """One model's feature computation: everything a worker process needs besides the base model."""

    config: EvalConfig
    spec: ModelSpec
    settings: FeatureSettings
    samples: list[Sample]
    latents: torch.Tensor
    base_fingerprint: str
    manifest_sha: str
    device: torch.device


def model_features(job: FeatureJob, bundle: Any = None) -> tuple[ModelFeatures, float]:
    """(features, seconds) of one model; ``bundle`` None = this process's own copy (a worker)."""
    config = job.config
    in_worker = bundle is None
    engine = FeatureEngine(process_bundle(config, job.device) if in_worker else bundle, job.settings,
                           device=job.device, dtype=PRECISION_DTYPES[config.mixed_precision], batch_size=config.batch_size,
                           cache_dir=None if config.no_cache else _cache_root(config) / "features",
                           base_fingerprint=job.base_fingerprint, manifest_sha256=job.manifest_sha,
                           progress=config.progress_bar and not in_worker)  # bars of several processes interleave
    probes = [probe for attack in build_attacks(config, job.device) for probe in attack.probes()]
    t0 = time.perf_counter()
    features = engine.compute(job.spec.name, job.samples, job.latents, job.spec.lora, job.spec.lora_sha256,
                              probes=probes, unet=job.spec.unet)
    return features, time.perf_counter() - t0


def _cache_root(config: EvalConfig) -> Path:
    return Path(config.cache_dir) if config.cache_dir else Path(config.output_dir) / "cache"


def compute_features(config: EvalConfig, specs: list[ModelSpec], samples: EvalSamples, manifest_sha: str,
                     device: torch.device, info: dict[str, Any], pool: WorkerPool) -> dict[str, ModelFeatures]:
    """Load the base model, encode latents once, then features of every model (cached; ``pool.jobs`` at once)."""
    from library.data.latents import LatentCache
    from library.eval.unet_weights import check_unet_weights
    from library.sd.bundle import vae_fingerprint
    from networks.lora import create_network_from_weights

    dtype = PRECISION_DTYPES[config.mixed_precision]
    t0 = time.perf_counter()
    bundle = load_bundle(config, device, fingerprint=True)
    # Fail fast on a LoRA or UNet for another model, before any long feature computation.
    for spec in specs:
        if spec.lora_path is not None:
            create_network_from_weights(1.0, spec.lora, bundle.vae, bundle.text_encoder, bundle.unet)
        if spec.unet is not None:
            check_unet_weights(spec.unet, bundle.unet, bundle.text_encoder)
    base_fp = bundle.loaded_fingerprint  # fp32 weights, as training records them (also the cache keys' base)
    info["base_fingerprint"] = base_fp
    check_base_model(config, specs, base_fp)
    latent_cache = LatentCache(bundle.vae, vae_fingerprint(bundle.vae), config.resolution,
                               None if config.no_cache else _cache_root(config) / "latents",
                               batch_size=config.vae_batch_size, mode=config.latent_mode,
                               seed=evaluation_latent_seed(config.seed), full_determinism=config.full_determinism)
    with pool.in_process():  # on --threads threads, as the features: a VAE pass's last bits depend on the count
        latents = latent_cache.get_many([s.path for s in samples.samples], [s.sha256 for s in samples.samples])
    info["timing_s"] = {"load_and_latents": time.perf_counter() - t0}
    settings = FeatureSettings(
        timesteps=tuple(config.timesteps), num_noise_draws=config.num_noise_draws, seed=config.seed,
        paper_features=config.paper_features if "paper" in config.attacks else None,
        paper_min_timestep=config.paper_min_timestep, paper_max_timestep=config.paper_max_timestep,
        paper_draws=config.paper_draws,
        resolution=config.resolution, clip_skip=config.clip_skip, max_token_length=config.max_token_length,
        multiplier=config.network_multiplier, dtype=str(dtype).replace("torch.", ""),
        full_determinism=config.full_determinism, latent_mode=config.latent_mode,
    )
    # --network_multiplier scales LoRAs only: the base's and full fine-tunes' features (and cache keys) are those
    # of any multiplier
    unscaled = dataclasses.replace(settings, multiplier=1.0)
    jobs = [FeatureJob(config, spec, settings if spec.lora_path is not None else unscaled, samples.samples, latents,
                       base_fp, manifest_sha, device)
            for spec in specs]
    if pool.parallel:
        del bundle, latent_cache  # the workers load their own copies
        results = pool.map(model_features, jobs)
    else:
        with pool.in_process():
            results = [model_features(job, bundle) for job in jobs]
    features = {spec.name: f for spec, (f, _) in zip(specs, results)}
    info["timing_s"].update({f"features[{spec.name}]": seconds for spec, (_, seconds) in zip(specs, results)})
    info["feature_settings"] = settings.as_dict()
    info["feature_cache"] = {name: {"key": f.cache_key, "hit": f.cache_hit} for name, f in features.items()}
    info["probe_runs"] = {name: f.probe_runs for name, f in features.items() if f.probe_runs}
    return features


@dataclass
class AttackJob:
    """Every attack on one model: fit on D_aux, score every sample, metrics on D_te."""

    config: EvalConfig
    model: str
    inputs: AttackInputs
    samples: EvalSamples
    device: torch.device


def attack_model(job: AttackJob) -> tuple[list[ScoreSet], list[dict[str, Any]], dict[str, Any]]:
    """(score sets over all samples, one metrics row per attack variant, the attacks' settings) of one model."""
    config, inputs = job.config, job.inputs
    aux, test, labels = job.samples.aux_index, job.samples.test_index, job.samples.labels
    score_sets: list[ScoreSet] = []
    rows: list[dict[str, Any]] = []
    settings: dict[str, Any] = {}
    for attack in build_attacks(config, job.device):
        attack.fit(inputs.subset(aux), labels[aux], oracle=(inputs.subset(test), labels[test]))
        settings[attack.name] = {**attack.settings(), "threat_model": attack.threat_model,
                                 "citation": attack.citation, "queries_per_sample": attack.queries_per_sample(),
                                 "probes": [probe.name for probe in attack.probes()]}
        for score_set in attack.score(inputs):
            score_sets.append(score_set)
            test_set = dataclasses.replace(score_set, scores=score_set.scores[test],
                                           member_probs=None if score_set.member_probs is None
                                           else score_set.member_probs[test])
            row = {"model": job.model, "attack": score_set.attack, "variant": score_set.variant,
                   "label": score_set.label, "kind": score_set.kind, "headline": score_set.headline,
                   "checkpoint": score_set.checkpoint, "floor": attack.floor}
            row.update(score_metrics(labels[test], test_set, config.n_bootstrap, config.seed))
            row["info"] = {k: v for k, v in score_set.info.items() if k != "curve_asr"}
            if "curve_asr" in score_set.info:
                row["info"]["selection_curve_asr"] = score_set.info["curve_asr"]
            rows.append(row)
    return score_sets, rows, settings


def run_attacks(config: EvalConfig, specs: list[ModelSpec], samples: EvalSamples, features: dict[str, ModelFeatures],
                device: torch.device, pool: WorkerPool,
                ) -> tuple[dict[str, list[ScoreSet]], list[dict[str, Any]], dict[str, Any]]:
    """Fit every attack on D_aux and score every sample, for every model (``pool.jobs`` at once); metrics on D_te."""
    timesteps = tuple(config.timesteps)
    base = _feature_set(features[BASE_NAME], timesteps)
    jobs = [AttackJob(config, spec.name, AttackInputs(_feature_set(features[spec.name], timesteps), base), samples,
                      device) for spec in specs]
    results = pool.map(attack_model, jobs)
    all_scores = {spec.name: score_sets for spec, (score_sets, _, _) in zip(specs, results)}
    rows = [row for _, model_rows, _ in results for row in model_rows]
    attack_settings = {name: value for _, _, settings in results for name, value in settings.items()}
    return all_scores, rows, attack_settings


def evaluate(config: EvalConfig) -> EvalResult | None:
    """Run the whole evaluation and write the report into ``config.output_dir`` (``--dry_run``: check, print the
    plan and return None).

    Everything that needs no model weights is checked first (output folder, base model files, manifest, LoRA
    files, their training conditioning) and only then are the folders created, so a refused evaluation leaves
    nothing behind. The output folder is locked for the run, so two evaluations into one folder never interleave
    their files.
    """
    from library.sd.loading import check_sd_model  # noqa: PLC0415

    folders = [(config.output_dir, "--output_dir")]
    if config.cache_dir and not config.no_cache:
        folders.append((config.cache_dir, "--cache_dir"))
    for folder, flag in folders:  # checked now, created once the inputs are read
        check_output_dir(folder, flag, create=False)
    output_dir = Path(config.output_dir)
    check_sd_model(config.pretrained_model_name_or_path, tokenizer_path=config.tokenizer_path,
                   allow_pickle=config.allow_pickle)
    if config.dry_run:
        return dry_run(config, output_dir)
    if config.full_determinism:  # before any model runs (cuBLAS reads its setting once); workers: WorkerPool
        use_deterministic_kernels()
    inputs = read_inputs(config)
    for folder, flag in folders:
        check_output_dir(folder, flag)
    with OutputLock(output_dir, "--output_dir"):
        check_earlier_report(config, output_dir)
        return _evaluate_locked(output_dir, inputs)


def check_earlier_report(config: EvalConfig, output_dir: Path) -> None:
    """Refuse a ``--output_dir`` that holds a finished evaluation (its ``report.json``) unless ``--overwrite``.
    An interrupted evaluation (files without ``report.json``) needs no flag."""
    if config.overwrite or not (output_dir / report.REPORT_FILE).is_file():
        return
    # Another folder recomputes nothing if it reads the same feature cache.
    reuse = "" if config.cache_dir or config.no_cache else f" with --cache_dir {output_dir / 'cache'} to reuse its features"
    raise ConfigError(f"--output_dir {output_dir} already holds a finished evaluation ({report.REPORT_FILE}); "
                      f"pass --overwrite to replace it, or choose another --output_dir{reuse}")


@dataclass
class EvalInputs:
    """The checked inputs of a run (:func:`read_inputs`), read before any SD weight."""

    config: EvalConfig  # the run's, with the conditioning below in place of its own
    manifest: SplitManifest
    samples: EvalSamples
    split: SplitIdentity
    specs: list[ModelSpec]
    conditioning: Conditioning  # how the models were trained to be conditioned (library.eval.conditioning)


def read_inputs(config: EvalConfig) -> EvalInputs:
    """The manifest, samples and model specs, checked, and the config with the models' training conditioning."""
    manifest, samples, split = load_samples(config)
    specs = model_specs(config, split)
    check_lora_layouts(specs)  # a file that is no LoRA at all fails here, before any SD weight is read
    # The conditioning the LoRAs were trained with (library.eval.conditioning), recorded in the report's config.
    conditioning = resolve_conditioning(config, specs, native_resolution(config.pretrained_model_name_or_path))
    if (layers := text_encoder_layers(config.pretrained_model_name_or_path)) is not None:
        check_clip_skip_layers(layers, conditioning.clip_skip)  # before any weight is read, in --dry_run too
    config = dataclasses.replace(config, clip_skip=conditioning.clip_skip,
                                 max_token_length=conditioning.max_token_length, resolution=conditioning.resolution)
    if config.quality:
        quality.check_utility_reference(config, specs)
        quality.warn_without_metric(config)
    check_attacks(config, samples)
    return EvalInputs(config, manifest, samples, split, specs, conditioning)


def check_attacks(config: EvalConfig, samples: EvalSamples) -> None:
    """Build every attack on the CPU (their own option checks; the image-space attacks load their feature weights)
    and check it against D_aux's labels: one error line before any SD weight is read, in ``--dry_run`` too."""
    for attack in build_attacks(config, torch.device("cpu")):
        attack.check_labels(samples.labels[samples.aux_index])


def dry_run(config: EvalConfig, output_dir: Path) -> None:
    """``--dry_run``: every check of a real run that needs no SD weights, then the plan on one line."""
    check_earlier_report(config, output_dir)
    inputs = read_inputs(config)
    config, samples, specs = inputs.config, inputs.samples, inputs.specs
    if config.quality:
        load_extractors(config, torch.device("cpu"))
    n_test = sum(name.endswith("_test") for name in samples.splits)
    print(f"dry run: {len(specs)} model(s) ({', '.join(s.name for s in specs)}), attacks {', '.join(config.attacks)}, "
          f"fitted on {len(samples.splits) - n_test} D_aux and scored on {n_test} D_te images at "
          f"{inputs.conditioning.resolution} px; would write {output_dir}/{report.REPORT_FILE}; nothing computed",
          flush=True)


def _evaluate_locked(output_dir: Path, inputs: EvalInputs) -> EvalResult:
    """Everything after the checks, in the locked ``output_dir``: features, attacks, audit, utility, report."""
    config, manifest, samples, specs = inputs.config, inputs.manifest, inputs.samples, inputs.specs
    manifest_sha = inputs.split.manifest_sha256
    device = resolve_device(config.device)
    # --quality: load the feature weights first, so a missing or corrupt file fails before any long computation.
    extractors = load_extractors(config, device) if config.quality else []
    info: dict[str, Any] = {"manifest_sha256": manifest_sha, "split_sha256": inputs.split.split_sha256,
                            "manifest_seed": manifest.seed,
                            "manifest_sizes": {k: v for k, v in manifest.sizes().items() if k in EVAL_SPLITS},
                            "device": str(device), "machine": machine(), "provenance": provenance(),
                            "conditioning": inputs.conditioning.as_dict()}
    with WorkerPool(config.jobs, config.threads, deterministic=config.full_determinism) as pool:
        features = compute_features(config, specs, samples, manifest_sha, device, info, pool)
        t0 = time.perf_counter()
        scores, rows, attack_settings = run_attacks(config, specs, samples, features, device, pool)
        info["timing_s"]["attacks_and_metrics"] = time.perf_counter() - t0
        info["attack_settings"] = attack_settings
        # The suite's audit (library.eval.audit): every row's empirical epsilon; per model the worst case's
        # set-level audit and epsilon.
        audit.add_row_epsilons(rows, scores, samples.splits, config.epsilon_delta)
        info["privacy_audit"] = audit.privacy_audit(rows, scores, samples.splits, {s.name: s.metadata for s in specs},
                                                    config.audit_alpha, config.epsilon_delta, seed=config.seed)
        # Utility (library.eval.quality): held-out losses always (free: the attack features hold them); samples,
        # grids and FD/KID with --quality.
        info["utility"] = quality.heldout_losses(features, samples.splits, config.timesteps)
        # This run's first file goes into output_dir next. A report replaced with --overwrite stays until now (a
        # failed run keeps it) and goes first (a killed run leaves no finished-looking report beside new files).
        report.clear_replaced(output_dir)
        if config.quality:
            t0 = time.perf_counter()
            info["quality"] = quality.run_quality(config, specs, manifest, device, extractors,
                                                  output_dir, info["utility"], pool)
            info["timing_s"]["quality"] = time.perf_counter() - t0
    result = EvalResult(config, specs, samples, features, scores, rows, info)
    report.write_report(result, output_dir)
    return result


__all__ = ["evaluate", "score_metrics"]
