"""Values and gradients of the privacy objectives (paper Eq. 5, 6, 10) and the proxy attacker h_ω."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from library.errors import ConfigError, TrainingError
from library.privacy import (
    FeatureNormalizer,
    ProxyAttacker,
    attacker_accuracy,
    attacker_in_features,
    attacker_loss,
    member_log_prob,
    mi_gain,
    mi_gain_members,
    mp_lora_loss,
    nonmember_log_prob,
    privacy_loss_terms,
    smp_denominator,
    smp_lora_loss,
    validate_privacy_lambda,
)

torch.set_default_dtype(torch.float32)


def _logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


# ----------------------------------------------------------------------------- log-probabilities / G


def test_log_probs_match_softmax_and_are_stable():
    z = _logits(7, 0)
    p = torch.softmax(z, dim=1)
    torch.testing.assert_close(member_log_prob(z).double(), p[:, 1].log(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nonmember_log_prob(z).double(), p[:, 0].log(), rtol=1e-5, atol=1e-6)
    # Saturated logits: log(softmax) underflows to -inf, log_softmax stays finite.
    sat = torch.tensor([[200.0, -200.0]])
    assert torch.isinf(torch.softmax(sat, 1)[:, 1].log()).all()
    assert member_log_prob(sat).item() == pytest.approx(-400.0)
    with pytest.raises(ValueError):
        member_log_prob(torch.zeros(3, 3))


def test_half_precision_logits_give_fp32_log_probs():
    """fp16 log-probabilities round G to ~3 digits and saturate: the module promises fp32 whatever the logits."""
    z = _logits(6, 7).float()
    for fn in (member_log_prob, nonmember_log_prob):
        out = fn(z.half())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, fn(z.half().float()))


def test_an_empty_batch_is_refused_not_turned_into_nan():
    """The mean over an empty half of Eq. 5 is NaN, which would silently poison the LoRA's loss."""
    with pytest.raises(ValueError, match="empty batch"):
        mi_gain(torch.zeros(0, 2), _logits(3, 0))
    with pytest.raises(ValueError, match="empty batch"):
        mi_gain_members(torch.zeros(0, 2))


def test_mi_gain_is_eq5_with_unequal_halves():
    zm, znm = _logits(3, 1), _logits(5, 2)
    pm, pnm = torch.softmax(zm, 1)[:, 1], torch.softmax(znm, 1)[:, 1]
    expected = pm.log().sum() / (2 * 3) + (1 - pnm).log().sum() / (2 * 5)
    assert mi_gain(zm, znm).item() == pytest.approx(expected.item(), rel=1e-5)
    assert attacker_loss(zm, znm).item() == pytest.approx(-expected.item(), rel=1e-5)


def test_minus_mi_gain_equals_cross_entropy_on_balanced_batch():
    zm, znm = _logits(4, 3), _logits(4, 4)
    ce = F.cross_entropy(torch.cat([zm, znm]).float(), torch.tensor([1] * 4 + [0] * 4))
    assert (-mi_gain(zm, znm)).item() == pytest.approx(ce.item(), rel=1e-6)


def test_mi_gain_bounds():
    for seed in range(5):
        assert mi_gain(_logits(6, seed), _logits(6, seed + 10)).item() <= 0.0
    const = torch.full((4, 2), 0.7)
    assert mi_gain(const, const).item() == pytest.approx(math.log(0.5), rel=1e-6)
    # A perfect attacker approaches G = 0 from below.
    assert mi_gain(torch.tensor([[-20.0, 20.0]]), torch.tensor([[20.0, -20.0]])).item() == pytest.approx(0.0, abs=1e-12)


def test_mi_gain_members_weights():
    z = _logits(5, 5)
    mean_lp = torch.softmax(z, 1)[:, 1].log().mean().item()
    assert mi_gain_members(z).item() == pytest.approx(mean_lp, rel=1e-5)
    # Upstream: G_member = -CE(h(x), member).
    ce = F.cross_entropy(z.float(), torch.ones(5, dtype=torch.long)).item()
    assert mi_gain_members(z).item() == pytest.approx(-ce, rel=1e-5)
    assert mi_gain_members(z, member_weight=0.5).item() == pytest.approx(0.5 * mean_lp, rel=1e-5)
    with pytest.raises(ConfigError):
        mi_gain_members(z, member_weight=0.0)


def test_attacker_accuracy():
    zm = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])  # correct, wrong, tie -> non-member (wrong)
    znm = torch.tensor([[2.0, 1.0]])  # correct
    assert attacker_accuracy(zm, znm) == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------- Eq. 6 and Eq. 10


