"""Token layouts built from events: DFGR's fake flow of the target events only, against its drawing
and against the dense ``[real | fake]`` layout it is cut from."""

from __future__ import annotations

import pytest
import torch

from genrec.data.batching import JaggedBatch
from genrec.nn.events import Events, dual_flow_layout, target_dual_flow_layout
from genrec.ops.masks import build_mask
from tests.helpers import make_batch, with_last_targets


def _draw(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in r.split()] for r in rows])


def test_target_fake_flow_drawing():
    t = torch.tensor
    ev = Events.from_padded(items=t([[5, 6, 7, 8, 9]]), actions=t([[1, 2, 3, 4, 0]]), labels=t([[0, 1, 0, 1, 0]]),
                            request=t([[0, 1, 1, 2, 2]]), timestamp=t([[10, 20, 20, 30, 30]]),
                            valid=t([[True] * 5]), target=t([[False, False, True, True, True]]))
    layout, index = target_dual_flow_layout(ev)
    assert index.tolist() == [[2, 3, 4]]
    assert layout.fake.tolist() == [[False] * 5 + [True] * 3]
    assert layout.position.tolist() == [[0, 1, 2, 3, 4, 1, 3, 3]]  # fake: their request's first event
    assert layout.timestamp.tolist() == [[10, 20, 20, 30, 30, 20, 30, 30]]
    expected = _draw([
        "x . . . . . . .",
        "x x . . . . . .",
        "x x x . . . . .",
        "x x x x . . . .",
        "x x x x x . . .",
        "x . . . . x . .",
        "x x x . . . x .",
        "x x x . . . . x",
    ])
    assert torch.equal(build_mask(layout)[0], expected)


def test_target_fake_flow_is_the_dense_layout_without_the_fake_tokens_of_other_events():
    """Row by row the valid fake tokens are the targets in event order, each with the metadata and
    mask row of its dense fake token restricted to the kept tokens; N + T tokens, padding invalid."""
    ev = Events.from_batch(with_last_targets(make_batch([13, 1, 40, 7], seed=3), 0.1))
    layout, index = target_dual_flow_layout(ev)
    dense = dual_flow_layout(ev)
    n, t = ev.valid.shape[1], int(ev.target.sum(1).max())
    assert layout.shape == (4, n + t) and t == 4
    fake_valid = layout.valid[:, n:]
    assert torch.equal(fake_valid.sum(1), ev.target.sum(1))
    keep = torch.cat([torch.arange(n).expand(4, n), n + index], 1)  # [B, N + T] dense token of each token
    for name in ("request", "event", "position", "timestamp", "fake"):
        assert torch.equal(getattr(layout, name)[layout.valid], getattr(dense, name).gather(1, keep)[layout.valid])
    for b in range(4):
        assert torch.equal(index[b][fake_valid[b]], torch.nonzero(ev.target[b]).flatten())
        rows = keep[b][layout.valid[b]]
        assert torch.equal(build_mask(layout)[b][layout.valid[b]][:, layout.valid[b]],
                           build_mask(dense)[b][rows][:, rows])


def _random_targets(lengths: list[int], seed: int) -> JaggedBatch:
    """Random sequences (``lengths`` may hold 0, or be empty) whose targets are random events, none
    in every third row."""
    if not lengths:  # no rows: a one-row batch cut to none (make_batch types its columns from its rows)
        return JaggedBatch(**{name: t[:1] if name == "offsets" else t[:0]
                              for name, t in _random_targets([1], seed).tensors().items()})
    batch = make_batch(lengths, seed=seed)
    target = torch.rand(batch.num_events, generator=torch.Generator().manual_seed(seed)) < 0.3  # [T]
    target &= batch.sequence_index() % 3 != 0
    return JaggedBatch(**batch.tensors() | {"target_mask": target})


@pytest.mark.parametrize("lengths", [[], [0], [4, 0, 9, 1, 30, 2, 17], [1, 1, 1], [50, 3, 0, 44]])
def test_a_batchs_host_target_count_is_the_fake_flow_the_layout_sees(lengths):
    """The most targets of a row, counted on the host batch and carried by ``to``, is T of the
    padded events' layout; given to the layout it builds the same tokens as the device read."""
    batch = _random_targets(lengths, seed=len(lengths) + sum(lengths))
    ev = Events.from_batch(batch)
    assert torch.equal(batch.targets_per_row, ev.target.sum(1))
    assert batch.max_targets == batch.to("meta").known_max_targets == (int(ev.target.sum(1).max()) if lengths else 0)
    (layout, index), (read, read_index) = target_dual_flow_layout(ev, batch.max_targets), target_dual_flow_layout(ev)
    assert torch.equal(index, read_index) and layout.shape == read.shape == (len(lengths), ev.valid.shape[1] +
                                                                             batch.max_targets)
    for name in ("valid", "request", "event", "fake", "position", "timestamp"):
        assert torch.equal(getattr(layout, name), getattr(read, name))
