"""The privacy-utility frontier (issue 7): sweep every method's knob, attack every run, plot the trade-off.

On the demo's data, base model and split (built or reused through :mod:`library.demo.run`):

1. a sweep file (``configs/frontier/*.toml``) lists runs: a method, the knob it sweeps, its values and extra
   training flags; each (method, value) is a :class:`~library.train.config.TrainConfig` that starts from the
   demo's ``configs/tiny/<config>.toml``, with the flags and ``<knob> = <value>`` on top. Plain LoRA saved
   every N epochs gives the *early-stopping* curve from one run (each checkpoint is an early-stopped model);
2. every LoRA file is attacked by ``evaluate_mia`` (every attack of the suite, calibrated included) with the
   learned-feature quality proxy;
3. per file: the **worst case over attacks** (:func:`library.eval.summary.worst_case`: the highest headline AUC
   with its bootstrap CI, and the highest TPR@1%FPR where the test set is large enough for it) against the
   utility: the held-out denoising loss on D^nm_te and the digit-feature Fréchet distance (a proxy, not FID);
4. ``frontier.md`` (table + the target check: AUC <= 0.60 under every attack at held-out loss within 10 % of
   plain LoRA's), ``frontier.png`` (one curve per method, CIs as error bars) and ``frontier.json``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from library.demo.run import (
    DEMO_SWEEP,
    DemoSettings,
    demo_eval_config,
    prepare_base_model,
    prepare_data,
    prepare_feature_net,
    shared_preparation,
    tiny_train_config,
    train_all,
)
from library.demo.run import (
    unfinished_reason as run_unfinished_reason,
)
from library.demo.sweep import SweepRun, read_sweep
from library.errors import ConfigError, DataError
from library.eval.quality import PER_T_PREFIX
from library.eval.summary import p_text, worst_case
from library.fileio import atomic_write_text
from library.runtime import provenance
from library.train.config import TrainConfig
from library.train.methods import method_class

TARGET_AUC = 0.60  # issue 7: "attack AUC <= 0.60 under every attack"
TARGET_LOSS_RATIO = 1.10  # "... with held-out denoising loss within 10 % of plain LoRA's"


@dataclass
class FrontierSettings:
    demo: DemoSettings = field(default_factory=DemoSettings)
    sweep: Path = DEMO_SWEEP
    out_dir: Path | None = None  # default <demo workdir>/frontier
    runs_filter: list[str] = field(default_factory=list)  # only these curve labels (empty: all)

    @property
    def out(self) -> Path:
        return self.out_dir or self.demo.workdir / "frontier"

    def run_folder(self, run: SweepRun) -> Path:
        """Where ``run`` trains: its LoRA, checkpoints and run record."""
        return self.out / "runs" / run.name


def train_config(settings: FrontierSettings, run: SweepRun, base: Path, manifest: Path) -> TrainConfig:
    """The run's TrainConfig: the demo's ``configs/tiny`` file of its method, quiet (runs go in parallel), the
    demo's ``train_overrides``, the run's own overrides, then its checkpoint interval and, for DreamBooth runs, the
    class-image folder they share (each beating the one before)."""
    placed = {"save_every_n_epochs": run.save_every_n_epochs} if run.save_every_n_epochs else {}
    if run.overrides.get("with_prior_preservation") and not run.overrides.get("class_data_dir"):
        placed["class_data_dir"] = str(settings.out / "class_images")  # the base's class images, generated once
    folder = settings.run_folder(run)
    # A run to train whose final file exists is retrained or was cut off before its record: it is redone.
    overwrite = settings.demo.retrain or (folder / f"{run.name}.safetensors").is_file()
    return tiny_train_config(settings.demo, method_class(run.method).base_config, base, manifest, folder,
                             run.name, {"progress_bar": False, "overwrite": overwrite,
                                        **settings.demo.train_overrides, **run.overrides, **placed})


def run_files(settings: FrontierSettings, run: SweepRun) -> list[tuple[Path, Any]]:
    """(LoRA file, knob value) of a finished run: the final file, plus its epoch checkpoints if any."""
    folder = settings.run_folder(run)
    final = folder / f"{run.name}.safetensors"
    if not run.save_every_n_epochs:
        return [(final, run.value)]
    files = checkpoints(folder, run.name)
    try:
        record = json.loads((folder / f"{run.name}.json").read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / run.name}.json: the run record of a finished run is missing or unreadable ({exc}); "
                        "retrain it (--retrain, or delete its folder)") from None
    epochs = record["epochs"][-1]["epoch"] if record.get("epochs") else None
    return files + [(final, epochs)]


def checkpoints(folder: Path, name: str) -> list[tuple[Path, int]]:
    """A run's epoch checkpoints ``<name>-NNNNNN.safetensors`` with their epochs (not ``-attacker`` files)."""
    pattern = re.compile(rf"{re.escape(name)}-(\d{{6}})\.safetensors")
    return sorted((path, int(match.group(1))) for path in folder.glob(f"{name}-*.safetensors")
                  if (match := pattern.fullmatch(path.name)))


