"""The benches run (bench/*.py are documented commands; their timings are never asserted): each prints its table
with one row per method it was asked for. real_scale runs on the tiny stack with bf16 autocast, the code path a
GPU box takes except for the CUDA memory counters."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_bench(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_real_scale_bench_runs_its_methods_in_bf16_on_the_tiny_stack():
    out = _run_bench("real_scale.py", "--architecture", "tiny", "--resolution", "64", "--precision", "bf16",
                     "--methods", "lora", "smp_lora_every2", "smp_t_band_every2", "--threads", "1", "--peak_tflops", "1")
    assert "bf16 autocast; the tiny architecture (random weights), 64 px" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| LoRA", "| SMP-LoRA (paper features), attacker phase every 2nd step",
        "| SMP-LoRA, banded calibrated (t, loss) proxy, attacker phase every 2nd step"]
    for row in rows:  # s/step, x plain, TFLOP/step, achieved TFLOP/s, memory, MFU: all numbers, plain LoRA 1.00
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(re.fullmatch(r"[\d.]+( %)?", cell) for cell in cells), row
    assert rows[0].split("|")[3].strip() == "1.00"


def test_step_overhead_bench_times_every_variant_against_plain_lora():
    out = _run_bench("step_overhead.py", "--steps", "1", "--rounds", "1", "--threads", "1", "--no_memory")
    ratios = dict(re.findall(r"(\w+) / plain: ([\d.]+)x", out))
    assert {"mp_lora", "smp_lora", "smp_lora_every2", "smp_t_band", "smp_t_band_every2"} <= set(ratios)
    assert all(float(value) > 0 for value in ratios.values()) and "plain LoRA / bare loop" in out
    assert "rounds x 2 steps" in out  # --steps 1 rounds up to whole attacker cycles of the *_every2 variants


def test_eval_throughput_bench_runs_on_a_demo_shaped_workdir(tiny_train_args, tiny_model_dir, manifest_path, tmp_path):
    """The bench on real files: a demo-shaped workdir (base_model/, data/split.json) and a LoRA of one step."""
    from library.train.cli import train_entry

    assert train_entry("lora", "", tiny_train_args + ["--max_train_steps", "1"]) == 0
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "base_model").symlink_to(tiny_model_dir)
    (workdir / "data").symlink_to(manifest_path.parent)  # split.json with the images it names
    lora = tmp_path / "out" / "lora.safetensors"
    out = _run_bench("eval_throughput.py", "--workdir", str(workdir), "--lora", str(lora), "--rounds", "1", "--threads",
                     "1", "--batch_size", "64")
    assert "samples x 24 queries, batch 64, LoRA lora.safetensors; median of 1 interleaved rounds" in out
    speeds = r"feature engine: \d+ queries/s; bare UNet forward: \d+ queries/s; engine / bare: [\d.]+ %"
    assert re.search(speeds, out), out


def test_gpu_check_refuses_a_machine_without_a_gpu_in_one_line(tmp_path):
    """scripts/gpu_check.sh (tests/test_cuda.py and the benches on a GPU box) says so, rather than timing the CPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    name = f"gpu_logs_{tmp_path.name}"  # relative: the caller's folder, as the launchers' paths (it was the repo's)
    done = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh"), name], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and done.stderr.strip() == "scripts/gpu_check.sh: torch sees no CUDA device"
    assert not (tmp_path / name).exists() and not (REPO_ROOT / name).exists()  # a refused run writes nothing


def test_real_scale_drift_without_plain_lora_is_refused():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "real_scale.py"), "--drift", "--methods",
                           "smp_lora"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2 and "--drift times plain LoRA again at the end: add lora to --methods" in done.stderr


# The benches' arithmetic and tables, in-process on injected measurements (fake trainers and clocks): what a
# reader compares (ratios against plain LoRA, medians, memory units, MFU) must not depend on a real timing.

def _bench(name: str) -> ModuleType:
    """bench/<name>.py imported as a module (bench/ is not a package), so its helpers can be replaced by fakes."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO_ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Clock:
    """A fake ``time`` module: perf_counter reads a clock that the fakes advance by the seconds they "take"."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _Step:
    """A method's training step for the step_overhead bench: counts its calls (the warm-up is one)."""

    def __init__(self, name: str) -> None:
        self.name, self.calls = name, 0

    def __call__(self) -> None:
        self.calls += 1


