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
    ForwardResult,
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


def test_unknown_method_is_one_config_error_line(tiny_train_args):
    with pytest.raises(ConfigError, match="unknown method 'nope'; expected one of lora, mp_lora"):
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