def _leaf(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


def test_mp_loss_value_and_gradients():
    l_ada, g, lam = _leaf(0.3), _leaf(-1.7), 0.05
    loss = mp_lora_loss(l_ada, g, lam)
    assert loss.item() == pytest.approx(0.3 + 0.05 * -1.7)
    loss.backward()
    assert l_ada.grad.item() == pytest.approx(1.0)
    assert g.grad.item() == pytest.approx(lam)


@pytest.mark.parametrize("lam,delta", [(0.05, 1e-5), (1.0, 1e-5), (0.0, 1e-5), (0.5, 0.1)])
def test_smp_loss_value_and_gradients(lam, delta):
    l_ada_v, g_v = 0.12, -0.9
    l_ada, g = _leaf(l_ada_v), _leaf(g_v)
    denom = 1 - lam * g_v + delta
    loss = smp_lora_loss(l_ada, g, lam, delta)
    assert loss.item() == pytest.approx(l_ada_v / denom, rel=1e-12)
    assert smp_denominator(g, lam, delta).item() == pytest.approx(denom, rel=1e-12)
    loss.backward()
    assert l_ada.grad.item() == pytest.approx(1 / denom, rel=1e-12)
    assert g.grad.item() == pytest.approx(lam * l_ada_v / denom**2, rel=1e-12)


def test_lambda_and_delta_validation():
    assert validate_privacy_lambda(0) == 0.0
    for bad in (-0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ConfigError):
            validate_privacy_lambda(bad)
    with pytest.raises(ConfigError, match="privacy_lambda must be >= 0"):
        smp_lora_loss(_leaf(0.1), _leaf(-1.0), -0.5)
    with pytest.raises(ConfigError, match="privacy_lambda must be >= 0"):
        mp_lora_loss(_leaf(0.1), _leaf(-1.0), -0.5)
    for bad_delta in (-1.0, 0.0, float("nan")):  # 0 too, as the training config refuses it
        with pytest.raises(ConfigError, match="'privacy_delta' must be a finite number > 0"):
            smp_lora_loss(_leaf(0.1), _leaf(-1.0), 0.1, delta=bad_delta)


def test_non_finite_inputs_raise_training_error():
    with pytest.raises(TrainingError, match="L_ada=nan"):
        smp_lora_loss(_leaf(float("nan")), _leaf(-1.0), 0.05)
    with pytest.raises(TrainingError, match="G=-inf"):
        smp_lora_loss(_leaf(0.1), _leaf(float("-inf")), 0.05)
    with pytest.raises(TrainingError):
        mp_lora_loss(_leaf(float("inf")), _leaf(-1.0), 0.05)
    # A G outside its range (G > 0 is impossible for log-probabilities) that empties the denominator.
    with pytest.raises(TrainingError, match=r"privacy_lambda=1\.0.*denominator"):
        smp_lora_loss(_leaf(0.1), _leaf(2.0), 1.0)


def test_a_zero_smp_denominator_is_refused():
    """D = 0 exactly (λ = 1, G = 1.5, δ = 0.5) would divide L_ada by zero: the check needs D > 0, not D >= 0."""
    assert smp_denominator(_leaf(1.5), 1.0, 0.5).item() == 0.0
    with pytest.raises(TrainingError, match="denominator 1 - lambda\\*G \\+ delta=0.0"):
        smp_lora_loss(_leaf(0.1), _leaf(1.5), 1.0, delta=0.5)


@pytest.mark.parametrize("loss", [mp_lora_loss, smp_lora_loss])
def test_a_non_scalar_l_ada_or_g_is_a_value_error_naming_it(loss):
    """A per-sample loss vector passed by mistake must be named, not fail deep inside torch."""
    with pytest.raises(ValueError, match="l_ada must be a scalar"):
        loss(torch.tensor([0.1, 0.2]), _leaf(-1.0), 0.1)
    with pytest.raises(ValueError, match="g must be a scalar"):
        loss(_leaf(0.1), torch.tensor([-1.0, -2.0]), 0.1)


def test_privacy_loss_terms():
    t = privacy_loss_terms("smp", _leaf(0.2), _leaf(-1.0), 0.5)
    assert t.loss.item() == pytest.approx(0.2 / (1.5 + 1e-5))
    assert t.denominator.item() == pytest.approx(1.5 + 1e-5)
    assert t.loss.requires_grad and not t.g.requires_grad and not t.l_ada.requires_grad
    t = privacy_loss_terms("mp", _leaf(0.2), _leaf(-1.0), 0.5)
    assert t.loss.item() == pytest.approx(-0.3) and t.denominator is None
    with pytest.raises(ConfigError):
        privacy_loss_terms("plain", _leaf(0.2), _leaf(-1.0), 0.5)  # type: ignore[arg-type]


def test_smp_gradient_through_attacker_matches_chain_rule():
    """∂L_SPL/∂x through a tiny h_ω equals (λ L_ada / D²) · ∂G/∂x, with ∂G/∂x by hand for a linear head."""
    torch.manual_seed(0)
    att = ProxyAttacker(in_features=6, hidden=(5,), dropout=0.0, normalization="none").double().eval()
    x = torch.rand(3, 6, dtype=torch.float64, requires_grad=True)
    l_ada, lam, delta = torch.tensor(0.4, dtype=torch.float64), 0.3, 1e-5
    g = mi_gain_members(att(x))
    loss = smp_lora_loss(l_ada, g, lam, delta)
    (grad_x,) = torch.autograd.grad(loss, x)

    # By hand: G = mean_i log softmax(z_i)[1]; ∂ log p1/∂z = onehot(1) − p; z = W2 relu(W1 x + b1) + b2.
    lin1, lin2 = att.net[0], att.net[3]
    with torch.no_grad():
        h = x @ lin1.weight.T + lin1.bias
        z = torch.relu(h) @ lin2.weight.T + lin2.bias
        dz = (torch.tensor([0.0, 1.0], dtype=torch.float64) - torch.softmax(z, 1)) / x.shape[0]
        dh = (dz @ lin2.weight) * (h > 0)
        dg_dx = dh @ lin1.weight
        denom = 1 - lam * g.item() + delta
        expected = lam * l_ada.item() / denom**2 * dg_dx
    torch.testing.assert_close(grad_x, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- ProxyAttacker


def test_attacker_architecture_follows_in_features():
    n = attacker_in_features((4, 8, 8))
    assert n == 256
    att = ProxyAttacker(n)
    linears = [m for m in att.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 512), (512, 256), (256, 2)]
    dropouts = [m.p for m in att.net if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.5, 0.5]
    assert att(torch.rand(3, 4, 8, 8)).shape == (3, 2)
    with pytest.raises(ConfigError, match="expects 256 features"):
        att(torch.rand(3, 4, 16, 16))
    small = ProxyAttacker(10, hidden=(7, 3), dropout=0.1, normalization="none")
    assert [m.out_features for m in small.net if isinstance(m, torch.nn.Linear)] == [7, 3, 2]
    for bad in (dict(in_features=0), dict(in_features=4, dropout=1.0), dict(in_features=4, normalization="zscore")):
        with pytest.raises(ConfigError):
            ProxyAttacker(**bad)


def test_attacker_in_features_refuses_an_empty_dimension():
    """A zero-sized latent dimension would build an attacker with no inputs."""
    with pytest.raises(ConfigError, match="non-empty and positive"):
        attacker_in_features((4, 0, 8))
    with pytest.raises(ConfigError, match="non-empty and positive"):
        attacker_in_features(())


@pytest.mark.parametrize("normalization", ["none", "log_standardize"])
def test_half_precision_features_run_in_the_attackers_dtype(normalization):
    """Features from a fp16 UNet pass must be cast to h_ω's fp32 weights, not crash on a dtype mismatch."""
    att = ProxyAttacker(8, normalization=normalization).eval()
    x = torch.rand(2, 8)
    out = att(x.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, att(x.half().float()))


def test_attacker_runs_fp32_under_autocast():
    att = ProxyAttacker(16, normalization="log")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = att(torch.rand(2, 16))
    assert out.dtype == torch.float32


def test_normalization_buffers_in_state_dict_and_round_trip():
    torch.manual_seed(0)
    att = ProxyAttacker(32, normalization="log_standardize")
    sd = att.state_dict()
    assert {"normalizer.running_mean", "normalizer.running_sq_mean", "normalizer.num_batches_tracked"} <= set(sd)
    assert "normalizer.running_mean" not in ProxyAttacker(32, normalization="none").state_dict()

    feats = torch.rand(64, 32) ** 4 * 10  # heavy-tailed positive values
    att.train()
    for chunk in feats.split(8):
        att(chunk)
    logx = torch.log(feats + 1e-4).double()
    # The first 1/momentum batches give the exact mean of the equal-size batch means.
    assert att.normalizer.running_mean.item() == pytest.approx(logx.mean().item(), rel=1e-5)
    assert att.normalizer.running_var.item() == pytest.approx(logx.var(unbiased=False).item(), rel=1e-4)
    normed = att.normalizer(feats)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normed.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)

    clone = ProxyAttacker(32, normalization="log_standardize")
    clone.load_state_dict(att.state_dict())
    att.eval(), clone.eval()
    torch.testing.assert_close(clone(feats[:4]), att(feats[:4]))