def _table(out: str, first: str) -> dict[str, list[str]]:
    """Rows of a printed whitespace table after its header line (starting with ``first``), by their first cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:] if line and not line.startswith("plain")}


def test_step_overhead_reports_medians_of_rounds_and_ratios_against_plain_lora(monkeypatch, capsys):
    """The table and summary are the bench's whole output: medians (not means) and x plain against LoRA's median."""
    so = _bench("step_overhead")
    # plain LoRA's rounds have one outlier (its mean is 0.4 s, its median 0.2 s); the others are steady
    rounds = {"bare": [0.1] * 3, "lora": [0.2, 0.8, 0.2], "mp_lora": [0.3] * 3}
    steps: dict[str, _Step] = {}
    timed: list[tuple[str, int]] = []

    def time_steps(fn: _Step, n: int) -> float:
        timed.append((fn.name, n))
        return rounds.get(fn.name, [0.5] * 3)[sum(name == fn.name for name, _ in timed) - 1]

    def bare_loop(trainer: SimpleNamespace) -> _Step:
        assert trainer.step.name == "lora"  # the floor is plain LoRA's own model and batch
        steps["bare"] = _Step("bare")
        return steps["bare"]

    def make_trainer(variant: str, *_: object) -> SimpleNamespace:
        steps[variant] = _Step(variant)
        return SimpleNamespace(step=steps[variant])

    memory = {v: 10.0 + i for i, v in enumerate(so.VARIANTS)}
    monkeypatch.setattr(so, "make_fixture", lambda root: (root / "model", root / "split.json"))
    monkeypatch.setattr(so, "make_trainer", make_trainer)
    monkeypatch.setattr(so, "bare_loop", bare_loop)
    monkeypatch.setattr(so, "time_steps", time_steps)
    monkeypatch.setattr(so, "peak_memory_child", lambda v, *_: memory[v])
    so.main(["--steps", "3", "--rounds", "3", "--batch_size", "8", "--threads", "1"])
    out = capsys.readouterr().out

    assert all(step.calls == 1 for step in steps.values())  # one warm-up step each, the rest timed by time_steps
    assert {n for _, n in timed} == {4} and len(timed) == 3 * len(steps)  # 3 steps: 2 whole attacker cycles
    table = _table(out, "method")
    assert list(table) == ["bare", *so.VARIANTS]
    assert table["bare"] == ["0.1000", "80.0", "0.50", "-"]  # the floor: no memory subprocess of its own
    assert table["lora"] == ["0.2000", "40.0", "1.00", f"{memory['lora']:.1f}"]
    assert table["mp_lora"] == ["0.3000", "26.7", "1.50", f"{memory['mp_lora']:.1f}"]
    assert "plain LoRA / bare loop: 2.00x;" in out and "mp_lora / plain: 1.50x" in out
    assert "smp_lora / plain: 2.50x" in out and "; lora / plain" not in out


def test_step_overhead_without_memory_runs_no_memory_subprocess(monkeypatch, capsys):
    """--no_memory skips the per-method subprocesses (minutes on a GPU box) and prints "-" in their column."""
    so = _bench("step_overhead")

    def no_subprocess(*_: object) -> float:
        raise AssertionError("--no_memory ran a memory subprocess")

    monkeypatch.setattr(so, "make_fixture", lambda root: (root / "model", root / "split.json"))
    monkeypatch.setattr(so, "make_trainer", lambda v, *_: SimpleNamespace(step=_Step(v)))
    monkeypatch.setattr(so, "bare_loop", lambda trainer: _Step("bare"))
    monkeypatch.setattr(so, "time_steps", lambda fn, n: 0.1)
    monkeypatch.setattr(so, "peak_memory_child", no_subprocess)
    so.main(["--steps", "2", "--rounds", "1", "--threads", "1", "--no_memory"])
    assert {row[-1] for row in _table(capsys.readouterr().out, "method").values()} == {"-"}


def test_step_overhead_time_steps_is_seconds_per_step(monkeypatch):
    """The table's s/step divides a round's time by its steps."""
    so = _bench("step_overhead")
    clock = _Clock()
    monkeypatch.setattr(so, "time", clock)

    def step() -> None:
        clock.now += 0.25

    assert so.time_steps(step, 4) == pytest.approx(0.25)


def test_step_overhead_memory_child_reports_peak_rss_growth_in_mib(monkeypatch, capsys, tmp_path):
    """On the CPU a method's memory is the growth of ru_maxrss (KiB on Linux) over its timed steps, in MiB."""
    so = _bench("step_overhead")
    trainer = SimpleNamespace(steps=0)
    rss = iter([1000, 1000 + 3 * 1024])  # before and after the timed steps

    def step() -> None:
        trainer.steps += 1

    trainer.step = step
    monkeypatch.setattr(so, "make_trainer", lambda *_: trainer)
    monkeypatch.setattr(so, "resource", SimpleNamespace(RUSAGE_SELF=0,
                                                        getrusage=lambda _: SimpleNamespace(ru_maxrss=next(rss))))
    so.main(["--_child", "lora", "--_model", str(tmp_path), "--_manifest", str(tmp_path), "--_out", str(tmp_path),
             "--steps", "3", "--threads", "1"])
    assert json.loads(capsys.readouterr().out) == {"peak_mib": 3.0}
    assert trainer.steps == 1 + 4  # a warm-up step, then 3 steps rounded up to whole attacker cycles