def unfinished_reason(settings: FrontierSettings, run: SweepRun) -> str | None:
    """Why a run of the sweep is not done (None when it is): :func:`library.demo.run.unfinished_reason`."""
    return run_unfinished_reason(settings.run_folder(run) / f"{run.name}.safetensors", run.overrides)


def train_sweep(settings: FrontierSettings, runs: list[SweepRun], base: Path, manifest: Path) -> None:
    """Train the runs that are not done, ``demo.jobs`` at a time (slowest first)."""
    todo = []
    for run in runs:
        reason = unfinished_reason(settings, run)
        if reason is not None and reason != "not trained yet":
            print(f"{run.name}: trained again, {reason}", flush=True)
        if settings.demo.retrain or reason is not None:
            todo.append(run)
    for run in todo:  # a retrained run's table holds its own checkpoints only, not an earlier training's
        for path, _ in checkpoints(settings.run_folder(run), run.name):
            path.unlink()
            path.with_name(path.stem + "-attacker.safetensors").unlink(missing_ok=True)
    todo.sort(key=lambda r: -method_class(r.method).step_cost)
    jobs = max(1, min(settings.demo.jobs, len(todo)))
    train_all([(r.method, train_config(settings, r, base, manifest)) for r in todo], jobs)


def evaluate_sweep(settings: FrontierSettings, files: list[Path], base: Path, manifest: Path,
                   feature_net: Path, utility_reference: str | None = None) -> dict[str, Any]:
    """Every file (and the base model) attacked by the demo's evaluation, quietly; returns its report.json. The
    utility retained U counts in units of ``utility_reference``'s gain (a model name: the file's stem)."""
    from library.eval.run import evaluate

    out = settings.out / "eval"
    full = [f for f in files if (f.parent / f"{f.stem}-unet").is_dir()]  # full fine-tunes: their SD single file
    loras = [f for f in files if f not in full]
    evaluate(demo_eval_config(settings.demo, base, manifest, loras, out, feature_net,
                              {"progress_bar": False, "utility_reference": utility_reference,
                               "unet_weights": [str(f) for f in full]}))
    return json.loads((out / "report.json").read_text())