def test_stats_update_only_when_asked():
    att = ProxyAttacker(8, normalization="standardize")
    x = torch.rand(4, 8) + 3
    att.eval()
    att(x)
    assert att.normalizer.num_batches_tracked.item() == 0
    att.train()
    att(x, update_stats=False)
    assert att.normalizer.num_batches_tracked.item() == 0
    att(x)
    assert att.normalizer.num_batches_tracked.item() == 1
    assert att.normalizer.running_mean.item() == pytest.approx(x.mean().item(), rel=1e-6)


def test_a_training_batch_is_normalised_by_the_batches_before_it_never_by_its_own():
    """Per-feature statistics of a 1 + 1 batch would map it to [[-1, 1], [1, -1]] whatever the values: the attacker
    would read the pairing, not the features."""
    from library.privacy import FeatureNormalizer

    norm = FeatureNormalizer("standardize", per_feature=True, num_features=2)
    first = torch.tensor([[0.05, 0.30], [0.90, 0.02]])
    torch.testing.assert_close(norm(first, update_stats=True), first)  # nothing seen yet: the identity
    second = torch.tensor([[0.2, 0.1], [0.4, 0.5]])
    expected = (second - first.mean(0)) / (first.var(0, unbiased=False) + 1e-8).sqrt()
    torch.testing.assert_close(norm(second, update_stats=True), expected)  # the first batch's statistics only
    assert norm.num_batches_tracked.item() == 2


