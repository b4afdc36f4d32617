"""The collectives of a multi-process run, on a stand-in accelerator of two processes (the real two-process runs:
tests/test_multiprocess.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import library.train.collectives as collectives
from library.train.collectives import Collectives


class _TwoRanks:
    """An accelerator of two processes whose other rank holds x + 2 (a mean all-reduce gives x + 1) or its digest
    (``other_digest``, appended to a gather)."""

    num_processes, device = 2, "cpu"

    def __init__(self, other_digest: torch.Tensor | None = None, is_main_process: bool = True) -> None:
        self.other_digest, self.gathered, self.is_main_process = other_digest, None, is_main_process

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        return tensor + 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathered = tensor
        return torch.cat([tensor, tensor if self.other_digest is None else self.other_digest])


def test_gradients_are_averaged_tensor_by_tensor_and_integer_buffers_are_left_alone():
    """One flat all-reduce must hand each tensor back its own slice; a step counter is no float to average."""
    floats = [torch.zeros(2), torch.full((3,), 10.0), torch.full((2, 2), 20.0)]
    steps = torch.tensor([7])
    Collectives(_TwoRanks()).all_reduce_mean([*floats, steps])
    assert [t.tolist() for t in floats] == [[1.0] * 2, [11.0] * 3, [[21.0] * 2] * 2] and steps.item() == 7
    frozen, trained = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    trained.grad = torch.zeros(2)
    Collectives(_TwoRanks()).reduce_gradients([frozen, trained])  # a parameter without a gradient is skipped
    assert trained.grad.tolist() == [1.0, 1.0] and frozen.grad is None
    Collectives(_TwoRanks()).all_reduce_mean([])  # nothing to reduce: no collective of an empty tensor


def test_ranks_holding_the_same_numbers_in_another_order_are_out_of_sync():
    """The sync check must see a permutation (same sum) between ranks, and pass identical weights."""
    weights = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    other = _TwoRanks()
    assert Collectives(other).in_sync(weights)  # a rank compared with itself
    swapped = [torch.tensor([2.0, 1.0]), torch.tensor([3.0])]
    assert not Collectives(_TwoRanks(other_digest=other.gathered)).in_sync(swapped)
    assert Collectives(_TwoRanks(other_digest=other.gathered)).in_sync(weights)


def test_one_process_needs_no_collective():
    """A single-process run: its own object in a list of one, its own work's value, and always in sync."""
    one = Collectives(SimpleNamespace(num_processes=1))  # no reduce/gather: calling one would fail
    assert one.gather_objects({"rank": 0}) == [{"rank": 0}]
    assert one.in_sync([torch.ones(2)]) is True
    assert one.on_main(lambda: "value") == "value"


def test_objects_are_gathered_one_per_rank(monkeypatch):
    """Each rank contributes its object whole (a dict stays one entry), in rank order."""
    monkeypatch.setattr(collectives, "gather_object", lambda objects: objects + [{"rank": 1}])
    assert Collectives(_TwoRanks()).gather_objects({"rank": 0}) == [{"rank": 0}, {"rank": 1}]


@pytest.fixture
def sent(monkeypatch) -> list:
    """A broadcast between two ranks: the first object sent (by rank 0) is what every later rank receives."""
    sent = []

    def broadcast(objects, from_process):
        assert from_process == 0
        if not sent:
            sent.append(objects[0])
        return [sent[0]]

    monkeypatch.setattr(collectives, "broadcast_object_list", broadcast)
    return sent


def test_the_main_process_does_the_work_and_every_rank_gets_its_value_or_its_refusal(sent):
    """on_main: only the main rank runs the work; its value, or its refusal, is what the broadcast carries, and a
    refusal is raised on every rank (raised on the main one alone, the others would wait for ever)."""
    from library.errors import DataError

    def refuse():
        raise DataError("class image x.png has no caption file")

    with pytest.raises(DataError, match="x.png has no caption file") as raised:
        Collectives(_TwoRanks()).on_main(refuse)
    assert sent == [raised.value]  # broadcast, not raised before it
    with pytest.raises(DataError, match="x.png has no caption file"):  # another rank: the main one's refusal
        Collectives(_TwoRanks(is_main_process=False)).on_main(lambda: pytest.fail("not the main process"))
    sent.clear()
    assert Collectives(_TwoRanks()).on_main(lambda: ["main"]) == ["main"]
    assert Collectives(_TwoRanks(is_main_process=False)).on_main(lambda: pytest.fail("not main")) == ["main"]


def test_any_other_failure_of_the_main_process_is_raised_there_and_named_on_the_other_ranks(sent):
    """A disk error or an out-of-memory while the main rank works: it raises its own exception (the traceback is
    the diagnosis) after telling the others, which stop with one line naming it instead of waiting for ever."""
    from library.errors import UserError

    def fail():
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        Collectives(_TwoRanks()).on_main(fail)
    with pytest.raises(UserError, match=r"^the main process stopped with OSError: \[Errno 28\] No space left on "
                                        r"device \(its traceback is in its output\)$"):
        Collectives(_TwoRanks(is_main_process=False)).on_main(lambda: pytest.fail("not the main process"))