def frontier_points(report: dict[str, Any], runs: list[SweepRun], files: dict[str, tuple[SweepRun, Any]]) -> list[dict]:
    """One point per evaluated model: worst case over the attacks against the utility."""
    points = []
    worst_by_model = worst_case(report)
    names = {m["name"]: Path(m["path"]).stem if m.get("path") else None for m in report["models"]}
    for model, stem in names.items():
        worst = worst_by_model.get(model)
        if worst is None:
            continue
        run, value = files.get(stem, (None, None)) if stem else (None, None)
        utility = report.get("utility", {}).get(model, {})
        audit = report.get("privacy_audit", {}).get(model, {})
        points.append({
            "model": model, "curve": run.label if run else "base", "method": run.method if run else "base",
            "knob": run.knob if run else None, "value": value,
            "worst_auc": worst.auc, "worst_auc_ci": worst.auc_ci, "worst_attack": worst.attack,
            "worst_tpr_at_1pct_fpr": worst.tpr_at_fpr.get("0.01"),
            "worst_tpr_at_5pct_fpr": worst.tpr_at_fpr.get("0.05"),
            "heldout_loss": utility.get("loss_nonmember_test"), "member_loss": utility.get("loss_member_test"),
            "heldout_loss_by_t": {k.removeprefix(PER_T_PREFIX): v for k, v in utility.items()
                                  if k.startswith(PER_T_PREFIX)},
            "proxy_fd_digits": utility.get("proxy_fd_digits"),
            "conditional_accuracy": utility.get("conditional_accuracy"),
            "utility_retained": utility.get("utility_retained"),
            # One privacy axis for heuristic defences and DP-SGD: the measured lower bound on epsilon (worst-case
            # attack, threshold fitted on D_aux) beside the accountant's upper bound where the run has one.
            "epsilon_lb": (audit.get("epsilon_lb") or {}).get("honest"),
            # Is there any signal at all in the suite (library.eval.audit.worst_case_null)? The worst case is a
            # maximum over attacks, above 0.5 by chance alone; this p says whether it is more than that.
            "suite_p": (audit.get("worst_case_null") or {}).get("p_value"),
            "dp_epsilon": (audit.get("dp_epsilon") or {}).get("epsilon"),
        })
    return points


UTILITY_MEASURES = {"heldout_loss": "held-out loss", "proxy_fd_digits": "proxy FD (digits)"}


def target_check(points: list[dict]) -> list[str]:
    """Issue 7's target, computed for each utility measure: which runs reach worst-case AUC <= 0.60 with that
    measure within 10 % of plain LoRA's (the last plain-LoRA point). When the base model itself (no adaptation)
    is within the budget, the measure does not tell adapted from unadapted models, and the line says so."""
    plain = [p for p in points if p["method"] == "lora"]
    if not plain:
        return ["- no plain-LoRA point: the utility budget (plain LoRA + 10 %) is undefined"]
    reference = max(plain, key=lambda p: p["value"] if isinstance(p["value"], (int, float)) else -1)
    base = next((p for p in points if p["method"] == "base"), None)
    lines = []
    for key, name in UTILITY_MEASURES.items():
        if reference.get(key) is None:
            continue
        budget = reference[key] * TARGET_LOSS_RATIO
        lines.append(f"- **{name}** budget <= {budget:.4g} (plain LoRA `{reference['model']}`: {reference[key]:.4g}, + 10 %)")
        if base is not None and base.get(key) is not None and base[key] <= budget:
            lines.append(f"  - caveat: the base model, with no adaptation at all, is within it ({base[key]:.4g}): "
                         f"{name} does not measure what the LoRA learnt here, so a hit on it alone means little")
        runs = [p for p in points if p["method"] != "base" and p.get(key) is not None]
        hits = [p for p in runs if p["worst_auc"] <= TARGET_AUC and p[key] <= budget]
        if hits:
            lines += [f"  - REACHED by `{p['model']}`: worst-case AUC {p['worst_auc']:.3f}, {name} {p[key]:.4g}"
                      for p in hits]
            continue
        within = [p for p in runs if p[key] <= budget]
        best = min(within, key=lambda p: p["worst_auc"]) if within else None
        lines.append("  - NOT reached: no run has worst-case AUC <= 0.60 within this budget." + (
            f" Closest within budget: `{best['model']}` at AUC {best['worst_auc']:.3f} ({best['worst_attack']})."
            if best else ""))
    return lines + retained_check(points)


