"""Dynamic batching: concurrent requests of one kind are grouped into one call on one worker thread.

Requests arrive on the event loop (one coroutine each); the model runs on a single worker thread so
the loop stays free to accept requests while a batch is scored. The loop takes the first waiting job,
then gathers more of the same kind until ``max_batch`` jobs are in hand or ``max_wait_us`` has passed
since the first, and hands the batch to its kind's handler. Jobs of another kind close the batch and
run next, so jobs are handled in arrival order (an ``/events`` append is seen by every later ``/rank``).

A handler returns one result per job, in order; a result that is an exception fails that job only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

Handler = Callable[[list[Any]], Sequence[Any]]


@dataclass
class _Job:
    kind: str
    payload: Any
    future: asyncio.Future


# asyncio's selector loops sleep in whole milliseconds (epoll_wait's resolution, rounded up), so a
# 500 us timed wait took over 1 ms: waits shorter than this are polled instead (asyncio.sleep(0), one
# loop pass, which reads the sockets that are ready and so queues the requests that arrived).
_TIMER_RESOLUTION_S = 1e-3
log = logging.getLogger(__name__)
_STOP = _Job("stop", None, None)  # queued by :meth:`DynamicBatcher.stop` after the last job


class DynamicBatcher:
    def __init__(self, handlers: dict[str, Handler], max_batch: int = 32, max_wait_us: int = 500,
                 on_batch: Callable[[str, int, float], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max batch size must be >= 1, got {max_batch}")
        if max_wait_us < 0:
            raise ValueError(f"max wait must be >= 0 us, got {max_wait_us}")
        self.handlers = handlers
        self.max_batch = max_batch
        self.max_wait_s = max_wait_us / 1e6
        self.on_batch = on_batch or (lambda kind, size, seconds: None)  # after each batch: its kind, size, time
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genrec-scoring")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish the jobs already queued, then stop the loop and the worker thread."""
        if self.task is not None:
            await self.queue.put(_STOP)
            await self.task
            self.task = None
        self.worker.shutdown(wait=True)

    async def submit(self, kind: str, payload: Any) -> Any:
        if kind not in self.handlers:
            raise KeyError(f"no handler for {kind!r}")
        if self.task is None:
            raise RuntimeError("the batcher is not running")
        job = _Job(kind, payload, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _gather(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and the jobs of its kind that arrive within the wait; the job of another kind
        (or the stop signal) that closed the batch, if one did."""
        batch = [first]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                if left < _TIMER_RESOLUTION_S:  # a timer would oversleep: poll the loop to the deadline
                    await asyncio.sleep(0)
                    continue
                try:  # whole timer ticks only; the rest of the wait is polled
                    job = await asyncio.wait_for(self.queue.get(), left // _TIMER_RESOLUTION_S * _TIMER_RESOLUTION_S)
                except TimeoutError:
                    continue
            if job.kind != first.kind:
                return batch, job
            batch.append(job)
        return batch, None

    @staticmethod
    def _timed(handler: Handler, payloads: list[Any]) -> tuple[Sequence[Any], float]:
        """The handler's results and its time on the worker thread (not counting the hand-over)."""
        start = time.perf_counter()
        results = handler(payloads)
        return results, time.perf_counter() - start

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carried: _Job | None = None
        while True:
            first = carried if carried is not None else await self.queue.get()
            carried = None
            if first is _STOP:
                return
            batch, closing = await self._gather(first)
            carried = closing
            start = time.perf_counter()
            try:
                results, seconds = await loop.run_in_executor(self.worker, self._timed, self.handlers[first.kind],
                                                              [job.payload for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"handler {first.kind!r} returned {len(results)} results for {len(batch)} jobs")
            except Exception as err:  # the handler itself failed: every job of the batch gets the error
                results, seconds = [err] * len(batch), time.perf_counter() - start
            try:  # a failing observer (metrics) must not stop the batcher: every later job would wait forever
                self.on_batch(first.kind, len(batch), seconds)
            except Exception:
                log.exception("the batch observer failed")
            for job, result in zip(batch, results, strict=True):
                if job.future.cancelled():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
