"""Jagged batches and the bucketed sampler: offsets, masks, determinism, resume, workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrec.data.batching import BucketBatchSampler, JaggedBatch, WindowDataset, collate, make_loader, rows_at
from genrec.data.preprocess import prepare
from genrec.data.splits import SplitConfig, windows
from tests.helpers import make_batch, with_last_targets


def _dataset(shared_data, split="train", max_len=30):
    seq = prepare("ml-latest-small", shared_data)
    return WindowDataset(seq, windows(seq, split, SplitConfig(protocol="loo"), max_len=max_len))


def test_collate_packs_without_padding(shared_data):
    ds = _dataset(shared_data)
    batch = collate([ds[0], ds[5], ds[9]])
    lengths = [len(ds[i][1]) for i in (0, 5, 9)]
    assert batch.offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
    assert batch.items.shape == (sum(lengths),)
    for b, i in enumerate((0, 5, 9)):
        user, s, e, t = ds.windows[i]
        seg = slice(int(batch.offsets[b]), int(batch.offsets[b + 1]))
        assert batch.target_mask[seg].tolist() == [j >= t for j in range(s, e)]
        assert batch.request_ids[seg][0] == 0
        assert (batch.request_ids[seg].diff() >= 0).all()
    assert batch.positions().tolist()[: lengths[0]] == list(range(lengths[0]))


def test_the_batch_drawn_in_the_module_docstring():
    """collate() of the two windows drawn in genrec.data.batching's docstring gives the drawing."""
    arr = np.array
    user7 = (7, arr([11, 12, 13]), arr([4, 2, 3]), arr([1.0, 0.0, 0.0]), arr([10, 20, 20]), arr([5, 6, 6]), 1)
    user3 = (3, arr([14, 15]), arr([0, 4]), arr([0.0, 1.0]), arr([5, 9]), arr([2, 3]), 1)  # ids renumbered from 0
    batch = collate([user7, user3])
    assert batch.offsets.tolist() == [0, 3, 5]
    assert batch.sequence_index().tolist() == [0, 0, 0, 1, 1]
    assert batch.positions().tolist() == [0, 1, 2, 0, 1]
    assert batch.request_ids.tolist() == [0, 1, 1, 0, 1]
    assert batch.timestamps.tolist() == [10, 20, 20, 5, 9]
    assert batch.target_mask.tolist() == [False, True, True, False, True]
    assert batch.users.tolist() == [7, 3]
    assert batch.request_starts().tolist() == [0, 1, 1, 3, 4]


def test_request_starts_restart_at_every_sequence():
    """Each event's request start, against a loop over random windows; windows of one request each
    (request id 0 throughout) still start anew where their sequence does."""
    rng = np.random.default_rng(0)
    samples = []
    for user in range(12):
        n = int(rng.integers(1, 9))
        requests = np.cumsum(rng.random(n) < (0.0 if user % 3 == 0 else 0.5))
        samples.append((user, rng.integers(1, 50, n), np.zeros(n), np.zeros(n), 100 + requests, requests, 0))
    batch = collate(samples)
    expected, flat = [], 0
    for sample in samples:
        requests = sample[5]
        expected += [flat + int(np.argmax(requests == r)) for r in requests]
        flat += len(requests)
    assert batch.request_starts().tolist() == expected


@pytest.mark.parametrize("lead", [(11,), (3, 7)])
def test_rows_at_a_known_count_are_the_boolean_index_and_need_no_device_read(lead):
    """``rows_at`` with the mask's count is ``values[mask]`` (row-major order, trailing dims kept) for a
    random, an empty and a full mask. On the ``meta`` device, where a boolean index cannot size its
    output (it raises), it builds from the count alone: on CUDA, no host sync."""
    gen = torch.Generator().manual_seed(len(lead))
    values = torch.randn(*lead, 3, generator=gen)
    for mask in (torch.rand(lead, generator=gen) < 0.4, torch.zeros(lead, dtype=torch.bool),
                 torch.ones(lead, dtype=torch.bool)):
        count = int(mask.sum())
        assert torch.equal(rows_at(values, mask, count), values[mask])
        assert rows_at(values.to("meta"), mask.to("meta"), count).shape == (count, 3)
    with pytest.raises(NotImplementedError):  # the boolean index on meta: the test can fail
        values.to("meta")[mask.to("meta")]


def test_a_moved_batch_gathers_at_its_targets_by_the_count_it_carried_from_the_host():
    """``JaggedBatch.to`` carries the number of target events; ``at_targets`` gives a flat field's rows
    at the targets, those of the boolean index, on the host and, sized by that count, on ``meta``."""
    batch = make_batch([37, 9, 21, 1], seed=3, all_targets=False)
    count = int(batch.target_mask.sum())
    assert 0 < count < batch.num_events and batch.num_targets == count
    for field in (batch.items, batch.signals, batch.users[batch.sequence_index()]):
        assert torch.equal(batch.at_targets(field), field[batch.target_mask])
    moved = batch.to("meta")
    assert moved.known_num_targets == moved.num_targets == count
    assert moved.at_targets(moved.signals).shape == (count, batch.signals.shape[1])


def test_a_batch_knows_its_earliest_target_position_on_the_host_and_carries_it_when_moved():
    """``first_target``: the least index within its sequence of a target event (a model's last block
    computes nothing before it), read on the host, carried by ``to``; ``max_len`` with no target."""
    batch = with_last_targets(make_batch([37, 9, 21], seed=3), 0.3)  # targets from 25, 6 and 14
    assert batch.first_target == 6 == int(batch.positions()[batch.target_mask].min())
    assert batch.to("meta").known_first_target == batch.to("meta").first_target == 6
    none = JaggedBatch(**batch.tensors() | {"target_mask": torch.zeros_like(batch.target_mask)})
    assert none.first_target == none.max_len == 37
    assert make_batch([5, 8], seed=0).first_target == 0


