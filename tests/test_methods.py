"""The method registry: what it lists, the capabilities the loop reads, and that a new method is one class plus one
registry line (trained here end to end through the public ``Trainer.step``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.config import parse_config
from library.errors import ConfigError
from library.train.config import ALL_METHODS, BASELINES, METHODS, TrainConfig
from library.train.config_scope import check_for_method
from library.train.methods import (
    METHOD_REGISTRY,
    AdversarialLoRA,
    AuxData,
    ForwardResult,
    MethodSetup,
    PlainLoRA,
    StepContext,
    method_class,
    method_names,
)
from library.train.trainer import Trainer, train

REPO = Path(__file__).resolve().parents[1]


def test_registry_lists_the_paper_methods_first_and_config_reads_it():
    assert method_names() == ALL_METHODS == ("lora", "mp_lora", "smp_lora", "relaxloss", "dp_lora")
    assert method_names(in_paper=True) == METHODS == ("lora", "mp_lora", "smp_lora")
    assert method_names(in_paper=False) == BASELINES == ("relaxloss", "dp_lora")
    for name, method in METHOD_REGISTRY.items():
        assert method.name == name
        assert (REPO / f"train_{name}.py").is_file(), f"no entry script for {name}"
        assert method.base_config in METHOD_REGISTRY  # configs/<set>/<base_config>.toml exists for these


def test_capabilities_say_what_the_loop_must_provide():
    needs_aux = {n for n, m in METHOD_REGISTRY.items() if m.needs_aux}
    attacker = {n for n, m in METHOD_REGISTRY.items() if m.has_attacker}
    single = {n for n, m in METHOD_REGISTRY.items() if m.single_process}
    assert needs_aux == attacker == {"mp_lora", "smp_lora"}
    assert single == {"dp_lora"}
    assert {n: m.base_config for n, m in METHOD_REGISTRY.items()} == {
        "lora": "lora", "mp_lora": "mp_lora", "smp_lora": "smp_lora", "relaxloss": "lora", "dp_lora": "lora"}
    assert METHOD_REGISTRY["mp_lora"].objective == "mp" and METHOD_REGISTRY["smp_lora"].objective == "smp"


def test_the_demo_trains_the_slow_methods_first():
    """The demo sorts its runs by step_cost, so the plain run (one UNet pass a step) fills the gap at the end."""
    order = sorted(METHOD_REGISTRY, key=lambda name: -METHOD_REGISTRY[name].step_cost)
    assert order[:2] == ["mp_lora", "smp_lora"] and order[2] == "dp_lora" and set(order[3:]) == {"lora", "relaxloss"}


def test_unknown_method_is_one_config_error_line(tiny_train_args):
    with pytest.raises(ConfigError, match="unknown method 'nope'; expected one of lora, mp_lora, smp_lora, "
                                          "relaxloss, dp_lora$"):  # every method, the baselines too
        method_class("nope")
    with pytest.raises(ConfigError, match="unknown method"):
        check_for_method(parse_config(TrainConfig, tiny_train_args), "nope")


class DoubledLoRA(PlainLoRA):
    """A method that is not in the library: twice plain LoRA's loss."""

    name = "doubled_lora"
    in_paper = False

    def lora_loss(self, ctx: StepContext, result: ForwardResult) -> tuple[torch.Tensor, dict[str, float]]:
        loss = 2 * result.losses.mean()
        return loss, {"loss": loss.item()}

    def metadata(self) -> dict[str, str]:
        return {"smp_lora.doubled": "yes"}


