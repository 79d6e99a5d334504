"""Padded per-event tensors of a jagged batch, with the request bookkeeping every model needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrec.data.batching import JaggedBatch, jagged_index, pad_jagged
from genrec.ops.layout import TokenLayout


@dataclass
class Events:
    """``[B, N]`` tensors (N = longest sequence in the batch, right padding)."""

    items: torch.Tensor
    actions: torch.Tensor
    labels: torch.Tensor
    request: torch.Tensor
    timestamp: torch.Tensor
    valid: torch.Tensor
    target: torch.Tensor
    position: torch.Tensor  # event index 0..n-1
    request_start: torch.Tensor  # index of the first event of the event's request
    prev_request_time: torch.Tensor  # timestamp of the previous request (-1 for the first request)

    @classmethod
    def from_batch(cls, batch: JaggedBatch) -> Events:
        n = batch.max_len
        index = jagged_index(batch.offsets, batch.num_events, n)  # shared by every field
        pad = {name: pad_jagged(getattr(batch, name), batch.offsets, n, index)[0]
               for name in ("items", "actions", "labels", "request_ids", "timestamps", "target_mask")}
        valid = index[2]
        return cls.from_padded(pad["items"], pad["actions"], pad["labels"], pad["request_ids"], pad["timestamps"],
                               valid, pad["target_mask"] & valid)

    @classmethod
    def from_padded(cls, items: torch.Tensor, actions: torch.Tensor, labels: torch.Tensor, request: torch.Tensor,
                    timestamp: torch.Tensor, valid: torch.Tensor, target: torch.Tensor | None = None) -> Events:
        """Events from right-padded ``[B, N]`` tensors, without a host sync or a data-dependent shape
        (so ``torch.export`` can trace it); ``target`` defaults to none."""
        position = torch.arange(items.shape[1], device=valid.device).expand_as(items)
        new_request = torch.ones_like(valid)
        new_request[:, 1:] = request[:, 1:] != request[:, :-1]
        request_start = torch.cummax(torch.where(new_request, position, torch.zeros_like(position)), dim=1).values
        prev_index = (request_start - 1).clamp(min=0)
        prev_time = torch.where(request_start > 0, timestamp.gather(1, prev_index), torch.full_like(prev_index, -1))
        return cls(items, actions, labels, request, timestamp, valid,
                   torch.zeros_like(valid) if target is None else target, position, request_start, prev_time)


def interleave(item_side: torch.Tensor, action_side: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...]`` item-side and action-side tensors -> ``[B, 2N, ...]`` in order ``x0 a0 x1 a1 ...``."""
    b, n = item_side.shape[:2]
    return torch.stack([item_side, action_side], dim=2).reshape(b, 2 * n, *item_side.shape[2:])


def item_action_layout(ev: Events) -> TokenLayout:
    """The ``[x0 a0 x1 a1 ...]`` token layout of HSTU and UniGRF under the ``request_causal`` rule.

    Item tokens take the position of their request's first event (candidates of a request are
    interchangeable, as in M-FALCON serving); action tokens their own.
    """
    return TokenLayout(
        valid=interleave(ev.valid, ev.valid), request=interleave(ev.request, ev.request),
        event=interleave(ev.position, ev.position), fake=torch.zeros_like(interleave(ev.valid, ev.valid)),
        position=interleave(ev.request_start, ev.position), timestamp=interleave(ev.timestamp, ev.timestamp),
        rule="request_causal")


def dual_flow_layout(ev: Events, fake_valid: torch.Tensor | None = None) -> TokenLayout:
    """The ``[real flow | fake flow]`` layout (``dual_flow`` rule) of DFGR training, and of GenRank's
    training with one candidate token per target (``fake_valid = ev.target``). Fake tokens take the
    position of their request's first event, as candidates do at serving time."""
    return TokenLayout(
        valid=torch.cat([ev.valid, ev.valid if fake_valid is None else fake_valid], 1),
        request=torch.cat([ev.request, ev.request], 1), event=torch.cat([ev.position, ev.position], 1),
        fake=torch.cat([torch.zeros_like(ev.valid), torch.ones_like(ev.valid)], 1),
        position=torch.cat([ev.position, ev.request_start], 1),
        timestamp=torch.cat([ev.timestamp, ev.timestamp], 1), rule="dual_flow")


