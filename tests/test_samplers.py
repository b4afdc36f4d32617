"""Epoch-cycling samplers: full epochs, no stale batch at the boundary, exact restore, rank sharding."""

from __future__ import annotations

import pytest

from library.errors import ConfigError
from library.train.samplers import EpochCyclingSampler


def test_each_epoch_is_a_permutation_and_never_repeats_the_last_batch():
    sampler = EpochCyclingSampler(num_items=5, batch_size=2, seed=3)
    batches = [sampler.next_indices() for _ in range(6)]
    first_epoch = batches[0] + batches[1]
    assert len(set(first_epoch)) == 4  # two full batches; the fifth item waits for a later epoch
    assert sampler.epoch == 2
    assert all(len(b) == 2 for b in batches)
    # Upstream re-served the previous aux batch when its iterator ran out; here the batch after an epoch
    # boundary is the first batch of the next epoch's fresh permutation.
    fresh = EpochCyclingSampler(num_items=5, batch_size=2, seed=3)._make_permutation(1)[:2].tolist()
    assert batches[2] == fresh


def test_state_restores_the_same_sequence():
    a = EpochCyclingSampler(7, 2, seed=11)
    for _ in range(5):
        a.next_indices()
    b = EpochCyclingSampler(7, 2, seed=11)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(8)] == [b.next_indices() for _ in range(8)]


def test_ranks_take_disjoint_slices_of_one_global_batch():
    r0 = EpochCyclingSampler(8, 2, seed=1, rank=0, world_size=2)
    r1 = EpochCyclingSampler(8, 2, seed=1, rank=1, world_size=2)
    for _ in range(4):
        assert not set(r0.next_indices()) & set(r1.next_indices())


def test_different_seeds_give_different_orders():
    a = [EpochCyclingSampler(50, 5, seed=0).next_indices() for _ in range(1)]
    b = [EpochCyclingSampler(50, 5, seed=1).next_indices() for _ in range(1)]
    assert a != b


def test_a_set_that_divides_into_batches_serves_every_batch_of_the_epoch():
    # 6 items in batches of 2: three full batches per epoch, all of them served before the next permutation (an
    # off-by-one in the epoch-boundary test would drop the last full batch, and one item per epoch with it).
    sampler = EpochCyclingSampler(num_items=6, batch_size=2, seed=5)
    assert sampler.batches_per_epoch == 3
    epoch0 = [i for _ in range(3) for i in sampler.next_indices()]
    assert sampler.epoch == 0 and sorted(epoch0) == list(range(6))
    assert epoch0 == sampler._make_permutation(0).tolist()
    sampler.next_indices()
    assert sampler.epoch == 1


def test_ranks_together_cover_each_epoch_once():
    # Brute force: over one epoch the ranks' batches are the global batches cut from the epoch's permutation, so
    # their union holds each of the first batches_per_epoch * global_batch items once (no rank re-reads another
    # rank's samples at the next step).
    num_items, batch_size, world = 13, 2, 3
    ranks = [EpochCyclingSampler(num_items, batch_size, seed=4, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].batches_per_epoch == num_items // (batch_size * world) == 2
    permutation = ranks[0]._make_permutation(0).tolist()
    seen = []
    for step in range(2):
        for r, sampler in enumerate(ranks):
            start = step * batch_size * world + r * batch_size
            batch = sampler.next_indices()
            assert batch == permutation[start:start + batch_size]
            seen += batch
    assert sorted(seen) == sorted(permutation[:12]) and len(set(seen)) == 12
    assert all(s.epoch == 0 for s in ranks)
    ranks[0].next_indices()
    assert ranks[0].epoch == 1  # the 13th item waits: one global batch would not fill


def test_consecutive_seeds_do_not_give_shifted_copies_of_one_stream():
    # The attacker's D^m_aux and D^nm_aux samplers take seeds s and s + 1 (balanced sets: the same size); a seed
    # derivation like seed + epoch would make the non-member stream the member stream one epoch later.
    orders = {(seed, epoch): tuple(EpochCyclingSampler(20, 2, seed)._make_permutation(epoch).tolist())
              for seed in range(4) for epoch in range(4)}
    assert len(set(orders.values())) == len(orders)


def test_one_global_batch_is_enough_and_one_image_fewer_is_refused_across_processes():
    """The refusal counts every process's batch (a set that fills one global batch trains; one image less is named)."""
    assert EpochCyclingSampler(4, 2, seed=0, world_size=2).batches_per_epoch == 1
    with pytest.raises(ConfigError, match=r"^the dataset has 3 image\(s\), fewer than one batch of 4 "
                                          r"\(2 per process x 2 process\(es\)\)"):
        EpochCyclingSampler(3, 2, seed=0, world_size=2)


def test_every_rank_starts_the_next_epoch_when_the_global_batch_would_not_fill():
    """8 images in global batches of 6: the second step is a new epoch for every rank, never a short or empty slice."""
    ranks = [EpochCyclingSampler(8, 2, seed=2, rank=r, world_size=3) for r in range(3)]
    first, second = [[sampler.next_indices() for sampler in ranks] for _ in range(2)]
    assert all(len(batch) == 2 for batch in first + second) and all(s.epoch == 1 for s in ranks)
    assert sum(second, []) == ranks[0]._make_permutation(1)[:6].tolist()


@pytest.mark.parametrize("change", [{"num_items": 8}, {"seed": 12}])
def test_a_state_of_another_set_size_or_seed_is_refused(change):
    """A resume must not continue another set's order (or index past this set's end)."""
    state = {**EpochCyclingSampler(7, 2, seed=11).state_dict(), **change}
    with pytest.raises(ValueError, match="different dataset or seed"):
        EpochCyclingSampler(7, 2, seed=11).load_state_dict(state)