def test_step_overhead_memory_child_gets_the_benchs_settings(monkeypatch, tmp_path):
    """The memory subprocess must train the method as the timed runs did (steps, batch, threads, g_noise), and its
    answer is the last line of its output."""
    so = _bench("step_overhead")
    calls: list[list[str]] = []

    def run(cmd: list[str], **_: object) -> SimpleNamespace:
        calls.append(cmd)
        return SimpleNamespace(stdout='a line the trainer printed\n{"peak_mib": 5.5}\n')

    monkeypatch.setattr(so, "subprocess", SimpleNamespace(run=run))
    args = SimpleNamespace(steps=4, batch_size=3, threads=2, g_noise="independent")
    assert so.peak_memory_child("smp_lora", tmp_path / "m", tmp_path / "s.json", tmp_path / "o", args) == 5.5
    assert calls[0][2:] == ["--_child", "smp_lora", "--_model", str(tmp_path / "m"), "--_manifest",
                            str(tmp_path / "s.json"), "--_out", str(tmp_path / "o"), "--steps", "4", "--batch_size",
                            "3", "--threads", "2", "--g_noise", "independent"]


def _recorded_trainers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, str]]:
    """Replace the library's Trainer by one that records its (config, method) and prepares nothing."""
    import library.train.trainer as trainer_module

    made: list[tuple[object, str]] = []

    class Trainer:
        def __init__(self, config: object, method: str) -> None:
            made.append((config, method))

        def prepare(self) -> None:
            pass

    monkeypatch.setattr(trainer_module, "Trainer", Trainer)
    return made


def test_step_overhead_variants_train_their_method_with_the_benchs_attacker(monkeypatch, tmp_path):
    """An *_every2 variant is its method with the attacker phase every second step, on the bench's batch and
    g_noise (what the table's row names promise)."""
    so = _bench("step_overhead")
    made = _recorded_trainers(monkeypatch)
    args = SimpleNamespace(batch_size=4, g_noise="independent")
    so.make_trainer("smp_lora_every2", tmp_path / "m", tmp_path / "s.json", tmp_path, args)
    config, method = made[0]
    assert method == "smp_lora" and config.attacker_every_n_steps == so.ATTACKER_CYCLE == 2
    assert config.attacker_batch_size == 4 and config.train_batch_size == 4 and config.g_noise == "independent"


