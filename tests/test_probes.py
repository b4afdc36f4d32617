"""The probe engine (library.eval.probes) on a fake model: batching, memoised UNet queries and their counts, the
probe cache (what it serves and what it refuses), and probe identities. No real network: each test is instant."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from library.errors import ModelError
from library.eval.probes import (
    ModelContext,
    Probe,
    ProbeCache,
    QueryContext,
    cached_probe_runs,
    probe_cache_key,
    run_probes,
    unique_probes,
)

N = 5


class FakeModel(ModelContext):
    """A model whose UNet returns its input plus the timestep, and whose text encoder gives caption ``c<i>`` the
    vector [i] (any other caption [-1])."""

    def encode(self, captions):
        return torch.tensor([float(c[1:]) if c[1:].isdigit() else -1.0 for c in captions]).view(-1, 1, 1)


def fake_model(n: int = N) -> FakeModel:
    unet = lambda x, t, encoder_hidden_states: SimpleNamespace(sample=x + t.view(-1, 1, 1, 1))  # noqa: E731
    samples = [SimpleNamespace(caption=f"c{i}", sha256=f"{i:064x}", path=None) for i in range(n)]
    return FakeModel(SimpleNamespace(unet=unet), samples, torch.device("cpu"), torch.float32, seed=0, resolution=8)


class RowProbe(Probe):
    """Each sample's row index and the memoised query eps(z0, t) at two timesteps (one asked twice)."""

    name = "rows"

    def __init__(self, t: int = 3, value: float = 0.0) -> None:
        self.t, self.value = t, value

    def settings(self) -> dict[str, Any]:
        return {"t": self.t}

    def queries_per_sample(self) -> float:
        return 2

    def compute(self, ctx: QueryContext) -> dict[str, torch.Tensor]:
        eps = ctx.predict(ctx.z0, self.t, key="z0")
        again = ctx.predict(ctx.z0, self.t, key="z0")  # memoised: no second query
        other = ctx.predict(ctx.z0, self.t + 1, key="z0")
        return {"row": torch.tensor(ctx.index, dtype=torch.float32) + self.value,
                "eps": eps.flatten(1) + again.flatten(1) + other.flatten(1)}


def latents(n: int = N) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)


def test_gradient_groups_of_a_unet_are_its_numbered_blocks():
    """GSA reports one gradient norm per UNet block: every down and up block on its own, the rest by top module."""
    unet = torch.nn.Module()
    unet.conv_in = torch.nn.Linear(1, 1)
    unet.down_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
    unet.mid_block = torch.nn.Sequential(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))
    unet.up_blocks = torch.nn.ModuleList([torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)])
    model = ModelContext(SimpleNamespace(unet=unet), [], torch.device("cpu"), torch.float32, seed=0, resolution=8)
    groups = model.parameter_groups()
    assert list(groups) == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert [len(params) for params in groups.values()] == [2, 2, 2, 4, 2, 2]


def test_alpha_bar_is_the_schedules_value_at_each_timestep():
    """Every closed-form probe (SecMI, PIA, ...) scales by alpha-bar_t: one step off shifts every statistic."""
    schedule = torch.linspace(0.99, 0.01, 10, dtype=torch.float64)
    model = fake_model(3)
    model.bundle.noise_scheduler = SimpleNamespace(alphas_cumprod=schedule)
    ctx = QueryContext(model, range(3), latents(3))
    assert ctx.alpha_bar(4).flatten().tolist() == [schedule[4].float().item()] * 3
    t = torch.tensor([0, 5, 9])
    assert ctx.alpha_bar(t).shape == (3, 1, 1, 1)
    assert ctx.alpha_bar(t).flatten().tolist() == schedule[t].float().tolist()


