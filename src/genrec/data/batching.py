"""Jagged batches: sequences packed end to end with offsets, never padded to a global maximum.

:class:`JaggedBatch` is the one structure every model reads. ``offsets`` delimit the sequences in
the flat ``[T]`` tensors (``T`` = total events in the batch). Request ids are renumbered from 0
inside each window. ``target_mask`` marks the events a model is trained or scored on.

Two windows (users 7 and 3) of 3 and 2 events; user 7's second and third events share a request
(equal timestamps); the targets are user 7's last two events and user 3's last::

    offsets         0           3       5     [B + 1]
    event           0   1   2 | 3   4         flat [T = 5]
    sequence        0   0   0 | 1   1         sequence_index()
    position        0   1   2 | 0   1         positions()
    request_ids     0   1   1 | 0   1
    request_starts  0   1   1 | 3   4         request_starts()
    timestamps     10  20  20 | 5   9
    target_mask     .   x   x | .   x
    users           7           3             [B]

(tests/data/test_batching.py builds this batch with :func:`collate` and checks the drawing.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from genrec.data.preprocess import Sequences


@dataclass
class JaggedBatch:
    offsets: torch.Tensor  # [B+1] int64
    items: torch.Tensor  # [T] int64, 1..num_items
    actions: torch.Tensor  # [T] int64, multi-class action (rating class)
    labels: torch.Tensor  # [T] float32, binary label
    timestamps: torch.Tensor  # [T] int64
    request_ids: torch.Tensor  # [T] int64, from 0 within each sequence
    target_mask: torch.Tensor  # [T] bool
    users: torch.Tensor  # [B] int64 dense user index
    signals: torch.Tensor | None = None  # [T, S] float32 binary target per action signal (default: labels)
    # the longest sequence, read once where the offsets live (host) and carried by ``to``: on the
    # device each read would be a host sync
    known_max_len: int | None = field(default=None, repr=False, compare=False)
    # the most targets of a row, the same way: T of DFGR's target-only fake flow, no host sync
    known_max_targets: int | None = field(default=None, repr=False, compare=False)
    # the target events of the batch, the same way: the size of every gather at the targets (so a
    # moved batch's target_mask is not to be changed: build a new batch from its tensors instead)
    known_num_targets: int | None = field(default=None, repr=False, compare=False)
    # the earliest target event's index within its sequence, the same way: a model's last block
    # computes outputs from there on only (genrec.nn.hstu.HSTUBlock's ``outputs_from``)
    known_first_target: int | None = field(default=None, repr=False, compare=False)
    # the model's token layout's kernel metadata and schedules, built from this batch on the host by
    # the loader (genrec.nn.prepared.LayoutPlan; a genrec.ops.layout.PreparedLayout), moved by ``to``
    # and seeded into the step's layout; a batch built from this one's tensors() does not carry it
    known_layout: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.signals is None:  # one-signal data: the binary label is the only signal
            self.signals = self.labels[:, None]

    @property
    def batch_size(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def max_len(self) -> int:
        if self.known_max_len is None or self.offsets.device.type == "cpu":  # host offsets: read, no sync
            return int(self.lengths.max()) if self.batch_size else 0
        return self.known_max_len

    @property
    def targets_per_row(self) -> torch.Tensor:
        """``[B]`` target events of each sequence: differences of the target count up to each offset."""
        before = torch.cat([self.target_mask.new_zeros(1, dtype=torch.int64), self.target_mask.cumsum(0)])  # [T+1]
        return before[self.offsets[1:]] - before[self.offsets[:-1]]

    @property
    def max_targets(self) -> int:
        """The most targets of a row: ``Events.from_batch(batch).target.sum(1).max()`` (padding to
        :attr:`max_len` keeps every event), read as :attr:`max_len` is."""
        if self.known_max_targets is None or self.offsets.device.type == "cpu":  # host mask: read, no sync
            return int(self.targets_per_row.max()) if self.batch_size else 0
        return self.known_max_targets

    @property
    def num_targets(self) -> int:
        """The batch's target events, ``target_mask.sum()``, read as :attr:`max_len` is."""
        if self.known_num_targets is None or self.offsets.device.type == "cpu":  # host mask: read, no sync
            return int(self.target_mask.sum())
        return self.known_num_targets

    @property
    def first_target(self) -> int:
        """The earliest index within its sequence of a target event, over the batch's sequences
        (:attr:`max_len` when none is a target), read as :attr:`max_len` is: no position before it is
        read by a loss at the targets."""
        if self.known_first_target is None or self.offsets.device.type == "cpu":  # host mask: read, no sync
            if not bool(self.target_mask.any()):
                return self.max_len
            return int(self.positions()[self.target_mask].min())
        return self.known_first_target

    def at_targets(self, values: torch.Tensor) -> torch.Tensor:
        """``values[target_mask]`` of a flat ``[T, ...]`` field (``[num_targets, ...]``), sized by
        :attr:`num_targets`: a moved batch reads nothing back (:func:`rows_at`)."""
        return rows_at(values, self.target_mask, self.num_targets)

    @property
    def num_events(self) -> int:
        return len(self.items)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The batch's tensor fields by name (what a modified copy is built from)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("known_")}

    def to(self, device: torch.device | str) -> JaggedBatch:
        moved = {name: t.to(device, non_blocking=True) for name, t in self.tensors().items()}
        return JaggedBatch(**moved, known_max_len=self.max_len, known_max_targets=self.max_targets,
                           known_num_targets=self.num_targets, known_first_target=self.first_target,
                           known_layout=to_device(self.known_layout, device))

    def pin_memory(self) -> JaggedBatch:
        """The batch (its layout too) in page-locked host memory; a loader with ``pin_memory`` calls it.
        A copy to the GPU from pageable memory waits for every kernel queued before it, so each
        step's ``to`` would let the GPU run dry while the host queues the step; from pinned memory
        the copies join the queue and the host runs ahead into the next step."""
        pinned = {name: t.pin_memory() for name, t in self.tensors().items()}
        return dataclasses.replace(self, **pinned, known_layout=map_tensors(self.known_layout, torch.Tensor.pin_memory))

    def sequence_index(self) -> torch.Tensor:
        """``[T]`` index of the sequence each event belongs to."""
        return jagged_index(self.offsets, self.num_events, 0)[0]

    def positions(self) -> torch.Tensor:
        """``[T]`` position of each event inside its sequence (0-based)."""
        return torch.arange(self.num_events, device=self.offsets.device) - self.offsets[:-1][self.sequence_index()]

    def request_starts(self) -> torch.Tensor:
        """``[T]`` flat index of the first event of each event's request in its window. A request's
        events are consecutive (one user's events at one time, or within ``request_window_s``), so
        a request starts where its sequence does or its request id changes."""
        event = torch.arange(self.num_events, device=self.offsets.device)  # [T]
        first = event == self.offsets[:-1][self.sequence_index()]  # [T]
        first[1:] |= self.request_ids[1:] != self.request_ids[:-1]
        return torch.where(first, event, 0).cummax(0).values


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it: through tuples, lists, dicts and
    dataclasses (a prepared layout's entries are tuples of schedules and the kernels' metadata).
    Once per tensor: one that appears in several places (the forward and dQ schedules share lists
    where their tiles are the same) maps to one result, so a copy keeps the aliasing and a pinned
    batch is pinned and transferred once per tensor."""
    done: dict[int, torch.Tensor] = {}  # id -> result; the tensors of ``value`` live through the call

    def once(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            done[id(t)] = fn(t)
        return done[id(t)]

    def walk(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return once(v)
        if isinstance(v, tuple | list):
            return type(v)(walk(x) for x in v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.replace(v, **{f.name: walk(getattr(v, f.name)) for f in fields(v) if f.init})
        return v
    return walk(value)


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor in it on ``device`` (:func:`map_tensors`), copied without blocking."""
    return map_tensors(value, lambda t: t.to(device, non_blocking=True))


