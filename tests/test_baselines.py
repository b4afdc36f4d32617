"""Issue 7's baselines: DP-SGD (per-sample clipping, noise, accountant) and RelaxLoss, unit and end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import parse_config
from library.errors import ConfigError
from library.sd.diffusion import (
    NoiseDraw,
    denoising_errors,
    draw_noise,
    per_sample_loss,
)
from library.train.config import TrainConfig
from library.train.dp import DPSGD
from library.train.methods import ForwardResult, RelaxLoss
from library.train.trainer import train


@pytest.fixture(scope="module")
def lora_world():
    """The tiny UNet with a LoCon network (Linear and Conv2d LoRA layers) that already changes the UNet."""
    from library.demo.tiny import build_tiny_stack
    from library.sd.text import encode_prompts
    from networks.lora import create_network

    bundle = build_tiny_stack(0)
    network = create_network(1.0, 4, 4.0, None, bundle.text_encoder, bundle.unet, train_unet_only=True,
                             conv_dim=4, conv_alpha=4)
    network.apply_to(None, bundle.unet, apply_text_encoder=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for lora in network.loras:
            lora.lora_up.weight.normal_(std=0.1)
    params = network.get_trainable_params()
    for p in params:
        p.requires_grad_(True)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = encode_prompts(bundle.tokenizer, bundle.text_encoder, ["a digit"] * 4)
    draw = draw_noise(latents, torch.Generator().manual_seed(2), 0, 1000)
    return bundle, network, params, latents, cond, draw


def _loss(world, rows: slice) -> torch.Tensor:
    bundle, _, _, latents, cond, draw = world
    sub = NoiseDraw(draw.timesteps[rows], draw.noise[rows])
    return per_sample_loss(denoising_errors(bundle.unet, bundle.noise_scheduler, latents[rows], cond[rows], sub)).mean()


def _dp_gradient(world, clip: float, noise: float) -> tuple[list[torch.Tensor], DPSGD, dict[str, float]]:
    _, network, params, *_ = world
    dp = DPSGD(network, params, noise_multiplier=noise, clip_norm=clip, sample_rate=0.1, delta=1e-5, seed=0)
    try:
        for p in params:
            p.grad = None
        _loss(world, slice(0, 4)).backward()
        stats = dp.privatize(4)
        return [p.grad.clone() for p in params], dp, stats
    finally:
        dp.module._close()  # remove the hooks: the next test wraps the network again


def _per_sample_gradients(world) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
    """Each of the 4 samples' LoRA gradient (one backward each) and its L2 norm over all LoRA parameters."""
    params = world[2]
    per_sample = [torch.autograd.grad(_loss(world, slice(i, i + 1)), params) for i in range(4)]
    return per_sample, torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_sample])


def test_dp_gradient_is_the_mean_of_per_sample_clipped_gradients(lora_world):
    _, _, params, *_ = lora_world
    per_sample, norms = _per_sample_gradients(lora_world)
    clip = float(norms.median())  # half the samples are clipped
    expected = [sum(min(1.0, clip / float(n)) * grads[j] for n, grads in zip(norms, per_sample)) / 4
                for j in range(len(params))]
    got, *_ = _dp_gradient(lora_world, clip, 0.0)
    flat_got, flat_expected = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in expected])
    assert (flat_got - flat_expected).norm() < 1e-4 * flat_expected.norm()
    # With a clip above every norm and no noise it is the ordinary mean gradient.
    plain = torch.autograd.grad(_loss(lora_world, slice(0, 4)), params)
    unclipped, *_ = _dp_gradient(lora_world, float(norms.max()) * 10, 0.0)
    flat_unclipped, flat_plain = torch.cat([g.flatten() for g in unclipped]), torch.cat([g.flatten() for g in plain])
    assert (flat_unclipped - flat_plain).norm() < 1e-4 * flat_plain.norm()