def test_real_scale_table_divides_by_the_mean_plain_lora_and_prints_flops_and_mfu(monkeypatch, capsys):
    """x plain against the mean of the two plain-LoRA runs (--drift), TFLOP/step, achieved TFLOP/s, GiB, MFU %."""
    rs = _bench("real_scale")
    measured = iter([{"s_step": 2.0, "flops": 1e12, "memory_gib": 1.0},  # lora, first
                     {"s_step": 6.0, "flops": 3e12, "memory_gib": 1.5},  # smp_lora
                     {"s_step": 4.0, "flops": 1e12, "memory_gib": 1.5}])  # lora again: the drift
    order: list[str] = []

    def measure(variant: str, *_: object) -> dict[str, float]:
        order.append(variant)
        return next(measured)

    monkeypatch.setattr(rs, "make_fixture", lambda root, *_: (root / "model", root / "split.json"))
    monkeypatch.setattr(rs, "measure", measure)
    rs.main(["--device", "cpu", "--architecture", "tiny", "--methods", "lora", "smp_lora", "--drift", "--threads", "1",
             "--peak_tflops", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert order == ["lora", "smp_lora", "lora"]
    assert lines[1] == ("| method | s/step | x plain | TFLOP/step | achieved TFLOP/s | peak RSS GiB (running max) |"
                        " MFU |")
    assert lines[3:] == ["| LoRA | 2.00 | 0.67 | 1.00 | 0.50 | 1.0 | 25.0 % |",
                         "| SMP-LoRA (paper features) | 6.00 | 2.00 | 3.00 | 0.50 | 1.5 | 25.0 % |",
                         "| LoRA | 4.00 | 1.33 | 1.00 | 0.25 | 1.5 | 12.5 % |"]


def test_real_scale_without_plain_lora_prints_no_ratio(monkeypatch, capsys):
    """Methods without lora (and no --drift) still run: the x plain column says "-" rather than a made-up ratio."""
    rs = _bench("real_scale")
    monkeypatch.setattr(rs, "make_fixture", lambda root, *_: (root / "model", root / "split.json"))
    monkeypatch.setattr(rs, "measure", lambda *_: {"s_step": 2.0, "flops": 4e12, "memory_gib": 1.0})
    rs.main(["--device", "cpu", "--architecture", "tiny", "--methods", "smp_lora", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("| peak RSS GiB (running max) |")  # no MFU column without --peak_tflops
    assert lines[3:] == ["| SMP-LoRA (paper features) | 2.00 | - | 4.00 | 2.00 | 1.0 |"]


def test_real_scale_measure_times_whole_attacker_cycles_after_the_flop_count(monkeypatch):
    """One method's numbers: FLOPs per step over an attacker cycle, the mean over whole cycles of timed steps, and
    the CPU's peak RSS (KiB) in GiB."""
    rs = _bench("real_scale")
    clock = _Clock()
    seconds = [9.0, 9.0, 1.0, 1.0, 1.0, 5.0]  # the two counted (warm-up) steps, then the timed ones
    a, b = torch.ones(4, 8), torch.ones(8, 16)

    class Trainer:
        config = SimpleNamespace(attacker_every_n_steps=2)
        steps = 0

        def step(self) -> None:
            if self.steps % 2 == 0:  # the attacker phase: a matmul on every second step only
                a @ b
            clock.now += seconds[self.steps]
            self.steps += 1

    trainer = Trainer()
    monkeypatch.setattr(rs, "make_trainer", lambda *_: trainer)
    monkeypatch.setattr(rs, "time", clock)
    monkeypatch.setattr(rs, "resource", SimpleNamespace(RUSAGE_SELF=0,
                                                        getrusage=lambda _: SimpleNamespace(ru_maxrss=3 * 2**20)))
    result = rs.measure("smp_lora_every2", Path("m"), Path("s"), Path("o"), SimpleNamespace(device="cpu", steps=3))
    assert trainer.steps == 2 + 4  # 3 timed steps round up to 2 whole cycles
    assert result == {"s_step": 2.0, "flops": 2 * 4 * 8 * 16 / 2, "memory_gib": 3.0}


def test_real_scale_precision_is_bf16_autocast_on_cuda_fp32_on_the_cpu():
    """--precision auto picks the trainer's --mixed_precision by device; fp32 is the trainer's "no"."""
    rs = _bench("real_scale")
    assert [rs.precision(SimpleNamespace(precision=p, device=d)) for p, d in
            [("auto", "cuda"), ("auto", "cpu"), ("fp32", "cuda"), ("bf16", "cpu")]] == ["bf16", "no", "no", "bf16"]


def test_real_scale_every2_variants_are_their_variant_with_half_the_attacker_phases():
    """An *_every2 row is its base variant plus --attacker_every_n_steps 2; frontier variants run at lambda 1."""
    rs = _bench("real_scale")
    for every2, variant in rs.EVERY2.items():
        method, flags = rs.variant_flags(variant)
        assert rs.variant_flags(every2) == (method, [*flags, "--attacker_every_n_steps", "2"])
    assert rs.variant_flags("smp_t_band")[1][-2:] == ["--privacy_lambda", "1.0"]
    assert rs.variant_flags("smp_lora") == ("smp_lora", [])


def test_real_scale_methods_use_the_papers_attacker_batch(monkeypatch, tmp_path):
    """The bench's attacker batch is the paper's 1 (the frontier's flags set 4), and no proxy monitor is timed."""
    rs = _bench("real_scale")
    made = _recorded_trainers(monkeypatch)
    rs.make_trainer("smp_t_band", tmp_path / "m", tmp_path / "s.json", tmp_path,
                    SimpleNamespace(precision="auto", device="cpu", resolution=64))
    config, method = made[0]
    assert method == "smp_lora" and config.attacker_batch_size == 1 and config.attacker_eval_every_n_epochs == 100000


def _mechanism_record(aux: list[float], test: list[float], epochs: int = 20) -> dict:
    """A run record as the trainer writes it: l_ada = epoch, g = 10 * epoch, a proxy measurement every 5 epochs."""
    records: list[dict[str, float]] = [{"l_ada": float(i), "g": 10.0 * i} for i in range(epochs)]
    for k, (a, t) in enumerate(zip(aux, test)):
        records[5 * k + 4].update(proxy_acc_aux=a, proxy_acc_test=t)
    return {"epochs": records}


def test_mechanism_summary_averages_the_last_measurements_with_binomial_errors():
    """The finding is the mean proxy accuracy over the last --last measurements ± sqrt(p(1-p) / (n_eval * last))."""
    mech = _bench("mechanism")
    row = mech.summarise(_mechanism_record([0.5, 0.6, 0.6, 0.9], [0.5, 0.5, 0.5, 0.8]), last=3, n_eval=16)
    assert row == pytest.approx({"evaluations": 3, "aux": 0.7, "aux_se": (0.21 / 48) ** 0.5, "test": 0.6,
                                 "test_se": (0.24 / 48) ** 0.5, "l_ada": 12.0, "g": 120.0})  # l_ada, g: last 15 epochs


def test_mechanism_compares_every_lambda_with_lambda_zero(monkeypatch, capsys, tmp_path):
    """Each --lambdas value is reported next to the plain-LoRA objective (lambda 0), errors over 2 * members images."""
    mech = _bench("mechanism")
    trained: list[float] = []

    def train(base: Path, manifest: Path, out: Path, lam: float, args: object) -> dict:
        trained.append(lam)
        return _mechanism_record([0.9, 0.75, 0.75], [0.9, 0.5, 0.5]) if lam == 0 else \
            _mechanism_record([0.9, 0.65, 0.65], [0.9, 0.5, 0.5])

    monkeypatch.setattr(mech, "make_world", lambda root, args: (root / "base", root / "split.json"))
    monkeypatch.setattr(mech, "train", train)
    mech.main(["--lambdas", "0.5", "--last", "2", "--members", "4", "--threads", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert trained == [0.0, 0.5]
    assert [line.split() for line in lines[-2:]] == [
        ["0", "0.750", "±0.108", "0.500", "±0.125", "14.5000", "145.000"],
        ["0.5", "0.650", "±0.119", "0.500", "±0.125", "14.5000", "145.000"]]


def test_mechanism_trains_on_the_benchs_members_and_lambda(monkeypatch, tmp_path):
    """Each run is SMP-LoRA at its lambda on batches of both member halves, the proxy on one half's batch."""
    import library.train.trainer as trainer_module

    mech = _bench("mechanism")
    runs: list[tuple[object, str]] = []

    def run(config: object, method: str) -> None:
        runs.append((config, method))
        (tmp_path / "run.json").write_text('{"epochs": []}')

    monkeypatch.setattr(trainer_module, "train", run)
    args = SimpleNamespace(members=3, rank=4, lr=1e-3, steps=10, seed=0, k_steps=2, attacker_lr=1e-3,
                           features="multi_t_loss", timesteps=[20, 50], eval_every=5, conv_dim=0)
    assert mech.train(tmp_path / "base", tmp_path / "split.json", tmp_path, 0.5, args) == {"epochs": []}
    config, method = runs[0]
    assert method == "smp_lora" and config.privacy_lambda == 0.5 and config.attacker_eval_every_n_epochs == 5
    assert config.train_batch_size == 6 and config.attacker_batch_size == 3


def test_eval_throughput_reports_median_queries_per_second_of_engine_and_bare_unet(monkeypatch, capsys, tmp_path):
    """queries/s = every sample's fixed-t and random-t queries over the median round; the bare loop covers as many
    rows in batches; the ratio is engine / bare."""
    import library.data.latents
    import library.data.manifest
    import library.eval.features
    import library.sd.bundle
    import library.sd.loading
    import library.sd.text

    et = _bench("eval_throughput")
    clock = _Clock()
    engine_seconds = iter([100.0, 1.0, 4.0, 1.0])  # the warm-up, then 3 rounds: median 1 s (mean 2 s)
    computed: list[Path] = []
    unet_rows: list[int] = []

    class Engine:
        def __init__(self, *_: object, **__: object) -> None:
            pass

        def compute(self, name: str, samples: list, latents: torch.Tensor, lora: Path, label: str) -> None:
            computed.append(lora)
            clock.now += next(engine_seconds)

    def unet(noisy: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        unet_rows.append(len(noisy))
        clock.now += 0.01 * len(noisy)  # 100 queries/s

    entries = [SimpleNamespace(caption=f"digit {i}", sha256=str(i)) for i in range(8)]
    split = SimpleNamespace(member_aux=entries[:2], member_test=entries[2:4], nonmember_aux=entries[4:6],
                            nonmember_test=entries[6:], abs_path=lambda e: tmp_path / e.sha256)
    bundle = SimpleNamespace(vae=None, tokenizer=None, text_encoder=None, unet=unet,
                             noise_scheduler=SimpleNamespace(add_noise=lambda clean, noise, t: clean + noise))
    monkeypatch.setattr(library.sd.loading, "load_sd_model", lambda path: bundle)
    monkeypatch.setattr(library.data.manifest, "read_manifest", lambda path, verify: split)
    monkeypatch.setattr(library.sd.bundle, "vae_fingerprint", lambda vae: "vae")
    monkeypatch.setattr(library.data.latents, "LatentCache", lambda *_: SimpleNamespace(
        get_many=lambda paths: torch.zeros(len(paths), 4, 4, 4)))
    monkeypatch.setattr(library.eval.features, "FeatureEngine", Engine)
    monkeypatch.setattr(library.eval.features, "applied_lora", lambda *_: contextlib.nullcontext())
    monkeypatch.setattr(library.sd.text, "encode_prompts", lambda tok, enc, captions: torch.zeros(len(captions), 3, 2))
    monkeypatch.setattr(et, "time", clock)
    et.main(["--workdir", str(tmp_path), "--rounds", "3"])  # the default batch: evaluate_mia's 16
    lines = capsys.readouterr().out.splitlines()

    assert computed == [tmp_path / "lora" / "lora.safetensors"] * 4  # the default LoRA of the workdir
    n_queries = 8 * (4 * 2 + 16)  # 8 samples x (4 timesteps x 2 draws + 16 random-t draws)
    assert unet_rows == [16] * (n_queries // 16) * 4  # every query once per run, warm-up and 3 rounds
    assert "8 samples x 24 queries, batch 16, LoRA lora.safetensors; median of 3 interleaved rounds" in lines[0]
    assert lines[1] == "feature engine: 192 queries/s; bare UNet forward: 100 queries/s; engine / bare: 192.0 %"