def jagged_index(offsets: torch.Tensor, total: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence ``[T]`` and position ``[T]`` of each of the ``total`` jagged values, and the valid mask
    ``[B, max_len]`` of their right-padded layout. Without a host sync: ``repeat_interleave`` is told
    its output size (else it reads the lengths back from the device)."""
    lengths = offsets[1:] - offsets[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=offsets.device), lengths, output_size=total)
    pos = torch.arange(total, device=offsets.device) - offsets[:-1][seq]
    return seq, pos, torch.arange(max_len, device=offsets.device)[None, :] < lengths[:, None]


def rows_at(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``values[mask]`` (``mask`` over the leading dims of ``values``, row-major order), given
    ``count = mask.sum()`` as the host knows it: a boolean index sizes its output from the device, a
    host sync per gather (the last ones a training step had); ``nonzero_static`` is told its size."""
    return values[torch.nonzero_static(mask, size=count).unbind(1)]


def pad_jagged(values: torch.Tensor, offsets: torch.Tensor, max_len: int,
               index: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``[T, ...]`` -> padded ``[B, max_len, ...]`` (right padding) and the valid mask ``[B, max_len]``;
    ``index``: :func:`jagged_index` of these offsets, when several fields share it."""
    seq, pos, valid = index if index is not None else jagged_index(offsets, len(values), max_len)
    out = values.new_zeros((len(offsets) - 1, max_len, *values.shape[1:]))
    out[seq, pos] = values
    return out, valid


class WindowDataset(Dataset):
    """One item per window of :func:`genrec.data.splits.windows`."""

    def __init__(self, seq: Sequences, windows: np.ndarray):
        self.seq = seq
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self) -> np.ndarray:
        return self.windows[:, 2] - self.windows[:, 1]

    def num_targets(self) -> int:
        return int((self.windows[:, 2] - self.windows[:, 3]).sum())

    def __getitem__(self, i: int) -> tuple:
        user, s, e, t = (int(x) for x in self.windows[i])
        q = self.seq
        signals = q.labels[s:e, None] if q.signal_labels is None else q.signal_labels[s:e]  # [n, S]
        return (user, q.items[s:e], q.actions[s:e], q.labels[s:e], q.timestamps[s:e], q.request_ids[s:e], signals,
                t - s)


def collate(samples: list[tuple]) -> JaggedBatch:
    """Samples ``(user, items, actions, labels, timestamps, request_ids[, signals], first_target)`` ->
    one batch; without ``signals`` ``[n, S]`` the label is the one signal. The first target is always
    last, so code that rewrites it (ghost windows) needs no other field."""
    lengths = np.array([len(s[1]) for s in samples])
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    target = np.zeros(offsets[-1], dtype=bool)
    for sample, o in zip(samples, offsets[:-1], strict=True):
        target[o + sample[-1]: o + len(sample[1])] = True
    requests = np.concatenate([s[5] - s[5][0] for s in samples])
    return JaggedBatch(
        offsets=torch.from_numpy(offsets),
        items=torch.from_numpy(np.concatenate([s[1] for s in samples]).astype(np.int64)),
        actions=torch.from_numpy(np.concatenate([s[2] for s in samples]).astype(np.int64)),
        labels=torch.from_numpy(np.concatenate([s[3] for s in samples]).astype(np.float32)),
        timestamps=torch.from_numpy(np.concatenate([s[4] for s in samples]).astype(np.int64)),
        request_ids=torch.from_numpy(requests.astype(np.int64)),
        target_mask=torch.from_numpy(target),
        users=torch.tensor([s[0] for s in samples], dtype=torch.int64),
        signals=torch.from_numpy(np.concatenate([s[6] if len(s) > 7 else np.asarray(s[3])[:, None]
                                                 for s in samples]).astype(np.float32)),
    )


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches, deterministic given (seed, epoch).

    Training: shuffle, cut into chunks of ``bucket_batches`` batches, sort each chunk by length so a
    batch holds similar lengths (little wasted work in dense backends), then shuffle the batch order.
    Evaluation (``shuffle=False``): batches of similar length in a fixed order.
    ``start_batch`` skips the first batches of the epoch, for resuming mid-epoch.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                 bucket_batches: int = 32):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_batches = bucket_batches
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            return [order[i: i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        chunk = self.batch_size * self.bucket_batches
        batches = []
        for c in range(0, n, chunk):
            part = order[c: c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i: i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self):
        yield from self.batches()[self.start_batch:]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size) - self.start_batch


def collate_prepared(samples: list[tuple], prepare: Callable[[JaggedBatch], Any]) -> JaggedBatch:
    """:func:`collate`, then ``prepare(batch)`` as the batch's :attr:`JaggedBatch.known_layout`: in a
    loader worker, so the step does not build it."""
    batch = collate(samples)
    batch.known_layout = prepare(batch)
    return batch


def batch_collate(prepare: Callable[[JaggedBatch], Any] | None = None) -> Callable[[list[tuple]], JaggedBatch]:
    """The loaders' collate function: :func:`collate`, with ``prepare`` (a picklable
    :class:`genrec.nn.prepared.LayoutPlan`) run on each batch where given."""
    return collate if prepare is None else partial(collate_prepared, prepare=prepare)


def make_loader(dataset: WindowDataset, batch_size: int, *, shuffle: bool, seed: int = 0, num_workers: int = 0,
                prepare: Callable[[JaggedBatch], Any] | None = None, pin_memory: bool = False) -> DataLoader:
    """``pin_memory``: batches in page-locked memory (:meth:`JaggedBatch.pin_memory`), for a GPU step."""
    sampler = BucketBatchSampler(dataset.lengths(), batch_size, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=batch_collate(prepare), num_workers=num_workers,
                      persistent_workers=False, pin_memory=pin_memory)
