"""The defence's mechanism, end to end: the proxy attacker h_w tells over-fitted members from non-members
under the plain-LoRA objective, and SMP-LoRA (Eq. 10) takes that signal away.

One world for the module: 8+8 members and 8+8 non-members of the embedded digits, the rest of 600 digits
pre-training a tiny base (VAE 100 + UNet 400 steps). Two runs of ``train_smp_lora.py`` (the real entry script,
in parallel subprocesses), identical but for lambda:

* lambda = 0: the LoRA minimises ``L_ada / (1 + delta)``, i.e. plain LoRA; h_w trains alongside as a monitor
  whose output never reaches the LoRA's gradient;
* lambda = 1: SMP-LoRA.

Both use a LoCon-sized LoRA (``conv_dim``; attention-only LoRAs on this tiny base barely memorise in a
CI-sized budget) and the multi-timestep loss features at small t, where the membership signal lives. The
trainer's monitor scores h_w on D_aux and D_te every 5 epochs; we average the last 8 measurements (32 images
each, 256 decisions, s.e. ~0.03). The thresholds were fixed from the issue's wording before this test ran:
"clearly above chance" = at least 0.60, "near chance" = at most 0.60 and at least 0.10 below plain.
Measured on a 2-core CPU (the test prints it): plain 0.738, SMP 0.539.

The same two LoRA files then go through ``evaluate_mia.py`` (the real attacks, on D_te only): the over-fitted
plain LoRA must be caught by the loss and the calibrated attack (AUC > 0.75, CI above 0.5; thresholds as in
test_evaluate) while the base model's CI contains 0.5; SMP's numbers are printed, not asserted.

Both tests are marked ``slow`` (~6 min on an idle 2-core box, a pre-training and two 200-step trainings; under the
parallel default run it took 7.3 min of one worker and made the suite 12-14 min): run them with
``bash scripts/test.sh -m slow``. The default run keeps the defence's mechanics covered by tests/test_features.py,
tests/test_methods.py and the demo's end-to-end test, and checks the two runs' flags here in a second (which also
keeps ``pytest -m "not slow"`` of this file from collecting nothing: exit status 5, a failure for a per-file CI).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"member_aux": 8, "member_test": 8, "nonmember_aux": 8, "nonmember_test": 8}
LAST_EVALUATIONS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from library.data.dataset import scan_dataset
    from library.data.manifest import pretrain_records, write_manifest
    from library.data.splits import make_split
    from library.demo import pretrain
    from library.demo.digits import write_digits_dataset

    root = tmp_path_factory.mktemp("mechanism")
    write_digits_dataset(root / "images", resolution=32, limit=600)
    manifest = root / "split.json"
    write_manifest(make_split(scan_dataset(root / "images"), sizes=SIZES, seed=0, pretrain="rest",
                              dataset_root=root / "images"), manifest)
    base = pretrain.pretrain_base_model(pretrain_records(manifest), root / "base", seed=0, vae_steps=100,
                                        unet_steps=400, vae_batch_size=8, batch_size=16, threads=1,
                                        log=lambda _: None)
    return root, base, manifest


def train_args(base: Path, manifest: Path, out: Path, privacy_lambda: float) -> list[str]:
    return ["--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
            "--resolution", "32", "--network_dim", "16", "--network_alpha", "16",
            "--network_args", "conv_dim=16", "conv_alpha=16", "--network_train_unet_only",
            "--train_batch_size", "8", "--learning_rate", "1e-3", "--max_train_steps", "200", "--seed", "0",
            "--save_precision", "float", "--output_dir", str(out), "--output_name", "run", "--no-progress_bar",
            "--privacy_lambda", str(privacy_lambda), "--attacker_batch_size", "8", "--k_steps", "2",
            "--attacker_lr", "1e-3", "--attacker_features", "multi_t_loss",
            "--attacker_timesteps", "20", "50", "100", "200", "--attacker_eval_every_n_epochs", "5"]


def proxy_accuracy(record: dict) -> tuple[float, float, float]:
    """(D_aux, D_te, both) accuracy of h_w, each the mean of the last LAST_EVALUATIONS measurements."""
    monitored = [e for e in record["epochs"] if "proxy_acc_aux" in e][-LAST_EVALUATIONS:]
    assert len(monitored) == LAST_EVALUATIONS, record["epochs"][-1]
    aux = statistics.fmean(e["proxy_acc_aux"] for e in monitored)
    test = statistics.fmean(e["proxy_acc_test"] for e in monitored)
    return aux, test, (aux + test) / 2


def test_the_two_runs_are_smp_lora_differing_in_lambda_alone(tmp_path, capsys):
    """In a second, what the slow tests below find only after minutes: their flags still parse into settings of
    train_smp_lora.py that all act on SMP-LoRA (no warning), the runs differ in lambda alone (so lambda is what the
    proxy's accuracy measures), and Eq. 10's delta is the 1e-5 the denominator check expects."""
    from library.config import config_to_dict, parse_config
    from library.train.config import TrainConfig
    from library.train.config_scope import check_for_method

    configs = [parse_config(TrainConfig, train_args(tmp_path / "base", tmp_path / "split.json", tmp_path / "out", lam))
               for lam in (0.0, 1.0)]
    for config in configs:
        check_for_method(config, "smp_lora")
    assert capsys.readouterr().err == ""
    plain, smp = (config_to_dict(config) for config in configs)
    assert [name for name in plain if plain[name] != smp[name]] == ["privacy_lambda"]
    assert configs[0].privacy_delta == 1e-5


@pytest.fixture(scope="module")
def runs(world):
    root, base, manifest = world
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    lambdas = {"plain (lambda 0)": 0.0, "SMP (lambda 1)": 1.0}
    procs = {
        name: subprocess.Popen([sys.executable, str(ROOT / "train_smp_lora.py"),
                                *train_args(base, manifest, root / f"lambda_{lam}", lam)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, lam in lambdas.items()
    }
    records = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        records[name] = json.loads((root / f"lambda_{lambdas[name]}" / "run.json").read_text())
    return records


@pytest.fixture(scope="module")
def evaluation(world, runs):
    import evaluate_mia

    root, base, manifest = world
    out = root / "eval"
    rc = evaluate_mia.main(["--pretrained_model_name_or_path", str(base), "--split_manifest", str(manifest),
                            "--network_weights", str(root / "lambda_0.0" / "run.safetensors"),
                            str(root / "lambda_1.0" / "run.safetensors"), "--output_dir", str(out),
                            "--resolution", "32", "--attacks", "loss", "calibrated", "--no-plots",
                            "--no-progress_bar"])
    assert rc == 0
    results = json.loads((out / "report.json").read_text())["results"]
    return {(r["model"], r["label"]): r for r in results}


@pytest.mark.slow
def test_attacks_catch_the_overfitted_plain_lora_and_not_the_base(evaluation):
    print("\nevaluate_mia.py on D_te (8 members vs 8 non-members), AUC [95 % CI]:")
    for (model, label), row in sorted(evaluation.items()):
        if label.endswith(" avg"):
            print(f"  {model:<6} {label:<15} {row['auc']:.3f} [{row['auc_ci'][0]:.3f}, {row['auc_ci'][1]:.3f}]")
    for label in ("loss avg", "calibrated avg"):  # "run" = lambda 0 (plain), "run-2" = SMP
        row = evaluation[("run", label)]
        assert row["auc"] > 0.75 and row["auc_ci"][0] > 0.5, (label, row["auc"], row["auc_ci"])
    lo, hi = evaluation[("base", "loss avg")]["auc_ci"]
    assert lo <= 0.5 <= hi


@pytest.mark.slow
def test_proxy_separates_members_under_plain_lora_and_not_under_smp(runs):
    measured = {name: proxy_accuracy(record) for name, record in runs.items()}
    print(f"\nproxy h_w accuracy, mean of the last {LAST_EVALUATIONS} monitor measurements (chance 0.5):")
    for name, (aux, test, both) in measured.items():
        print(f"  {name:<18} D_aux {aux:.3f}  D_te {test:.3f}  both {both:.3f}")
    plain, smp = measured["plain (lambda 0)"][2], measured["SMP (lambda 1)"][2]
    assert plain >= 0.60, f"the proxy does not separate members under plain LoRA: {plain:.3f}"
    assert smp <= 0.60 and smp <= plain - 0.10, f"SMP-LoRA leaves the proxy at {smp:.3f} (plain {plain:.3f})"
    # The defence acts through Eq. 10's denominator 1 - lambda*G + delta: 1 + delta at lambda 0, above 1 with SMP.
    denominators = {name: statistics.fmean(e["denominator"] for e in record["epochs"]) for name, record in runs.items()}
    assert denominators["plain (lambda 0)"] == pytest.approx(1 + 1e-5)
    assert denominators["SMP (lambda 1)"] > 1.1, denominators
