"""Token layouts: the per-token metadata from which every mask and attention bias is derived.

Models never hand a dense ``[L, L]`` mask to an attention backend; they hand a :class:`TokenLayout`
and a mask *rule*. The reference backend materialises the mask from it; a fused GPU kernel evaluates
the same predicate per tile without storing it.

:data:`Rule` is the one table of mask rules: a rule's name is its entry, its id in the kernels is its
place in the table. Adding a rule is one entry here and one pure function in :mod:`genrec.ops.masks`;
``tests/ops/test_layout.py`` then names every other place that lacks it (the tile schedule, the
kernels, flex, the drawings and parity tests). Every place raises on a rule it does not know.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

Rule = Literal["causal", "request_causal", "dual_flow"]
RULES: tuple[Rule, ...] = get_args(Rule)
RULE_IDS: dict[str, int] = {rule: i for i, rule in enumerate(RULES)}  # the kernels' RULE constexpr


TAIL_OFFSET = ("tail_offset",)  # the cache entry of the offset a layout's "tail" queries start at


@dataclass
class TokenLayout:
    """Padded ``[B, L]`` metadata of a token sequence (L tokens, right padding)."""

    valid: torch.Tensor  # [B, L] bool
    request: torch.Tensor  # [B, L] int64 request index of the token's event
    event: torch.Tensor  # [B, L] int64 event index (position of the event in its sequence)
    fake: torch.Tensor  # [B, L] bool: fake-flow / candidate token (its action is hidden)
    position: torch.Tensor  # [B, L] int64 position used by position embeddings and biases
    timestamp: torch.Tensor  # [B, L] int64 seconds
    rule: Rule = "causal"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: tuple, build):
        """Pairwise index tensors (distances, time buckets) are built once per forward, not per layer.
        A key holding a symbolic size (``torch.export`` with dynamic shapes traces ``q_offset`` as one)
        cannot be hashed: then it is built each time, which a trace records once anyway. (Tested by
        type, not by calling ``hash``, which dynamo cannot trace: a graph break in every attention.)"""
        if any(isinstance(part, torch.SymInt) for part in key):
            return build()
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def query_tag(self, q_offset: int) -> int | str:
        """How a cache key names the queries from ``q_offset``: 0 (every token), or ``"tail"`` for the
        one other offset a layout is queried from (its KV cache's new tokens, or a last block's
        outputs: :meth:`genrec.nn.hstu.HSTUBlock.forward`), never the value itself: under
        ``torch.compile`` a key holding a batch's offset guards on it, one graph per value. The
        layout notes its tail's offset, and asking for another one eagerly is an error (it would read
        the first one's schedules); a prepared layout carries the note. A symbolic offset
        (``torch.export``) stays in the key, which :meth:`cached` then builds each time."""
        if isinstance(q_offset, torch.SymInt):
            return q_offset
        if q_offset == 0:
            return 0
        if not torch.compiler.is_compiling():  # a comparison there would guard on the value too
            noted = self._cache.setdefault(TAIL_OFFSET, q_offset)
            if noted != q_offset:
                raise ValueError(f"this layout's queries were taken from token {noted}; now from {q_offset}: "
                                 "a layout has one tail (build another layout for other queries)")
        return "tail"

    def prepared(self, keys) -> PreparedLayout:
        """The entries of this layout's cache under ``keys`` (and its tail's offset, where it has one:
        :meth:`query_tag`), to seed the same layout elsewhere."""
        keys = [*keys, *([TAIL_OFFSET] if TAIL_OFFSET in self._cache else [])]
        return PreparedLayout(self.shape, self.rule, {key: self._cache[key] for key in dict.fromkeys(keys)})

    def seed(self, prepared: PreparedLayout | None) -> None:
        """Fill the cache with what was built ahead of the step from the same batch (the data loader's
        :class:`genrec.nn.prepared.LayoutPlan`), so no forward builds it again. A plan of another
        shape or rule is an error: its schedules would describe other tokens."""
        if prepared is None:
            return
        if (tuple(prepared.shape), prepared.rule) != (self.shape, self.rule):
            raise ValueError(f"a prepared layout of shape {tuple(prepared.shape)} under rule {prepared.rule!r} "
                             f"cannot seed a layout of shape {self.shape} under rule {self.rule!r}: the batch's "
                             "known_layout was built from another batch or model")
        self._cache.update(prepared.entries)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown mask rule {self.rule!r}; known: {RULES}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)


@dataclass
class PreparedLayout:
    """Cache entries of a :class:`TokenLayout` (kernel metadata, tile schedules) built before its step,
    on the host in a data-loader worker, and moved to the device with the batch: what the step would
    otherwise build between its kernels, one small launch at a time (issue 14, item 4)."""

    shape: tuple[int, int]
    rule: Rule
    entries: dict


TIME_LIMIT_S = 2**31  # the kernels' int32 time differences
_host_checked = threading.local()


@contextmanager
def time_spans_checked_on_host() -> Iterator[None]:
    """For a caller that has checked its timestamps on the host: every timestamp of the batch (and
    the padding's 0) in ``[0, 2^31)`` s, so no span can reach 2^31. :func:`check_time_span` then
    skips its device read-back, on CUDA a host sync per forward. The service checks each request's
    numpy history this way (``genrec.serve.engine``). Per thread: the service scores on its own."""
    before = getattr(_host_checked, "on", False)
    _host_checked.on = True
    try:
        yield
    finally:
        _host_checked.on = before


def times_within_limit(timestamps: torch.Tensor) -> bool:
    """Whether every timestamp of a host tensor lies in ``[0, 2^31)`` s: then no batch of them (with
    its padding's 0) spans 2^31 s, and its forward may run inside :func:`time_spans_checked_on_host`.
    False (not an error) for other times, and for a device tensor (reading it would be the sync this
    avoids): the device check then decides, as before."""
    if timestamps.device.type != "cpu":
        return False
    return not len(timestamps) or (int(timestamps.min()) >= 0 and int(timestamps.max()) < TIME_LIMIT_S)


def host_checked(timestamps: torch.Tensor) -> AbstractContextManager[None]:
    """The context a training step's forward runs in, from its host batch's ``timestamps``:
    :func:`time_spans_checked_on_host` when :func:`times_within_limit` holds, else one that changes
    nothing (the device check decides). The trainer and the speed benchmark both enter it here, so
    the step the benchmark times skips the same read-back as the step the trainer takes."""
    return time_spans_checked_on_host() if times_within_limit(timestamps) else nullcontext()


def check_time_span(timestamps: torch.Tensor) -> None:
    """The fused kernels keep time differences in int32: refuse a batch whose timestamps span 2^31 s.
    Here, beside the layout, because both the kernels and CUDA-graph serving (which must check before
    it replays, outside the graph) call it. Inside ``torch.compile`` a graph cannot read the span back
    to raise, so there it is an asynchronous device assert with the same message. Inside
    :func:`time_spans_checked_on_host` the caller has checked already."""
    message = "timestamps of one batch span more than 2^31 s; the kernels keep int32 time differences"
    if torch.compiler.is_compiling():
        torch._assert_async(timestamps.max() - timestamps.min() < TIME_LIMIT_S, message)
    elif not getattr(_host_checked, "on", False) and int(timestamps.max() - timestamps.min()) >= TIME_LIMIT_S:
        raise ValueError(message)
