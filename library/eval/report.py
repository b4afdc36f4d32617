"""Writing an MIA evaluation: ``report.json``, ``report.md``, ``scores.csv``, ``roc.png``, ``roc_loglog.png``, ``hist.png``.

``report.json`` holds every number (with sample counts, seeds and the hashes of the base model, each LoRA and
the manifest) so a table can be re-derived without re-running anything; ``scores.csv`` holds every per-sample
score, so any metric can be re-computed from it. Everything is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from library import __version__
from library.config import config_to_dict
from library.eval.extractors import extractor_notes
from library.eval.quality import (
    GRID_PREFIX,
    PER_T_PREFIX,
    WORSE_THAN_BASE,
    worse_than_base,
)
from library.eval.summary import results_table, suite_sections
from library.fileio import atomic_write_path, atomic_write_text, json_safe

if TYPE_CHECKING:
    from library.eval.records import EvalResult

REPORT_FORMAT = "smp-lora-mia-report"
REPORT_VERSION = 1
REPORT_FILE = "report.json"  # written last: it marks a finished evaluation
CONVENTIONS = {
    "score": "higher = member",
    "auc_deviation": "|AUC - 0.5| / 0.5 (paper Table 1 'AUC')",
    "tpr_at_fpr": "TPR at the largest ROC FPR <= alpha; null (n/a) when alpha * n_nonmembers < 1",
    "asr_oracle": "threshold attacks: best-threshold balanced accuracy on D_te; paper h': argmax accuracy at "
                  "the epoch with the best D_te accuracy (the paper's protocol)",
    "asr_honest": "threshold attacks: balanced accuracy on D_te at the threshold fitted on D_aux; classifier attacks "
                  "(paper h' at the epoch chosen on a held-out part of D_aux, GSA, black-box, reconstruction, "
                  "ReDiffuse, blind): balanced accuracy on D_te of the decision p(member) > 0.5 of the classifier "
                  "fitted on D_aux (argmax_asr: its plain accuracy, the paper's ASR; equal on a balanced D_te)",
    "ci": "stratified percentile bootstrap, 95 %",
    "noise": "the same (t, eps) per (sample, timestep, draw) for every model",
    "worst_case": "per model: the headline attack with the highest AUC on D_te; floor rows (blind) and rows whose "
                  "checkpoint was chosen on D_te (paper h' [oracle ckpt]) excluded",
    "set_audit": "one-sided Mann-Whitney U of the worst-case scores, D^m_te (suspects) vs D^nm_te, Bonferroni over "
                 "the n_attacks it was chosen from (p_value = min(1, n_attacks * p_value_single)); n_needed: the "
                 "smallest n whose median p over 200 seeded n-subsets is < audit_alpha / n_attacks (null: not reached)",
    "epsilon_lb": "max(log((TPR_lo - delta)/FPR_hi), log((1 - FPR_hi - delta)/(1 - TPR_lo))), >= 0, two-sided "
                  "Clopper-Pearson at 'confidence' (95 % per result row; 1 - 0.05 / n_attacks for a model's worst "
                  "case); honest: the D_aux decision rule; oracle: max over D_te thresholds (optimistic)",
}
# What each held-out loss of library.eval.quality means; each feature extractor labels its own metrics.
LOSS_NOTES = {
    "loss_member_test": "mean per-sample denoising loss on D^m_te at the evaluation timesteps (same noise for "
                        "every model)",
    "loss_nonmember_test": "the same on D^nm_te (held-out images the LoRA never saw)",
    "loss_gap": "loss_nonmember_test - loss_member_test (> 0: the model fits its members better)",
}


def metric_notes() -> dict[str, str]:
    """The label of every utility metric: the held-out losses, then each registered extractor's metrics."""
    return {**LOSS_NOTES, **extractor_notes()}


def score_column(model: str, label: str) -> str:
    """The scores.csv column of one (model, attack variant)."""
    return f"{model}|{label}"