def test_sampler_is_deterministic_and_resumable():
    lengths = np.random.default_rng(0).integers(1, 100, 1000)
    a = BucketBatchSampler(lengths, 16, shuffle=True, seed=3)
    b = BucketBatchSampler(lengths, 16, shuffle=True, seed=3)
    a.set_epoch(2)
    b.set_epoch(2, start_batch=7)
    full, resumed = list(a), list(b)
    assert resumed == full[7:]
    assert sorted(i for batch in full for i in batch) == list(range(1000))
    a.set_epoch(3)
    assert list(a) != full


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(1).integers(1, 200, 4096)
    bucketed = BucketBatchSampler(lengths, 32, shuffle=True, seed=0).batches()
    random_batches = np.random.default_rng(0).permutation(4096).reshape(-1, 32)

    def waste(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in map(np.asarray, batches))

    assert waste(bucketed) < 0.2 * waste(random_batches)


def test_workers_yield_the_same_batches(shared_data):
    ds = _dataset(shared_data, max_len=20)
    one = list(make_loader(ds, 64, shuffle=True, seed=1, num_workers=0))
    two = list(make_loader(ds, 64, shuffle=True, seed=1, num_workers=2))
    assert len(one) == len(two)
    for x, y in zip(one, two, strict=True):
        assert torch.equal(x.items, y.items) and torch.equal(x.offsets, y.offsets)


def _events_and_first_item(batch) -> dict:
    """A picklable stand-in for a LayoutPlan: what it returns rides on the batch."""
    return {"events": torch.tensor(batch.num_events), "first": (batch.items[:1].clone(),)}


def test_a_loader_with_a_prepare_step_carries_its_result_on_each_batch_from_its_workers(shared_data):
    ds = _dataset(shared_data, max_len=20)
    plain = list(make_loader(ds, 64, shuffle=True, seed=1))
    prepared = list(make_loader(ds, 64, shuffle=True, seed=1, num_workers=2, prepare=_events_and_first_item))
    assert len(plain) == len(prepared)
    for x, y in zip(plain, prepared, strict=True):
        assert x.known_layout is None and torch.equal(x.items, y.items)
        assert int(y.known_layout["events"]) == y.num_events and torch.equal(y.known_layout["first"][0], y.items[:1])


def test_pinning_a_batch_pins_every_tensor_its_layout_too_and_keeps_what_the_host_knows(monkeypatch, shared_data):
    """A loader with ``pin_memory`` calls ``JaggedBatch.pin_memory``: every field and every tensor of
    its layout page-locked (pinning needs a GPU build: here a stand-in marks what it is given), the
    host-known sizes kept, so the moved batch still reads nothing back."""
    pinned = []

    def pin(t):
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    batch = make_batch([4, 2], seed=0)
    batch.known_layout = {("a", 1): (torch.ones(2), [torch.zeros(3, dtype=torch.int32)], None)}
    batch.known_max_len = 4
    out = batch.pin_memory()
    assert len(pinned) == len(batch.tensors()) + 2
    assert all(any(p is t for p in pinned) for t in batch.tensors().values())
    assert out.known_max_len == 4 and out.known_layout[("a", 1)][2] is None
    assert torch.equal(out.known_layout[("a", 1)][1][0], batch.known_layout[("a", 1)][1][0])
    assert all(getattr(out, k) is not getattr(batch, k) for k in batch.tensors())
    dataset = _dataset(shared_data)
    assert make_loader(dataset, 4, shuffle=False, pin_memory=True).pin_memory
    assert not make_loader(dataset, 4, shuffle=False).pin_memory


def test_moving_a_batch_moves_what_its_layout_carries_and_a_rebuilt_batch_drops_it():
    """``to`` moves every tensor inside tuples, dicts and dataclasses (the kernels' metadata); a batch
    built from ``tensors()`` (a modified copy) must not carry a layout of other tokens."""
    from dataclasses import dataclass

    from genrec.data.batching import JaggedBatch, to_device

    @dataclass
    class Meta:
        flags: torch.Tensor
        note: str = "kept"

    batch = make_batch([4, 2], seed=0)
    batch.known_layout = {("a", 1): (torch.ones(2), [Meta(torch.zeros(3, dtype=torch.int32))], None)}
    moved = batch.to("meta")
    ones, (meta,), nothing = moved.known_layout[("a", 1)]
    assert ones.device.type == "meta" and meta.flags.device.type == "meta" and meta.flags.dtype == torch.int32
    assert meta.note == "kept" and nothing is None
    assert to_device(3, "meta") == 3
    assert "known_layout" not in batch.tensors()
    assert JaggedBatch(**batch.tensors()).known_layout is None


def test_map_tensors_maps_a_tensor_that_appears_twice_once_and_keeps_the_aliasing():
    """A prepared layout holds some schedules in two places (the forward's and dQ's lists where their
    tiles are equal): pinning or copying them must cost one call per tensor, and the result must
    keep them one tensor."""
    from genrec.data.batching import map_tensors

    shared, other = torch.arange(3), torch.arange(4)
    calls = []
    out = map_tensors({"a": (shared, other), "b": [shared]}, lambda t: calls.append(t) or t + 1)
    assert len(calls) == 2
    assert out["a"][0] is out["b"][0] and torch.equal(out["b"][0], shared + 1)
    assert torch.equal(out["a"][1], other + 1)