def test_dp_noise_has_std_sigma_c_over_batch_and_the_accountant_counts_steps(lora_world):
    clean, *_ = _dp_gradient(lora_world, 0.5, 0.0)
    noisy, dp, _ = _dp_gradient(lora_world, 0.5, 2.0)
    diff = torch.cat([(a - b).flatten() for a, b in zip(noisy, clean)])
    assert diff.numel() > 5000
    assert diff.std().item() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    first = dp.epsilon()
    dp.accountant.step(noise_multiplier=2.0, sample_rate=0.1)
    assert 0 < first < dp.epsilon() < float("inf")


def test_dp_logs_the_clipped_fraction_and_the_median_per_sample_norm(lora_world):
    """These two logs are how a user tunes dp_clip_norm: a wrong fraction or norm points the clip the wrong way."""
    norms = sorted(_per_sample_gradients(lora_world)[1].tolist())
    _, _, stats = _dp_gradient(lora_world, (norms[0] + norms[1]) / 2, 0.0)  # three of the four norms are above
    assert stats["dp_clipped_fraction"] == 0.75
    assert stats["dp_median_grad_norm"] == pytest.approx(norms[1], rel=1e-4)  # torch's median: the lower middle one


@pytest.mark.parametrize("bad", [{"clip_norm": 0.0}, {"delta": 1.0}, {"sample_rate": 0.0}, {"noise_multiplier": -1.0}])
def test_dpsgd_refuses_settings_that_bound_nothing(lora_world, bad):
    """A zero clip zeroes every gradient and delta = 1 is no guarantee: DPSGD itself refuses them, not only the CLI."""
    _, network, params, *_ = lora_world
    settings = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sample_rate": 0.1, "delta": 1e-5, "seed": 0} | bad
    with pytest.raises(ConfigError, match="DP-SGD needs"):
        DPSGD(network, params, **settings)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_dp_epsilon_is_zero_before_the_first_step(lora_world, noise):
    """No step has seen the data yet, so nothing is spent (Opacus' conversion alone says > 0, and inf without noise)."""
    _, network, params, *_ = lora_world
    dp = DPSGD(network, params, noise_multiplier=noise, clip_norm=1.0, sample_rate=0.1, delta=1e-5, seed=0)
    try:
        assert dp.epsilon() == 0.0
    finally:
        dp.module._close()


def test_dp_refuses_per_sample_gradients_missing_or_of_another_batch(lora_world):
    """Dividing by another batch size than the per-sample gradients' would misstate both the mean and the noise."""
    _, network, params, *_ = lora_world
    dp = DPSGD(network, params, noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.1, delta=1e-5, seed=0)
    try:
        with pytest.raises(RuntimeError, match="got no per-sample gradient"):
            dp.privatize(4)  # no backward yet
        _loss(lora_world, slice(0, 4)).backward()
        with pytest.raises(RuntimeError, match="per-sample gradients of 4 samples for a batch of 5"):
            dp.privatize(5)
        assert not dp.accountant.history  # a refused step is not accounted
    finally:
        dp.module._close()