def target_dual_flow_layout(ev: Events, max_targets: int | None = None) -> tuple[TokenLayout, torch.Tensor]:
    """The ``[real flow N | fake flow T]`` layout (``dual_flow`` rule) whose fake flow holds the
    target events only (T = the most targets of a row), and the event index ``[B, T]`` of each fake
    token. A fake token reads real keys of earlier requests and itself, nothing in the fake flow
    reads another fake token, and no real token reads a fake one: so the fake tokens of non-target
    events change no prediction, and dropping them gives the dense layout's logits at the targets
    with N + T tokens instead of 2N (issue 14, item 5b: the temporal setting trains on a few
    target requests). Fake tokens keep their event's request, event index and timestamp and the
    position of their request's first event, as in :func:`dual_flow_layout`; a row with fewer
    than T targets pads its fake flow with invalid tokens. Fake tokens are in event order, so the
    valid ones, read row by row, are the targets in the order of ``ev.target``.

    Events e0..e4, requests r0 = {e0}, r1 = {e1, e2}, r2 = {e3, e4}; targets e2, e3, e4 (T = 3)::

                R0 R1 R2 R3 R4 F2 F3 F4
          R0     x  .  .  .  .  .  .  .
          R1     x  x  .  .  .  .  .  .
          R2     x  x  x  .  .  .  .  .
          R3     x  x  x  x  .  .  .  .
          R4     x  x  x  x  x  .  .  .
          F2     x  .  .  .  .  x  .  .     <- F2 = the dense F2 row without F0 F1 F3 F4 (never read)
          F3     x  x  x  .  .  .  x  .
          F4     x  x  x  .  .  .  .  x

    T sizes the sequence, so without ``max_targets`` it costs one device-to-host read per call.
    ``max_targets`` must equal ``ev.target.sum(1).max()``, as :attr:`JaggedBatch.max_targets` of
    the batch ``ev`` came from does: counted on the host and carried by ``JaggedBatch.to``, it
    reads nothing back.
    """
    count = ev.target.sum(1)  # [B] targets per row
    t = max_targets
    if t is None:  # not known: read back from the device
        t = int(count.max()) if count.numel() else 0
    order = torch.sort((~ev.target).to(torch.int8), dim=1, stable=True).indices[:, :t]  # [B, T] targets first
    fake_valid = torch.arange(t, device=count.device)[None, :] < count[:, None]  # [B, T]
    index = torch.where(fake_valid, order, torch.zeros_like(order))  # [B, T] event of each fake token

    def real_then_fake(field: torch.Tensor) -> torch.Tensor:  # [B, N] -> [B, N + T]
        return torch.cat([field, field.gather(1, index)], 1)

    return TokenLayout(
        valid=torch.cat([ev.valid, fake_valid], 1), request=real_then_fake(ev.request),
        event=real_then_fake(ev.position),
        fake=torch.cat([torch.zeros_like(ev.valid), torch.ones_like(fake_valid)], 1),
        position=torch.cat([ev.position, ev.request_start.gather(1, index)], 1),
        timestamp=real_then_fake(ev.timestamp), rule="dual_flow"), index


def event_layout(ev: Events, rule: str) -> TokenLayout:
    """One token per event: the history (real flow) of DFGR and GenRank serving."""
    return TokenLayout(valid=ev.valid, request=ev.request, event=ev.position, fake=torch.zeros_like(ev.valid),
                       position=ev.position, timestamp=ev.timestamp, rule=rule)


def append_candidates(layout: TokenLayout, ev: Events, num_candidates: int,
                      request_time: torch.Tensor | None = None, fake: bool = False) -> TokenLayout:
    """``layout`` followed by ``M`` candidate tokens that form each row's next request, at
    ``request_time`` ``[B]`` (default: the last event's time). Candidates take the request's start
    position (the history length) and distinct new event indices, so under either rule a candidate
    reads the history and itself only: the M-FALCON candidate mask. ``fake`` marks them as the
    fake flow (``dual_flow``: DFGR, GenRank); item tokens of the interleaved layout are not fake."""
    b, m = ev.valid.shape[0], num_candidates
    last = ev.valid.sum(1) - 1  # [B] index of each row's last event
    rows = torch.arange(b, device=ev.valid.device)
    time = ev.timestamp[rows, last] if request_time is None else request_time

    def column(value: torch.Tensor) -> torch.Tensor:  # [B] -> [B, M]
        return value[:, None].expand(b, m)

    flag = torch.full((b, m), fake, dtype=torch.bool, device=rows.device)
    extra = {"valid": torch.ones_like(flag), "request": column(ev.request[rows, last] + 1),
             "event": ev.valid.shape[1] + torch.arange(m, device=rows.device).expand(b, m), "fake": flag,
             "position": column(last + 1), "timestamp": column(time)}
    return TokenLayout(**{name: torch.cat([getattr(layout, name), value], dim=1) for name, value in extra.items()},
                       rule=layout.rule)