def test_a_new_method_is_one_class_and_one_registry_line(tiny_train_args, monkeypatch):
    monkeypatch.setitem(METHOD_REGISTRY, DoubledLoRA.name, DoubledLoRA)
    trainer = Trainer(parse_config(TrainConfig, tiny_train_args + ["--text_encoder_lr", "1e-5"]), "doubled_lora")
    trainer.prepare()
    logs = trainer.step()  # the public step the benchmark times
    assert {"loss", "grad_norm", "lr"} <= set(logs) and trainer.sampler.position > 0
    # Both LoRA parts' rates, as sd-scripts logs them; "lr" is the UNet's (tiny_train_args: --learning_rate 1e-3).
    assert (logs["lr"], logs["lr/unet"], logs["lr/textencoder"]) == (1e-3, 1e-3, 1e-5)
    assert trainer.global_step == 1  # the step advances the counter itself (benches call step() alone)
    result = train(parse_config(TrainConfig, tiny_train_args), "doubled_lora")
    with safe_open(result.weights_path, "pt") as handle:
        meta = handle.metadata()
    assert meta["smp_lora.method"] == "doubled_lora" and meta["smp_lora.doubled"] == "yes"
    assert result.weights_path.name == "doubled_lora.safetensors" and result.attacker_path is None


def test_the_g_terms_base_model_encodes_captions_with_the_base_text_encoder(tiny_train_args):
    """With a text-encoder LoRA, the base term of G (L_ada's rows) must be the base model's whole, as the attacker
    phase's is: the base UNet on the *base* text encoder's encoding, not on the LoRA text encoder's."""
    from library.sd.diffusion import draw_noise

    args = tiny_train_args + ["--attacker_batch_size", "2", "--max_train_steps", "4", "--learning_rate", "1e-2",
                              "--attacker_features", "t_loss", "--attacker_calibration", "base",
                              "--attacker_normalization", "standardize"]
    trainer = Trainer(parse_config(TrainConfig, args), "smp_lora")
    trainer.prepare()
    for _ in range(4):
        trainer.step()
    ctx, method, members = trainer._context(), trainer.method, trainer.data.members
    latents, captions, keys = members.latents[:4], members.captions[:4], members.keys[:4]
    draw = draw_noise(latents, torch.Generator().manual_seed(0), 0, 1000)
    with torch.no_grad():
        with ctx.base_model():
            attacker_phase_base = method._raw_features(ctx, latents, keys, captions, None, draw)
        lora_conditioning = ctx.encode_text(captions)  # what L_ada's forward encoded (the text-encoder LoRA on)
        g_base = method._base_on_draw(ctx, latents, keys, captions, lora_conditioning, draw)
        g_base_without_captions = method._base_on_draw(ctx, latents, keys, None, lora_conditioning, draw)
    assert torch.equal(g_base, attacker_phase_base)
    assert not torch.equal(g_base_without_captions, attacker_phase_base)  # the text-encoder LoRA did move
    # --g_noise fresh: G's own second pass gets L_ada's conditioning and the captions; the same base term
    state = ctx.noise_generator.get_state()
    with torch.no_grad():
        g_fresh = method._features(ctx, latents, keys, captions, lora_conditioning)
        ctx.noise_generator.set_state(state)
        attacker_phase = method._features(ctx, latents, keys, captions)
    assert torch.equal(g_fresh, attacker_phase)
    assert trainer._forward([0, 1], ctx).captions == members.captions[:2]  # L_ada's forward hands them on


# ---- the min-max game itself (each check below once passed with the method's maths broken) -------------------
def _privacy_trainer(tiny_train_args, method: str, *extra: str) -> Trainer:
    args = tiny_train_args + ["--attacker_batch_size", "2", "--privacy_lambda", "0.5", "--privacy_delta", "0.1",
                              "--attacker_lr", "1e-2", *extra]
    trainer = Trainer(parse_config(TrainConfig, args), method)
    trainer.prepare()
    return trainer