TARGET_RETAINED = 0.9  # issue 16: "a defence at worst-case AUC <= 0.60 that keeps U >= 0.9"


def retained_check(points: list[dict]) -> list[str]:
    """Issue 16's target: which defences reach worst-case AUC <= 0.60 while keeping U >= 0.9 (U: the share of plain
    LoRA's conditional-accuracy gain over the base); otherwise the highest U at AUC <= 0.60, if any."""
    runs = [p for p in points if p["method"] not in ("base", "lora") and p.get("utility_retained") is not None]
    if not runs:
        return []
    lines = [f"- **utility retained U** >= {TARGET_RETAINED} at worst-case AUC <= {TARGET_AUC}:"]
    hits = [p for p in runs if p["worst_auc"] <= TARGET_AUC and p["utility_retained"] >= TARGET_RETAINED]
    if hits:
        return lines + [f"  - REACHED by `{p['model']}`: worst-case AUC {p['worst_auc']:.3f}, U "
                        f"{p['utility_retained']:.2f}" for p in hits]
    private = [p for p in runs if p["worst_auc"] <= TARGET_AUC]
    best = max(private, key=lambda p: p["utility_retained"]) if private else None
    return lines + ["  - NOT reached." + (f" Highest U at AUC <= {TARGET_AUC}: `{best['model']}`, U "
                                          f"{best['utility_retained']:.2f} (AUC {best['worst_auc']:.3f})." if best else
                                          f" No defence reaches AUC <= {TARGET_AUC}.")] + chance_check(runs)


SUITE_ALPHA = 0.05  # "no detectable signal in the suite": suite-wide permutation p >= this


def chance_check(runs: list[dict]) -> list[str]:
    """Beside the AUC target: the defences in which the whole suite finds no signal (suite-wide permutation
    p >= 0.05; the worst case of a model with no signal exceeds 0.60 by chance alone on a small D_te)."""
    tested = [p for p in runs if p.get("suite_p") is not None]
    if not tested:
        return []
    silent = sorted((p for p in tested if p["suite_p"] >= SUITE_ALPHA), key=lambda p: -p["utility_retained"])
    head = f"- **no detectable signal** (suite-wide permutation p >= {SUITE_ALPHA}), by U:"
    if not silent:
        closest = max(tested, key=lambda p: p["suite_p"])
        return [head, f"  - none. Highest p: `{closest['model']}`, p {p_text(closest['suite_p'])} (AUC "
                      f"{closest['worst_auc']:.3f}, U {closest['utility_retained']:.2f})."]
    return [head] + [f"  - `{p['model']}`: p {p_text(p['suite_p'])}, worst-case AUC {p['worst_auc']:.3f}, U "
                     f"{p['utility_retained']:.2f}" for p in silent]


def best_defence(points: list[dict]) -> dict | None:
    """The defence the demo's table shows in its last row (the run ``DemoSettings.defence`` should name), of the
    runs that are neither the base model nor plain LoRA.

    Of the runs that keep the utility (U >= 0.9), the one keeping the most U at worst-case AUC <= 0.60 (issue 16's
    target); else the one keeping the most U in which the whole suite finds no detectable signal (suite-wide
    p >= 0.05: on a small D_te the AUC bar sits inside the noise, the permutation test does not); else the lowest
    worst-case AUC of those. Only when no run keeps the utility, the lowest worst-case AUC of all. A run that
    learns nothing (DP-SGD at a high noise multiplier) is thus never "best" while one that keeps the utility
    exists, however low its AUC.
    """
    runs = [p for p in points if p["method"] not in ("base", "lora")]
    useful = [p for p in runs if (p.get("utility_retained") or 0.0) >= TARGET_RETAINED]
    for chosen in ([p for p in useful if p["worst_auc"] <= TARGET_AUC],
                   [p for p in useful if (p.get("suite_p") or 0.0) >= SUITE_ALPHA]):
        if chosen:
            return max(chosen, key=lambda p: p["utility_retained"])
    return min(useful or runs, key=lambda p: p["worst_auc"]) if runs else None


