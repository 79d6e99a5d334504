"""Dynamic batching: concurrent jobs of one kind share a call, batches respect the size cap, kinds keep
their arrival order, and a job's failure stays with that job."""

from __future__ import annotations

import asyncio
import time

import pytest

from genrec.serve.batching import DynamicBatcher


def _run(handlers, jobs, **kwargs):
    calls = []

    async def main():
        wrapped = {kind: (lambda payloads, kind=kind: calls.append((kind, list(payloads))) or handlers[kind](payloads))
                   for kind in handlers}
        batcher = DynamicBatcher(wrapped, **kwargs)
        batcher.start()
        try:
            return await asyncio.gather(*(batcher.submit(kind, p) for kind, p in jobs), return_exceptions=True)
        finally:
            await batcher.stop()

    return asyncio.run(main()), calls


def test_concurrent_jobs_are_grouped_up_to_the_batch_size():
    results, calls = _run({"rank": lambda xs: [x * 10 for x in xs]}, [("rank", i) for i in range(10)],
                          max_batch=4, max_wait_us=20_000)
    assert results == [i * 10 for i in range(10)]
    assert [len(p) for _, p in calls] == [4, 4, 2]


def test_no_wait_takes_only_what_is_already_queued():
    results, calls = _run({"rank": lambda xs: xs}, [("rank", i) for i in range(3)], max_batch=8, max_wait_us=0)
    assert results == [0, 1, 2] and sum(len(p) for _, p in calls) == 3


def test_another_kind_closes_the_batch_so_jobs_run_in_arrival_order():
    jobs = [("rank", 1), ("rank", 2), ("events", "e"), ("rank", 3)]
    results, calls = _run({"rank": list, "events": list}, jobs, max_batch=8, max_wait_us=20_000)
    assert results == [1, 2, "e", 3]
    assert calls == [("rank", [1, 2]), ("events", ["e"]), ("rank", [3])]


def test_a_failing_job_fails_alone_and_a_failing_handler_fails_its_batch_only():
    def rank(xs):
        if "boom" in xs:
            raise RuntimeError("handler broke")
        return [ValueError(f"bad {x}") if x < 0 else x for x in xs]

    results, calls = _run({"rank": rank}, [("rank", 1), ("rank", -2), ("rank", 3)], max_batch=8, max_wait_us=20_000)
    assert len(calls) == 1 and results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and "bad -2" in str(results[1])
    results, calls = _run({"rank": rank}, [("rank", "boom"), ("rank", 5)], max_batch=1, max_wait_us=0)
    assert isinstance(results[0], RuntimeError) and results[1] == 5


def test_each_batch_is_reported_with_its_kind_size_and_handler_time():
    seen = []

    def slow(xs):
        time.sleep(0.02)
        return xs

    results, _ = _run({"rank": slow, "events": list}, [("rank", 1), ("rank", 2), ("events", 3)], max_batch=8,
                      max_wait_us=20_000, on_batch=lambda kind, size, seconds: seen.append((kind, size, seconds)))
    assert results == [1, 2, 3] and [(k, n) for k, n, _ in seen] == [("rank", 2), ("events", 1)]
    assert 0.02 <= seen[0][2] < 1 and seen[1][2] < 0.02  # the handler's own time, not the batching wait


def test_a_wait_shorter_than_the_loop_timer_is_not_overslept():
    """asyncio's selector sleeps in whole milliseconds: a 500 us timed wait took over 1 ms."""
    async def main():
        handed = []
        batcher = DynamicBatcher({"rank": lambda xs: handed.append(time.perf_counter()) or xs}, max_wait_us=500)
        batcher.start()
        waits = []
        try:
            for i in range(21):  # lone jobs: each waits the whole max_wait for company
                start = time.perf_counter()
                await batcher.submit("rank", i)
                waits.append(handed[-1] - start)
        finally:
            await batcher.stop()
        return sorted(waits)[10]

    assert 0.0005 <= asyncio.run(main()) < 0.00095  # the median wait: max_wait, not a whole timer tick


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max batch"):
        DynamicBatcher({}, max_batch=0)
    with pytest.raises(ValueError, match="max wait"):
        DynamicBatcher({}, max_wait_us=-1)
