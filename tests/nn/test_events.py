"""Token layouts built from events: DFGR's fake flow of the target events only, against its drawing
and against the dense ``[real | fake]`` layout it is cut from."""

from __future__ import annotations

import torch

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
