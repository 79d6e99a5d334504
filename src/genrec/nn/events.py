"""Padded per-event tensors of a jagged batch, with the request bookkeeping every model needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genrec.data.batching import JaggedBatch
from genrec.models.base import pad_jagged
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
        pad = {name: pad_jagged(getattr(batch, name), batch.offsets, n)[0]
               for name in ("items", "actions", "labels", "request_ids", "timestamps", "target_mask")}
        valid = pad_jagged(batch.items, batch.offsets, n)[1]
        position = torch.arange(n, device=valid.device).expand_as(pad["items"])
        new_request = torch.ones_like(valid)
        new_request[:, 1:] = pad["request_ids"][:, 1:] != pad["request_ids"][:, :-1]
        request_start = torch.cummax(torch.where(new_request, position, torch.zeros_like(position)), dim=1).values
        prev_index = (request_start - 1).clamp(min=0)
        prev_time = torch.where(request_start > 0, pad["timestamps"].gather(1, prev_index),
                                torch.full_like(prev_index, -1))
        return cls(pad["items"], pad["actions"], pad["labels"], pad["request_ids"], pad["timestamps"], valid,
                   pad["target_mask"] & valid, position, request_start, prev_time)


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