def report_dict(result: "EvalResult") -> dict[str, Any]:
    samples = result.samples
    counts = {name: int(sum(1 for s in samples.splits if s == name)) for name in dict.fromkeys(samples.splits)}
    return json_safe({
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created_by": f"smp-lora {__version__}",
        "config": config_to_dict(result.config),
        "base_model": {"path": result.config.pretrained_model_name_or_path,
                       "fingerprint": result.info.get("base_fingerprint")},
        "manifest": {"path": result.config.split_manifest, "sha256": result.info.get("manifest_sha256"),
                     "seed": result.info.get("manifest_seed"), "sizes": result.info.get("manifest_sizes")},
        "models": [m.record() for m in result.models],
        "samples": {"counts": counts, "n_aux": int(samples.aux_index.size), "n_test": int(samples.test_index.size)},
        "seeds": {"noise_attacks_bootstrap": result.config.seed, "split": result.info.get("manifest_seed")},
        "features": {"settings": result.info.get("feature_settings"), "cache": result.info.get("feature_cache"),
                     # per model and probe: UNet queries actually computed (shared queries once), seconds, cache
                     "probes": result.info.get("probe_runs")},
        # Caption encoding (library.eval.conditioning): the LoRAs' training values, a flag or the default.
        "conditioning": result.info.get("conditioning"),
        "attacks": result.info.get("attack_settings"),
        "conventions": CONVENTIONS,
        "device": result.info.get("device"),
        "machine": result.info.get("machine"),  # the CPU model too: seeded trainings can differ by it
        "provenance": result.info.get("provenance"),  # the command line and the code's version (git commit)
        "timing_s": result.info.get("timing_s"),
        "results": result.rows,
        # Per model: the worst case over the suite, its set-level audit and empirical epsilon (library.eval.audit).
        "privacy_audit": result.info.get("privacy_audit"),
        # Per-model utility (library.eval.quality): held-out losses always; FD/KID with --quality.
        "utility": result.info.get("utility"),
        "quality": result.info.get("quality"),
        "utility_metrics": _utility_notes(result),
    })


# ------------------------------------------------------------------------------------------------ utility


def _utility_notes(result: "EvalResult") -> dict[str, str]:
    """What each utility number present in the report means (proxy metrics are labelled as such)."""
    present = {k for row in (result.info.get("utility") or {}).values() for k in row}
    notes = {k: v for k, v in metric_notes().items() if k in present}
    notes.update({k: f"loss_nonmember_test at t = {k.removeprefix(PER_T_PREFIX)} only (a defence that raises the "
                     "error at small t for everyone loses fine detail that the mean hides)"
                  for k in sorted(present) if k.startswith(PER_T_PREFIX)})
    return notes