def seed_spread(points: list[dict]) -> list[str]:
    """For the curves that sweep the training seed (knob ``seed``, configs/frontier/seeds.toml): mean and range over
    the seeds of the worst-case AUC, of U and of the suite-wide p: how much of one frontier point is its seed."""
    curves: dict[str, list[dict]] = {}
    for p in points:
        if p.get("knob") == "seed":
            curves.setdefault(p["curve"], []).append(p)
    if not curves:
        return []

    def spread(rows: list[dict], key: str, digits: int) -> str:
        values = [r[key] for r in rows if r.get(key) is not None]
        if not values:
            return "n/a"
        return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"

    lines = ["## Across training seeds", "",
             "Each curve below trains one configuration with several seeds (mean [min, max] over them); U counts in "
             "units of the first plain-LoRA run's gain, so the plain-LoRA row shows the noise of that unit too.", "",
             "| curve | seeds | worst AUC | U | conditional accuracy | suite-wide p [min, max] |",
             "|---|---|---|---|---|---|"]
    for curve, rows in curves.items():
        p_values = [r["suite_p"] for r in rows if r.get("suite_p") is not None]
        p_range = f"[{min(p_values):.3g}, {max(p_values):.3g}]" if p_values else "n/a"
        lines.append(f"| {curve} | {', '.join(str(r['value']) for r in rows)} | {spread(rows, 'worst_auc', 3)} | "
                     f"{spread(rows, 'utility_retained', 2)} | {spread(rows, 'conditional_accuracy', 3)} | {p_range} |")
    return lines


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fmt_p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def write_outputs(settings: FrontierSettings, points: list[dict], report: dict[str, Any]) -> Path:
    out = settings.out
    atomic_write_text(out / "frontier.json", json.dumps({"points": points, "best_defence": best_defence(points),
                                                         "provenance": provenance()}, indent=2))
    plot_frontier(points, out / "frontier.png")
    n_te = report["samples"]["counts"]
    lines = [
        "# Privacy-utility frontier on the demo data",
        "",
        f"Every LoRA of `{settings.sweep.name}` attacked by the full `evaluate_mia` suite (D_te: "
        f"{n_te.get('member_test')} members vs {n_te.get('nonmember_test')} non-members). Worst case = the "
        "headline attack with the highest AUC; TPR columns: the highest over the attacks (n/a at 1 % with fewer "
        "than 100 non-members). Utility: held-out denoising loss on D^nm_te and the digit-feature Fréchet "
        "distance of the generated images to the non-members (a PROXY, not FID), lower is better for both; the "
        "conditional accuracy of the samples and U, the share of plain LoRA's gain over the base it keeps. The maximum over several attack variants is biased upward on a small test set: the "
        "`base` row (no LoRA, no membership signal) shows that floor, and the suite-wide p (a permutation test of "
        "the maximum over the suite, docs/evaluation.md) says whether a worst case is more than it. Plot: [frontier.png](frontier.png); every "
        "number: `frontier.json`, `eval/report.json`.",
        "",
        "## Target (issue 7)",
        "",
        *target_check(points),
        "",
        "| curve | knob | value | worst AUC [95% CI] | worst attack | suite-wide p | TPR@5%FPR | TPR@1%FPR | "
        "ε measured ≥ | ε DP ≤ | held-out loss | member loss | proxy FD (digits) | conditional accuracy | U |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        ci = p["worst_auc_ci"] or [None, None]
        lines.append(f"| {p['curve']} | {p['knob'] or ''} | {_fmt(p['value'])} | {p['worst_auc']:.3f} "
                     f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {p['worst_attack']} | {_fmt_p(p.get('suite_p'))} | "
                     f"{_fmt(p['worst_tpr_at_5pct_fpr'])} | "
                     f"{_fmt(p['worst_tpr_at_1pct_fpr'])} | {_fmt(p.get('epsilon_lb'), 2)} | "
                     f"{_fmt(p.get('dp_epsilon'), 1)} | {_fmt(p['heldout_loss'], 4)} | {_fmt(p['member_loss'], 4)} | {_fmt(p['proxy_fd_digits'], 2)} | "
                     f"{_fmt(p.get('conditional_accuracy'))} | {_fmt(p.get('utility_retained'), 2)} |")
    spread = seed_spread(points)
    lines += ["", *spread] if spread else []
    path = out / "frontier.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def plot_frontier(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    curves = list(dict.fromkeys(p["curve"] for p in points))
    for ax, key, xlabel in ((axes[0], "heldout_loss", "held-out denoising loss on D^nm_te (lower = better)"),
                            (axes[1], "proxy_fd_digits", "digit-feature Fréchet distance (PROXY, lower = better)"),
                            (axes[2], "utility_retained", "utility retained U (conditional accuracy; higher = better)")):
        for curve in curves:
            pts = [p for p in points if p["curve"] == curve and p.get(key) is not None]
            if not pts:
                continue
            pts.sort(key=lambda p: p[key])
            x, y = [p[key] for p in pts], [p["worst_auc"] for p in pts]
            ci = [p["worst_auc_ci"] or [p["worst_auc"], p["worst_auc"]] for p in pts]
            err = [[yy - c[0] for yy, c in zip(y, ci)], [c[1] - yy for yy, c in zip(y, ci)]]
            ax.errorbar(x, y, yerr=err, marker="o" if curve != "base" else "*", capsize=3, label=curve,
                        linestyle="-" if len(pts) > 1 else "none")
        ax.axhline(TARGET_AUC, color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("worst-case attack AUC (95% CI)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Privacy-utility frontier (low AUC is better; dotted: AUC 0.60 target, dashed: chance)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_frontier(settings: FrontierSettings) -> Path:
    """Data, base and feature net (reused from the demo when cached), the sweep, its evaluation, the outputs."""
    from library.runtime import torch_threads

    sweep = read_sweep(settings.sweep)
    runs = sweep
    if settings.runs_filter:
        curves = sorted({r.label for r in sweep})
        if unknown := set(settings.runs_filter) - set(curves):
            raise ConfigError(f"--only {sorted(unknown)}: no such curve in {settings.sweep}; its curves: "
                              f"{', '.join(curves)} (--only takes curves, a run's label, not run names)")
        runs = [r for r in sweep if r.label in settings.runs_filter]
    demo = settings.demo
    with shared_preparation(demo.workdir):
        with torch_threads(demo.threads):
            manifest = prepare_data(demo)
            base = prepare_base_model(demo, manifest)
        with torch_threads(1):
            feature_net = prepare_feature_net(demo, manifest)
    with torch_threads(1):
        train_sweep(settings, runs, base, manifest)
        # --only trains its curves; the frontier keeps every finished run of the sweep (its outputs are replaced)
        runs = [r for r in sweep if r in runs or unfinished_reason(settings, r) is None]
        files = {path.stem: (run, value) for run in runs for path, value in run_files(settings, run)}
        # U's unit: the first plain-LoRA run's final file (its stem is its model name in the report).
        plain = next((r.name for r in runs if r.method == "lora"), None)
        report = evaluate_sweep(settings, [settings.run_folder(files[s][0]) / f"{s}.safetensors"
                                           for s in files], base, manifest, feature_net, plain)
    points = frontier_points(report, runs, files)
    path = write_outputs(settings, points, report)
    print(path.read_text(encoding="utf-8"), flush=True)
    return path


__all__ = ["FrontierSettings", "SweepRun", "best_defence", "frontier_points", "read_sweep", "run_frontier", "seed_spread",
           "target_check"]