def test_noise_is_each_samples_own_whatever_the_batch_and_differs_per_draw():
    """Paired noise: a sample gets the same noise in every batch (and model), other samples and draws other noise."""
    model = fake_model()
    batch = QueryContext(model, [0, 1, 2], latents()[[0, 1, 2]]).noise("t", draw=0)
    alone = QueryContext(model, [2], latents()[[2]]).noise("t", draw=0)
    assert torch.equal(alone[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert not torch.equal(QueryContext(model, [2], latents()[[2]]).noise("t", draw=1), alone)


def test_conditioning_defaults_to_each_samples_own_caption():
    """A query conditioned on another sample's caption measures the wrong thing silently."""
    ctx = QueryContext(fake_model(), [3, 1, 4], latents()[[3, 1, 4]])
    assert ctx.conditioning().flatten().tolist() == [3.0, 1.0, 4.0]
    assert ctx.conditioning(["c2", "x", "c2"]).flatten().tolist() == [2.0, -1.0, 2.0]


def test_probes_cover_every_sample_in_order_whatever_the_batch_size():
    """A batch cut short or a sample dropped would shift every score against its membership label."""
    for batch_size in (1, 2, N, N + 3):
        run = run_probes([RowProbe()], fake_model(), latents(), batch_size=batch_size, cache=ProbeCache(None),
                         model_identity={})["rows"]
        assert run.outputs["row"].tolist() == list(range(N))
        assert run.outputs["eps"][:, 0].tolist() == [3 * z + 3 + 3 + 4 for z in range(N)]


class SharingProbe(RowProbe):
    """Asks exactly RowProbe's queries: run after it, it computes none."""

    name = "sharing"


def test_queries_computed_count_each_distinct_query_once_for_the_probe_that_paid_it():
    """The report's cost table: memo hits are free, every computed query costs one per sample of its batch, and a
    query shared with an earlier probe is that probe's."""
    runs = run_probes([RowProbe(), SharingProbe()], fake_model(), latents(), batch_size=2, cache=ProbeCache(None),
                      model_identity={})
    assert runs["rows"].queries_computed == 2 * N and not runs["rows"].cache_hit
    assert runs["sharing"].queries_computed == 0
    assert torch.equal(runs["sharing"].outputs["eps"], runs["rows"].outputs["eps"])


def test_other_captions_are_another_query_and_need_their_captions():
    """eps(x, t, c) with other captions must not be served the true captions' memoised prediction."""
    ctx = QueryContext(fake_model(), range(3), latents(3))
    ctx.predict(ctx.z0, 3, key="z0")
    ctx.predict(ctx.z0, 3, key="z0", caption_key="empty", captions=[""] * 3)
    assert ctx.queries == 2 * 3
    with pytest.raises(ValueError, match="needs its captions"):
        ctx.predict(ctx.z0, 3, key="z0", caption_key="blank")


def test_a_probe_giving_nan_is_one_model_error_and_is_not_cached(tmp_path):
    """NaN scores would rank samples arbitrarily; cached, they would be served to every later run."""
    with pytest.raises(ModelError, match="'rows' gives NaN/inf values"):
        run_probes([RowProbe(value=float("nan"))], fake_model(), latents(), batch_size=2, cache=ProbeCache(tmp_path),
                   model_identity={})
    assert not list(tmp_path.iterdir())


def test_a_computed_probe_is_cached_and_served_again_without_queries(tmp_path):
    """Adding an attack to a finished evaluation costs only its own queries: the others come from the cache."""
    cache = ProbeCache(tmp_path)
    first = run_probes([RowProbe()], fake_model(), latents(), batch_size=2, cache=cache, model_identity={"m": 1})
    again = run_probes([RowProbe()], fake_model(), latents(), batch_size=2, cache=cache, model_identity={"m": 1})
    assert again["rows"].cache_hit and again["rows"].queries_computed == 0
    for name, value in first["rows"].outputs.items():
        assert torch.equal(again["rows"].outputs[name], value)
    runs, pending = cached_probe_runs([RowProbe(t=4)], cache, {"m": 1}, N)
    assert not runs and [probe.t for probe, _ in pending] == [4]  # other settings: another entry


def test_the_probe_cache_refuses_another_key_another_sample_count_and_non_finite_values(tmp_path):
    """A cached file is only served for exactly its key and samples, with finite values: anything else recomputes."""
    cache, key = ProbeCache(tmp_path), "k" * 64
    assert cache.read("rows", key, N) is None  # nothing written yet
    cache.write("rows", key, {"row": torch.arange(N, dtype=torch.float32)})
    assert cache.read("rows", key, N)["row"].tolist() == list(range(N))
    assert cache.read("rows", key, N + 1) is None
    assert cache.read("rows", "k" * 32 + "x" * 32, N) is None  # same file name, another key in its header
    cache.write("rows", key, {"row": torch.tensor([0.0, float("inf"), 2.0, 3.0, 4.0])})
    assert cache.read("rows", key, N) is None
    assert ProbeCache(None).read("rows", key, N) is None


def test_probe_cache_keys_depend_on_the_settings_and_the_model():
    """Another setting or another model must never be served this one's outputs."""
    key = probe_cache_key(RowProbe(t=3), {"model": "a"})
    assert key == probe_cache_key(RowProbe(t=3), {"model": "a"})
    assert key != probe_cache_key(RowProbe(t=4), {"model": "a"})
    assert key != probe_cache_key(RowProbe(t=3), {"model": "b"})


def test_unique_probes_share_one_identity_and_refuse_one_name_with_other_settings():
    """Two attacks asking for the same probe share one computation; one name with two settings is ambiguous."""
    first = RowProbe(t=3)
    assert unique_probes([first, RowProbe(t=3)]) == [first]
    with pytest.raises(ValueError, match="two probes named 'rows' with different settings"):
        unique_probes([first, RowProbe(t=4)])