def _utility_table(result: "EvalResult") -> list[str]:
    """One row per model: held-out losses, then each quality metric present (proxy columns say so)."""
    utility: dict[str, dict[str, Any]] = result.info.get("utility") or {}
    if not utility:
        return []
    keys = list(dict.fromkeys(k for row in utility.values() for k in row if not k.endswith("_std")))
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for model, row in utility.items():
        cells = []
        for k in keys:
            value, std = row.get(k), row.get(f"{k}_std")
            cells.append("n/a" if value is None else f"{value:.4g}" + (f" ± {std:.2g}" if std is not None else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ markdown


def _conditioning_line(conditioning: dict[str, Any] | None) -> list[str]:
    if not conditioning:
        return []
    sources = sorted(set(conditioning["source"].values()))
    size = f", images at {conditioning['resolution']} px" if "resolution" in conditioning else ""
    return [f"- captions encoded with clip_skip {conditioning['clip_skip']} and {conditioning['max_token_length']} "
            f"tokens{size} (from: {', '.join(sources)})"]


def _overrides_line(cfg: Any) -> list[str]:
    """The checks this evaluation was told to skip, and a LoRA strength other than 1: what a reader must know."""
    notes = [text for flag, text in (
        ("allow_manifest_mismatch", "a LoRA trained on other splits may be evaluated (--allow_manifest_mismatch): "
                                    "its membership labels may be wrong"),
        ("allow_base_mismatch", "a LoRA trained on another base model may be evaluated (--allow_base_mismatch)"),
        ("allow_conditioning_mismatch", "the caption encoding or image size may differ from the LoRAs' training "
                                        "(--allow_conditioning_mismatch)"),
    ) if getattr(cfg, flag, False)]
    if cfg.network_multiplier != 1.0:
        notes.append(f"every LoRA applied at strength {cfg.network_multiplier:g} (--network_multiplier)")
    return [f"- **override**: {note}" for note in notes]


def report_markdown(result: "EvalResult") -> str:
    cfg, info = result.config, result.info
    rows = result.rows
    n_m = rows[0]["n_members"] if rows else 0
    n_nm = rows[0]["n_nonmembers"] if rows else 0
    lines = [
        "# Membership-inference evaluation",
        "",
        f"- base model: `{cfg.pretrained_model_name_or_path}` (fingerprint `{str(info.get('base_fingerprint'))[:16]}`)",
        f"- split manifest: `{cfg.split_manifest}` (sha256 `{str(info.get('manifest_sha256'))[:16]}`), "
        f"sizes {info.get('manifest_sizes')}",
        f"- D_te: {n_m} members / {n_nm} non-members; attacks fit on D_aux "
        f"({result.samples.aux_index.size} samples)",
        f"- features: loss at t = {list(cfg.timesteps)} x {cfg.num_noise_draws} noise draws (same noise for every "
        f"model), seed {cfg.seed}"
        + ("" if "paper" not in cfg.attacks else f"; paper h' on `{cfg.paper_features}`"
           + ("" if cfg.paper_features == "multi_t_loss" else
              f" at t ~ U[{cfg.paper_min_timestep}, {cfg.paper_max_timestep}), {cfg.paper_draws} draw(s) per sample")),
        *(["- clean latents: one VAE posterior draw per image, the same for every model (--latent_mode sample)"]
          if cfg.latent_mode == "sample" else []),  # the default (the posterior's mean) is docs/attacks.md's
        *_conditioning_line(info.get("conditioning")),
        *_overrides_line(cfg),
        *(f"- model `{m.name}`: `{m.path}` (sha256 `{str(m.sha256)[:16]}`)" for m in result.models if m.path),
        "",
        "## Main results (paper Table 1 columns first)",
        "",
        *results_table([r for r in rows if r["headline"]]),
        "",
        # The suite's tables are read back from the report dict, as for any finished report.json.
        *suite_sections(report_dict(result)),
    ]
    others = [r for r in rows if not r["headline"]]
    if others:
        lines += ["## Per-timestep variants", "", *results_table(others), ""]
    utility_lines = _utility_table(result)
    if utility_lines:
        quality = info.get("quality")
        lines += ["## Utility (per model)", "", *utility_lines, ""]
        lines += [f"- **{k}**: {v}" for k, v in _utility_notes(result).items()]
        lines += [f"- **`{model}` denoises worse than the base model** (by > {WORSE_THAN_BASE:.0%}) at "
                  + ", ".join(f"t = {t}: {value:.4g} against {base:.4g}" for t, value, base in worse)
                  + " on held-out images: the adaptation lost detail there"
                  for model, worse in worse_than_base(info.get("utility") or {}).items()]
        if quality:
            lines.append(
                f"- samples: {quality['num_images']} per model from D_te captions, {quality['sampler']} "
                f"{quality['steps']} steps, guidance {quality['guidance_scale']}, seed {quality['seed']}; compared "
                f"with the {quality['n_reference']} real `{quality['reference']}` images; KID subset size "
                f"{quality['kid_subset_size']}; grids: {', '.join(f'`{g}`' for g in quality['grids'].values())}")
            floor = quality.get("real_vs_real_floor") or {}
            if floor:
                lines.append("- real-vs-real floor (two halves of the reference set; KID's is the floor, a Fréchet "
                             "distance at half the size is biased upward and not comparable with the rows): "
                             + ", ".join(f"{k} {v:.4g}" for k, v in floor.items()
                                         if v is not None and not k.endswith("_std")))
        else:
            lines.append("- no sample-quality metrics: run with --quality (and --digit_feature_weights / "
                         "--inception_weights) for FD/KID")
        lines.append("")
    lines += [
        "## Conventions",
        "",
        *[f"- **{k}**: {v}" for k, v in CONVENTIONS.items()],
        "- The `base` rows attack the base model without any LoRA: with an IID split their AUC should be ~0.5 "
        "(a sanity check against distribution shift between members and non-members).",
        "- `paper h' [oracle ckpt]` picks h''s epoch on D_te itself, as the paper does (attacker-favourable); "
        "`[honest ckpt]` picks it on held-out D_aux.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CSV


def scores_csv(result: "EvalResult") -> str:
    samples = result.samples
    columns: list[tuple[str, Any]] = []
    for model, score_sets in result.scores.items():
        for s in score_sets:
            columns.append((score_column(model, s.label), s.scores))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "split", "label", *[name for name, _ in columns]])
    for i, (path, split, label) in enumerate(zip(samples.rel_paths, samples.splits, samples.labels)):
        writer.writerow([path, split, int(label), *[repr(float(values[i])) for _, values in columns]])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ plots


def _headline_labels(result: "EvalResult") -> list[str]:
    return list(dict.fromkeys(r["label"] for r in result.rows if r["headline"]))


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 2)
    return max(1, math.ceil(n / cols)), max(1, cols)