def test_per_feature_stats_for_multi_timestep_losses():
    # Losses at 3 timesteps with very different scales: per-feature stats standardise each column.
    torch.manual_seed(0)
    feats = torch.rand(256, 3) * torch.tensor([1e-3, 1e-1, 10.0])
    att = ProxyAttacker(3, normalization="log_standardize", per_feature_stats=True)
    assert att.normalizer.running_mean.shape == (3,)
    att.train()
    for chunk in feats.split(16):
        att(chunk)
    normed = att.normalizer(feats)
    torch.testing.assert_close(normed.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normed.std(0, unbiased=False), torch.ones(3), atol=2e-2, rtol=0)


def test_normalizer_is_differentiable_and_bounded():
    norm = FeatureNormalizer("log", eps=1e-4)
    r = torch.linspace(-0.1, 0.1, 201, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(norm(r.square()).sum(), r)
    assert grad.abs().max().item() <= 1 / math.sqrt(1e-4) + 1e-9
    with pytest.raises(ConfigError):
        FeatureNormalizer("log", eps=0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=float("inf")), "eps must be a positive number"),
    (dict(eps=float("nan")), "eps must be a positive number"),
    (dict(momentum=0.0), r"momentum must be in \(0, 1\]"),
    (dict(momentum=1.5), r"momentum must be in \(0, 1\]"),
    (dict(per_feature=True), "per-feature standardisation needs the number of features"),
])
def test_normalizer_refuses_bad_settings_with_a_config_error(kwargs, message):
    """An infinite eps maps every feature to inf; a missing feature count would fail later as a TypeError."""
    with pytest.raises(ConfigError, match=message):
        FeatureNormalizer("log_standardize", **kwargs)


def test_momentum_one_is_allowed_and_keeps_only_the_last_batch():
    """momentum = 1 is the documented upper end of (0, 1]: the statistics are those of the last batch seen."""
    norm = FeatureNormalizer("standardize", momentum=1.0)
    norm(torch.tensor([[1.0, 3.0]]), update_stats=True)
    norm(torch.tensor([[10.0, 14.0]]), update_stats=True)
    assert norm.running_mean.item() == pytest.approx(12.0)
    assert norm.running_var.item() == pytest.approx(4.0)


def test_attacker_learns_separable_features():
    """One Algorithm-1 style loop (gradient ascent on G) separates two easy feature distributions."""
    torch.manual_seed(0)
    att = ProxyAttacker(12, hidden=(16, 8), dropout=0.0, normalization="log_standardize")
    opt = torch.optim.Adam(att.parameters(), lr=1e-2)
    members = torch.rand(64, 12) * 0.1  # members: small errors
    nonmembers = torch.rand(64, 12) * 0.1 + 0.1
    g_start = mi_gain(att(members), att(nonmembers)).item()
    for _ in range(60):
        opt.zero_grad()
        attacker_loss(att(members), att(nonmembers)).backward()
        opt.step()
    att.eval()
    with torch.no_grad():
        assert mi_gain(att(members), att(nonmembers)).item() > g_start
        assert attacker_accuracy(att(members), att(nonmembers)) > 0.9