@pytest.mark.parametrize(("num_members", "sample_rate"), [(10, 0.4), (2, 1.0)])
def test_dp_lora_accounts_each_step_at_q_batch_over_members(lora_world, tiny_train_args, num_members, sample_rate):
    """The reported epsilon is Opacus' RDP accountant after one step per batch at q = min(1, batch / |D_tr|):
    q drives epsilon, so a wrong one (e.g. q = 1, every member in every batch) misstates the guarantee."""
    from opacus.accountants import RDPAccountant

    from library.train.methods.dp import DPLoRA

    _, network, params, *_ = lora_world
    config = parse_config(TrainConfig, tiny_train_args + ["--train_batch_size", "4", "--dp_noise_multiplier", "1.5",
                                                          "--dp_clip_norm", "0.5", "--dp_delta", "1e-3"])
    method = DPLoRA(config, network, params, num_members=num_members)
    try:
        for _ in range(3):
            for p in params:
                p.grad = None
            _loss(lora_world, slice(0, 4)).backward()
            method.process_gradients(4)
    finally:
        method.dp.module._close()  # remove the hooks: the next test wraps the network again
    expected = RDPAccountant()
    for _ in range(3):
        expected.step(noise_multiplier=1.5, sample_rate=sample_rate)
    epsilon = expected.get_epsilon(1e-3)
    assert method.end_of_epoch(1)["dp_epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert method.final_logs()["dp_epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert method.metadata()["smp_lora.dp_epsilon"] == f"{epsilon:.4g}"
    # the clip and noise used, as saved: --max_grad_norm (the trainer's global clip, 1.0 here) is another setting
    assert (method.dp.clip_norm, method.dp.noise_multiplier) == (0.5, 1.5)
    assert {k: method.metadata()[f"smp_lora.dp_{k}"] for k in ("noise_multiplier", "clip_norm", "delta")} == {
        "noise_multiplier": "1.5", "clip_norm": "0.5", "delta": "0.001"}


def _relax_result(prior_loss: torch.Tensor | None = None) -> ForwardResult:
    """A batch of two members with losses 0.2 and 0.4 (L_ada 0.3)."""
    losses = torch.tensor([0.2, 0.4], requires_grad=True)
    return ForwardResult(errors=torch.zeros(2, 1), losses=losses, latents=torch.zeros(2), conditioning=torch.zeros(2),
                         prior_loss=prior_loss)


def test_relaxloss_descends_above_the_target_and_ascends_below():
    loss, logs = RelaxLoss(alpha=0.1).lora_loss(None, _relax_result())
    assert loss.item() == pytest.approx(0.3) and logs["relax_ascending"] == 0.0
    loss, logs = RelaxLoss(alpha=0.5).lora_loss(None, _relax_result())
    assert loss.item() == pytest.approx(-0.3) and logs["relax_ascending"] == 1.0


def test_relaxloss_descends_at_the_target_itself():
    """Chen et al.'s Alg. 1 descends while L >= alpha: a loss exactly at the target is not ascended."""
    at_target = torch.tensor([0.2, 0.4]).mean().item()
    loss, logs = RelaxLoss(alpha=at_target).lora_loss(None, _relax_result())
    assert logs["relax_ascending"] == 0.0 and loss.item() == at_target


@pytest.mark.parametrize(("alpha", "members_sign"), [(0.1, 1.0), (0.5, -1.0)])
def test_relaxloss_always_descends_the_prior_loss(alpha, members_sign):
    """Ascending DreamBooth's prior loss would unlearn the class: only the members' loss is relaxed, and logged."""
    loss, logs = RelaxLoss(alpha).lora_loss(None, _relax_result(prior_loss=torch.tensor(1.0)))
    assert loss.item() == pytest.approx(members_sign * 0.3 + 1.0)
    assert logs["l_ada"] == pytest.approx(0.3) and logs["loss"] == pytest.approx(loss.item())


def test_dp_lora_trains_reports_epsilon_and_resumes_exactly(tiny_train_args, tmp_path):
    common = tiny_train_args + ["--dp_noise_multiplier", "1.0", "--dp_clip_norm", "0.1", "--train_batch_size", "6"]
    full = train(parse_config(TrainConfig, common + ["--max_train_steps", "8", "--output_dir", str(tmp_path / "a")]),
                 "dp_lora")
    with safe_open(full.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["smp_lora.method"] == "dp_lora" and float(meta["smp_lora.dp_epsilon"]) > 0
    record = json.loads(full.record_path.read_text())
    assert record["final"]["dp_epsilon"] == pytest.approx(float(meta["smp_lora.dp_epsilon"]), rel=1e-3)  # the method's
    epochs = record["epochs"]
    eps = [e["dp_epsilon"] for e in epochs]
    assert eps == sorted(eps) and eps[0] > 0 and "dp_clipped_fraction" in full.final_logs
    final = json.loads(full.record_path.read_text())["final"]  # the metadata's epsilon, after a partial epoch too
    assert final["dp_epsilon"] == pytest.approx(float(meta["smp_lora.dp_epsilon"]), rel=1e-3)
    train(parse_config(TrainConfig, common + ["--max_train_steps", "4", "--save_state",
                                              "--output_dir", str(tmp_path / "b")]), "dp_lora")
    resumed = train(parse_config(TrainConfig, common + ["--max_train_steps", "8", "--resume",
                                                        str(tmp_path / "b" / "dp_lora-state"),
                                                        "--output_dir", str(tmp_path / "c")]), "dp_lora")
    a, b = load_file(full.weights_path), load_file(resumed.weights_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(resumed.weights_path, "pt") as handle:
        assert handle.metadata()["smp_lora.dp_epsilon"] == meta["smp_lora.dp_epsilon"]


def test_relaxloss_trains_and_records_its_target(tiny_train_args):
    result = train(parse_config(TrainConfig, tiny_train_args + ["--relaxloss_alpha", "0.05"]), "relaxloss")
    with safe_open(result.weights_path, "pt") as handle:
        assert handle.metadata()["smp_lora.relaxloss_alpha"] == "0.05"
    assert "relax_ascending" in result.final_logs


@pytest.mark.parametrize("method, extra, message", [
    ("relaxloss", [], "needs 'relaxloss_alpha' > 0"),
    ("relaxloss", ["--relaxloss_alpha", "0"], "needs 'relaxloss_alpha' > 0"),  # a target of 0 relaxes nothing
    ("dp_lora", ["--dp_delta", "1"], "0 < 'dp_delta' < 1"),
    ("dp_lora", ["--mixed_precision", "fp16"], "does not support 'mixed_precision = fp16'"),
    ("dp_lora", ["--track_smoothness"], "does not support 'track_smoothness'"),
    ("dp_lora", ["--grad_normalize"], "does not support 'grad_normalize'"),
    ("dp_lora", ["--with_prior_preservation"], "does not support 'with_prior_preservation'"),
    ("dp_lora", ["--gradient_accumulation_steps", "2"], "does not support 'gradient_accumulation_steps'"),
    ("dp_lora", ["--dp_clip_norm", "0"], "'dp_clip_norm' > 0"),
])
def test_bad_baseline_settings_are_one_line(tiny_train_args, method, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(parse_config(TrainConfig, tiny_train_args + extra), method)


def test_dp_lora_refuses_a_member_image_that_occurs_twice(tiny_train_args, manifest_path, tmp_path, capsys):
    """One image k times in D_tr is k records to the accountant: its epsilon would be understated."""
    import dataclasses

    from library.data.manifest import read_manifest, write_manifest
    from library.train.cli import train_entry

    manifest = read_manifest(manifest_path)
    manifest.member_test[0] = dataclasses.replace(manifest.member_test[0], repeats=2)  # a kohya 2_<name> folder
    repeated = manifest_path.parent / f"repeated-{tmp_path.name}.json"  # beside the images it names
    write_manifest(manifest, repeated)
    assert train_entry("dp_lora", "", tiny_train_args + ["--split_manifest", str(repeated),
                                                         "--dp_clip_norm", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "occurs 2 times in D_tr" in err[0] and "epsilon would be understated" in err[0]
    assert f"(as {manifest.abs_path(manifest.member_test[0])}:" in err[0]  # the image named
    # plain LoRA trains it, the repeated image twice per epoch, and its plan says so
    assert train_entry("lora", "", tiny_train_args + ["--split_manifest", str(repeated), "--dry_run"]) == 0
    n = len(manifest.members())
    assert f"{n} member images ({n + 1} per epoch with their kohya repeats)" in capsys.readouterr().out
    # a plain folder (no manifest: images keyed by path) with one image under two names is refused by content
    import shutil

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, entry in enumerate(manifest.member_test[:4]):
        shutil.copy(manifest.abs_path(entry), folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(entry.caption)
    shutil.copy(folder / "0.png", folder / "copy.png")
    (folder / "copy.txt").write_text("a copy")
    plain = [a for a in tiny_train_args]
    plain[plain.index("--split_manifest"):plain.index("--split_manifest") + 2] = ["--train_data_dir", str(folder)]
    assert train_entry("dp_lora", "", plain + ["--dp_clip_norm", "0.05", "--dry_run"]) == 2
    assert f"occurs 2 times in D_tr (as {folder / '0.png'}, {folder / 'copy.png'}:" in capsys.readouterr().err


def test_dp_without_noise_records_strict_json_and_its_report_cell_says_no_bound(tiny_train_args, tmp_path):
    from library.eval.summary import _dp_cell, dp_budget
    from library.fileio import json_safe

    result = train(parse_config(TrainConfig, tiny_train_args + ["--dp_noise_multiplier", "0", "--max_train_steps", "2",
                                                                "--output_dir", str(tmp_path)]), "dp_lora")

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    record = json.loads(result.record_path.read_text(), parse_constant=refuse)  # was a bare Infinity
    assert record["final"]["dp_epsilon"] is None
    with safe_open(result.weights_path, "pt") as handle:
        budget = dp_budget(handle.metadata())
    # report.json holds that epsilon as null; report.md's cell once crashed formatting it
    assert _dp_cell(json_safe(budget)) == "∞ (no noise) (δ 1e-05)"
    assert _dp_cell({"epsilon": 2.5, "delta": None}) == "2.5" and _dp_cell(None) == "—"


def test_dp_epsilon_is_never_negative_and_a_large_delta_is_warned_about(lora_world, tiny_train_args, capsys):
    _, network, params, *_ = lora_world
    dp = DPSGD(network, params, noise_multiplier=5.0, clip_norm=1.0, sample_rate=0.25, delta=0.1, seed=0)
    try:
        for _ in range(6):
            dp.accountant.step(noise_multiplier=5.0, sample_rate=0.25)
        assert float(dp.accountant.get_epsilon(0.1)) < 0 and dp.epsilon() == 0.0  # Opacus' conversion undershoots
    finally:
        dp.module._close()
    train(parse_config(TrainConfig, tiny_train_args + ["--dp_delta", "0.5", "--dry_run"]), "dp_lora")
    assert "warning: 'dp_delta' 0.5 is not below 1/|D_tr|" in capsys.readouterr().err


def test_dp_refuses_to_continue_a_lora_trained_on_its_members(tiny_train_args, tmp_path, capsys):
    """The accountant counts this run's steps: a starting LoRA that saw the members would sit outside epsilon."""
    parent = train(parse_config(TrainConfig, tiny_train_args + ["--max_train_steps", "1", "--output_dir",
                                                                str(tmp_path / "parent")]), "lora")
    args = tiny_train_args + ["--network_weights", str(parent.weights_path), "--output_dir", str(tmp_path / "dp")]
    with pytest.raises(ConfigError, match="trained on this split's members.*--resume"):
        train(parse_config(TrainConfig, args), "dp_lora")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"  # a LoRA from elsewhere: allowed, with what epsilon then means
    save_file(load_file(str(parent.weights_path)), str(foreign))
    capsys.readouterr()
    args[args.index("--network_weights") + 1] = str(foreign)
    train(parse_config(TrainConfig, args + ["--dry_run"]), "dp_lora")
    assert "saved epsilon counts this run's DP-SGD steps only" in (err := capsys.readouterr().err)
    assert "(it records no split)" in err  # the foreign file names no split: the warning says so


def test_dp_delta_of_exactly_one_over_the_members_is_warned_about(tiny_train_args, capsys):
    """delta = 1/|D_tr| already allows leaking one whole training image: the warning starts there, not above it."""
    from library.train.methods.dp import DPLoRA

    config = parse_config(TrainConfig, tiny_train_args + ["--dp_delta", str(1 / 24)])
    DPLoRA.check_data(config, 24)
    assert "'dp_delta' 0.0416667 is not below 1/|D_tr| = 1/24" in capsys.readouterr().err
    DPLoRA.check_data(config, 23)
    assert capsys.readouterr().err == ""