@pytest.mark.parametrize("method", ["mp_lora", "smp_lora"])
def test_the_lora_minimises_eq6_or_eq10_and_g_reaches_its_gradient(tiny_train_args, method):
    """MP-LoRA: L_ada + lambda G (Eq. 6); SMP-LoRA: L_ada / (1 - lambda G + delta) (Eq. 10); and G is no constant:
    with G detached, MP-LoRA is plain LoRA and SMP-LoRA plain LoRA at another rate, and every number still ran."""
    trainer = _privacy_trainer(tiny_train_args, method)
    ctx = trainer._context()
    trainer.method.attacker_phase(ctx)
    result = trainer._forward([0, 1, 2, 3], ctx)
    loss, logs = trainer.method.lora_loss(ctx, result)
    l_ada, g = logs["l_ada"], logs["g"]
    if method == "mp_lora":
        expected, scale = l_ada + 0.5 * g, 1.0
        assert "denominator" not in logs
    else:
        expected, scale = l_ada / (1 - 0.5 * g + 0.1), 1 / (1 - 0.5 * g + 0.1)
        assert logs["denominator"] == pytest.approx(1 - 0.5 * g + 0.1, rel=1e-5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    params = [p for p in trainer.trained.params if p.requires_grad]
    with_g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    l_ada_only = torch.autograd.grad(result.adaptation_loss(), params, allow_unused=True)
    difference = sum(float(((a if a is not None else 0) - scale * (b if b is not None else 0)).abs().sum())
                     for a, b in zip(with_g, l_ada_only) if a is not None or b is not None)
    assert difference > 1e-6 * sum(float(b.abs().sum()) for b in l_ada_only if b is not None)


def test_g_member_weight_scales_g(tiny_train_args):
    """--g_member_weight 0.5 (the literal Eq. 5) halves G on the same features; it was once read as 1.0 always."""
    trainer = _privacy_trainer(tiny_train_args, "smp_lora")
    ctx = trainer._context()
    trainer.method.attacker_phase(ctx)
    result = trainer._forward([0, 1, 2, 3], ctx)
    state = ctx.noise_generator.get_state()
    g_full = trainer.method.lora_loss(ctx, result)[1]["g"]
    trainer.config.g_member_weight = 0.5
    ctx.noise_generator.set_state(state)  # the same (t, eps) for G's features, should they be drawn afresh
    assert trainer.method.lora_loss(ctx, result)[1]["g"] == pytest.approx(0.5 * g_full, rel=1e-6)


def test_the_proxy_attacker_learns_members_as_members(tiny_train_args, monkeypatch):
    """Algorithm 1 line 6 ascends G with members labelled as members: on features that separate the two sets the
    attacker reaches accuracy 1 and calls a member a member (with the labels swapped it learns the opposite)."""
    trainer = _privacy_trainer(tiny_train_args, "smp_lora")
    method = trainer.method
    real = method._features
    generator = torch.Generator().manual_seed(0)

    def separable(ctx, latents, keys, captions=None, conditioning=None):
        features = real(ctx, latents, keys, captions, conditioning)
        half = len(latents) // 2  # the attacker batch: its members first, then as many non-members
        signs = torch.cat([torch.ones(half), -torch.ones(len(latents) - half)])[:, None]
        return signs + 0.1 * torch.randn(features.shape, generator=generator)

    monkeypatch.setattr(method, "_features", separable)
    ctx = trainer._context()
    for _ in range(40):
        logs = method.attacker_phase(ctx)
    assert logs["attacker_acc"] == 1.0
    method.attacker.eval()
    members = trainer.data.members
    with torch.no_grad():
        width = real(ctx, members.latents[:2], members.keys[:2], members.captions[:2]).shape[1]
        probabilities = torch.softmax(method.attacker(torch.ones(3, width), update_stats=False), dim=1)
    assert bool((probabilities[:, 1] > 0.5).all())  # column 1 is "member" (privacy.member_log_prob)


def test_the_attacker_phase_logs_the_mean_of_its_k_steps(tiny_train_args, monkeypatch):
    """--k_steps 3: the logged cross-entropy and accuracy are the means over the three updates, not the last one's;
    the accuracy is the exact fraction of correct decisions (privacy.attacker_accuracy)."""
    import library.train.methods.adversarial as adversarial_module
    from library.privacy import attacker_accuracy

    trainer = _privacy_trainer(tiny_train_args, "smp_lora", "--k_steps", "3")
    seen = []
    real_loss = adversarial_module.attacker_loss

    def spying_loss(member_logits, nonmember_logits):
        loss = real_loss(member_logits, nonmember_logits)
        seen.append((loss.item(), attacker_accuracy(member_logits.detach(), nonmember_logits.detach())))
        return loss

    monkeypatch.setattr(adversarial_module, "attacker_loss", spying_loss)
    logs = trainer.method.attacker_phase(trainer._context())
    assert len(seen) == 3 and len({ce for ce, _ in seen}) == 3  # three updates on three batches
    assert logs["attacker_ce"] == pytest.approx(sum(ce for ce, _ in seen) / 3, rel=1e-12)
    assert logs["attacker_acc"] == pytest.approx(sum(acc for _, acc in seen) / 3, rel=1e-12)


# ---- the proxy attacker's own settings, on random auxiliary latents (no model is loaded) ---------------------
def _config(*flags: str) -> TrainConfig:
    """A config that names no real model or data (nothing here loads them)."""
    return parse_config(TrainConfig, ["--pretrained_model_name_or_path", "m", "--split_manifest", "s", *flags])


def _adversarial_method(*flags: str, method: str = "smp_lora", nonmembers: int = 4) -> AdversarialLoRA:
    """MP/SMP-LoRA built on 4 random D^m_aux latents and ``nonmembers`` D^nm_aux ones, batches of 2."""
    config = _config("--attacker_batch_size", "2", *flags)
    member_keys, nonmember_keys = [f"m{i}" for i in range(4)], [f"n{i}" for i in range(nonmembers)]
    aux = AuxData(torch.rand(4, 4, 4, 4), member_keys, torch.rand(nonmembers, 4, 4, 4), nonmember_keys,
                  member_keys, nonmember_keys)
    built = method_class(method).build(MethodSetup(config=config, device=torch.device("cpu"), aux=aux))
    assert isinstance(built, AdversarialLoRA)
    return built


def test_the_attacker_draws_every_non_member_when_the_aux_sets_differ_in_size():
    """D^nm_aux larger than D^m_aux: its sampler must cycle over all of it, not over as many as there are members."""
    method = _adversarial_method(nonmembers=6)
    drawn = {i for _ in range(3) for i in method.nonmember_sampler.next_indices()}
    assert drawn == set(range(6))


@pytest.mark.parametrize("flags, per_feature", [
    ([], False),  # error maps: one scale
    (["--attacker_features", "loss"], False),
    (["--attacker_features", "t_loss"], True),  # a loss and its t: scales apart
    (["--attacker_features", "multi_t_loss", "--attacker_timesteps", "10", "100"], True),
    (["--attacker_features", "loss", "--attacker_noise", "fixed", "--attacker_calibration", "both",
      "--attacker_normalization", "standardize"], True),  # a raw loss next to its calibrated difference
])
def test_the_proxy_standardises_features_of_different_scales_apart(flags, per_feature):
    """One mean/variance over columns orders of magnitude apart drowns the small ones: h_w then barely learns."""
    assert _adversarial_method(*flags).attacker.normalizer.per_feature is per_feature


def test_a_base_model_is_kept_only_for_base_calibrated_features():
    """A full fine-tune doubles its memory for the base copy: kept when the proxy compares with the base, only then."""
    base_calibrated = _config("--attacker_features", "t_loss", "--attacker_calibration", "base",
                              "--attacker_normalization", "standardize")
    for name in ("lora", "relaxloss", "dp_lora"):  # no proxy: the setting is not theirs
        assert not method_class(name).needs_base_model(base_calibrated)
    for method in ("mp_lora", "smp_lora"):
        cls = method_class(method)
        assert not cls.needs_base_model(_config()) and cls.needs_base_model(base_calibrated)


def _attacker_weights(method: AdversarialLoRA) -> list[torch.Tensor]:
    return [p.detach().clone() for p in method.attacker.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_attacker_reinit_restarts_count_restarts_and_each_draws_a_new_attacker():
    """Each reinit must give a new h_w (a stuck proxy is the reason to restart), and the record counts restarts."""
    method = _adversarial_method("--attacker_restart", "reinit", "--attacker_restart_every_n_epochs", "2")
    first = _attacker_weights(method)
    assert method.end_of_epoch(1) == {} and _same(_attacker_weights(method), first)
    assert method.end_of_epoch(2) == {"attacker_restarts": 1.0}
    second = _attacker_weights(method)
    assert method.end_of_epoch(4) == {"attacker_restarts": 2.0}
    assert not _same(second, first) and not _same(_attacker_weights(method), second)


def test_attacker_warm_restarts_keep_the_weights_and_drop_adams_moments():
    """``warm`` resets only the optimiser: a reinit there would throw away what h_w has learnt."""
    method = _adversarial_method("--attacker_restart", "warm", "--attacker_restart_every_n_epochs", "1")
    for param in method.attacker.parameters():
        param.grad = torch.ones_like(param)
    method.optimizer.step()
    assert method.optimizer.state
    weights = _attacker_weights(method)
    assert method.end_of_epoch(1) == {"attacker_restarts": 1.0}
    assert _same(_attacker_weights(method), weights) and not method.optimizer.state


def test_an_attacker_step_sees_a_member_batch_then_a_non_member_batch_each_from_its_own_set(monkeypatch):
    """h_w must learn members against non-members: a non-member batch of member latents teaches it nothing."""
    from types import SimpleNamespace

    method = _adversarial_method(nonmembers=6)
    seen = []

    def recording(ctx, latents, keys, captions=None, conditioning=None):
        seen.append((latents, keys))
        return torch.rand(len(keys), method.in_features)

    monkeypatch.setattr(method, "_features", recording)
    ctx = SimpleNamespace(reduce_gradients=lambda params: None, all_reduce_mean=lambda tensors: None)
    method.attacker_phase(ctx)  # the features are stubbed: no model in the context
    (latents, keys), = seen
    assert [key[0] for key in keys] == ["m", "m", "n", "n"]
    aux = method.aux
    expected = [aux.member_latents[aux.member_keys.index(k)] if k[0] == "m" else
                aux.nonmember_latents[aux.nonmember_keys.index(k)] for k in keys]
    assert torch.equal(latents, torch.stack(expected))
    assert method.member_sampler.position == method.nonmember_sampler.position == 2


def test_proxy_accuracy_is_the_fraction_of_right_decisions_over_every_chunk(monkeypatch):
    """The monitor's proxy accuracy: argmax over h_w's two logits against the labels, every row of every chunk."""
    method = _adversarial_method()
    monkeypatch.setattr(method, "attacker", torch.nn.Identity())  # the "features" below are the logits
    monkeypatch.setattr(method, "_features", lambda ctx, latents, keys, captions: latents)
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # says 1, 1, 0, 1, 0
    labels = torch.tensor([1, 0, 0, 1, 1])
    keys = [f"k{i}" for i in range(5)]
    accuracy = method.proxy_accuracy(None, logits, keys, keys, labels, batch_size=2)
    assert accuracy == pytest.approx(3 / 5)


def test_g_reads_only_the_rows_whose_t_lies_in_the_proxys_band():
    """h_w is trained on t in [0, --attacker_max_timestep): G must not score rows it never saw."""
    from library.sd.diffusion import NoiseDraw

    method = _adversarial_method("--attacker_features", "t_loss", "--attacker_max_timestep", "500")
    errors = torch.rand(4, 4, 4, 4)

    def result(*timesteps: int) -> ForwardResult:
        return ForwardResult(errors, errors.mean(dim=(1, 2, 3)), torch.rand(4, 4, 4, 4), torch.rand(4, 3, 8),
                             keys=[f"k{i}" for i in range(4)], draw=NoiseDraw(torch.tensor(timesteps), errors))

    features = method._training_features(None, result(499, 500, 10, 900))
    assert features is not None and features.shape[0] == 2
    torch.testing.assert_close(features[:, 0], torch.tensor([0.499, 0.010]))  # t / 1000 of the rows kept
    assert method._training_features(None, result(500, 600, 700, 999)) is None


def test_a_resumed_attacker_goes_on_counting_its_restarts():
    """The restart count seeds each reinit: a resume that forgot it would draw the first restart's h_w again."""
    flags = ("--attacker_restart", "reinit", "--attacker_restart_every_n_epochs", "1")
    run = _adversarial_method(*flags)
    run.end_of_epoch(1), run.end_of_epoch(2)
    resumed = _adversarial_method(*flags)
    resumed.load_state_dict(run.state_dict())
    assert resumed.end_of_epoch(3) == run.end_of_epoch(3) == {"attacker_restarts": 3.0}
    assert _same(_attacker_weights(resumed), _attacker_weights(run))


def test_the_lora_file_records_the_games_settings_under_their_own_keys():
    """The LoRA file is how an audit knows the lambda and proxy it was trained against: a renamed key is lost."""
    meta = _adversarial_method("--privacy_lambda", "0.25", "--privacy_delta", "0.125", "--k_steps", "3",
                               "--attacker_every_n_steps", "2", "--attacker_lr", "0.002", "--g_attacker_dropout",
                               "--attacker_restart", "warm", "--attacker_restart_every_n_epochs", "5").metadata()
    assert {key: meta[key] for key in ("smp_lora.privacy_lambda", "smp_lora.privacy_delta", "smp_lora.k_steps",
                                       "smp_lora.attacker_every_n_steps", "smp_lora.attacker_lr",
                                       "smp_lora.attacker_batch_size", "smp_lora.attacker_restart",
                                       "smp_lora.g_attacker_dropout")} == {
        "smp_lora.privacy_lambda": "0.25", "smp_lora.privacy_delta": "0.125", "smp_lora.k_steps": "3",
        "smp_lora.attacker_every_n_steps": "2", "smp_lora.attacker_lr": "0.002", "smp_lora.attacker_batch_size": "2",
        "smp_lora.attacker_restart": "warm/5", "smp_lora.g_attacker_dropout": "true"}
    assert "smp_lora.g_attacker_dropout" not in _adversarial_method().metadata()


def test_smp_lora_warns_when_delta_too_lifts_the_denominator_past_100_and_advises_a_lambda_counting_it(capsys):
    """1 + lambda*log 2 + delta bounds Eq. 10's denominator from below: its advice must count this run's delta."""
    smp = method_class("smp_lora")
    smp.check_config(_config("--privacy_lambda", "100", "--privacy_delta", "40"))
    err = capsys.readouterr().err
    assert err.startswith("warning: privacy_lambda 100.0 makes the Eq. 10 denominator 110 ")
    assert "lambda below 85 keeps it under 100" in err  # 1 + 85 log 2 + 40 < 100 (it said 143: 1 + 99 + 40)
    smp.check_config(_config("--privacy_lambda", "100", "--privacy_delta", "20"))  # ~90: trains, more slowly
    assert capsys.readouterr().err == ""
    for lam in ("1", "0"):  # no lambda helps (not even none): the warning names delta, and what to do
        smp.check_config(_config("--privacy_lambda", lam, "--privacy_delta", "100"))
        err = capsys.readouterr().err
        assert err.startswith("warning: privacy_delta 100.0 makes the Eq. 10 denominator 10"), err
        assert err.rstrip().endswith("delta alone puts it past 100: lower it (the paper's is 1e-5)"), err