def _save(fig: Any, path: Path) -> None:
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_roc(result: "EvalResult", path: Path, loglog: bool) -> None:
    """One panel per headline attack, one ROC curve per model (on D_te)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from library.eval.metrics import roc_curve

    labels = _headline_labels(result)
    rows, cols = _grid(len(labels))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.5 * rows), squeeze=False)
    test = result.samples.test_index
    y = result.samples.labels[test]
    n_nm = int((y == 0).sum())
    floor = 1.0 / max(n_nm, 1)
    for ax, label in zip(axes.flat, labels):
        for model, score_sets in result.scores.items():
            for s in score_sets:
                if s.label != label:
                    continue
                fpr, tpr, _ = roc_curve(y, s.scores[test])
                auc = next(r["auc"] for r in result.rows if r["model"] == model and r["label"] == label)
                if loglog:
                    ax.loglog(np.clip(fpr, floor / 2, 1), np.clip(tpr, floor / 2, 1), label=f"{model} (AUC {auc:.3f})")
                else:
                    ax.plot(fpr, tpr, label=f"{model} (AUC {auc:.3f})")
        if loglog:
            ax.loglog([floor / 2, 1], [floor / 2, 1], "k:", lw=0.8)
            ax.set_xlim(floor / 2, 1)
            ax.set_ylim(floor / 2, 1)
        else:
            ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"ROC on D_te ({int(y.sum())} members / {n_nm} non-members)" + (", log-log" if loglog else ""))
    _save(fig, path)
    plt.close(fig)


def plot_histograms(result: "EvalResult", path: Path) -> None:
    """Member vs non-member score histograms on D_te: rows = models, columns = headline attacks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = _headline_labels(result)
    models = list(result.scores)
    fig, axes = plt.subplots(len(models), max(1, len(labels)), figsize=(3.6 * max(1, len(labels)), 2.6 * len(models)),
                             squeeze=False)
    test = result.samples.test_index
    y = result.samples.labels[test]
    for i, model in enumerate(models):
        by_label = {s.label: s for s in result.scores[model]}
        for j, label in enumerate(labels):
            ax = axes[i, j]
            s = by_label.get(label)
            if s is None:
                ax.axis("off")
                continue
            values = s.scores[test]
            lo, hi = float(values.min()), float(values.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 25)
            # stairs: one artist per histogram (ax.hist makes a patch per bar)
            ax.stairs(np.histogram(values[y == 1], bins)[0], bins, fill=True, alpha=0.6, label="member")
            ax.stairs(np.histogram(values[y == 0], bins)[0], bins, fill=True, alpha=0.6, label="non-member")
            ax.set_title(f"{model}: {label}", fontsize=8)
            # Counts on the y axis say nothing the overlap does not (every panel has the same D_te), and tick
            # layout is most of the drawing time of a suite-wide grid (17 models x 15 attacks: 9 s instead of 22 s)
            ax.set_yticks([])
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def clear_replaced(output_dir: Path) -> None:
    """Before an evaluation writes its first file into ``output_dir``: remove the finished one it replaces
    (``--overwrite``): its report.json (a killed run must not leave it beside new files) and its sample grids (a
    model of that run, or a run with ``--quality``, would otherwise leave ``samples_<model>.png`` beside a report
    that has none). The rest of its files are rewritten or removed by :func:`write_report`."""
    replaced = output_dir / REPORT_FILE
    if replaced.is_file():
        for grid in output_dir.glob(f"{GRID_PREFIX}*.png"):
            grid.unlink(missing_ok=True)
    replaced.unlink(missing_ok=True)


def write_report(result: "EvalResult", output_dir: Path) -> dict[str, Path]:
    """Write every output file; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / REPORT_FILE,
        "markdown": output_dir / "report.md",
        "csv": output_dir / "scores.csv",
    }
    atomic_write_text(paths["markdown"], report_markdown(result))
    atomic_write_text(paths["csv"], scores_csv(result))
    plots = {"roc": output_dir / "roc.png", "roc_loglog": output_dir / "roc_loglog.png", "hist": output_dir / "hist.png"}
    if result.config.plots:
        paths.update(plots)
        plot_roc(result, paths["roc"], loglog=False)
        plot_roc(result, paths["roc_loglog"], loglog=True)
        plot_histograms(result, paths["hist"])
    else:  # an earlier run's plots would sit beside this report as if they were its own
        for stale in plots.values():
            stale.unlink(missing_ok=True)
    # report.json last: it marks a finished evaluation (``--overwrite``), so a kill never leaves one that looks
    # finished beside another run's scores.
    atomic_write_text(paths["json"], json.dumps(report_dict(result), indent=2, allow_nan=False) + "\n")
    return paths


__all__ = ["CONVENTIONS", "clear_replaced", "LOSS_NOTES", "REPORT_FILE", "REPORT_FORMAT", "metric_notes", "report_dict", "report_markdown",
           "results_table", "score_column", "scores_csv", "write_report"]
