"""The service's work, independent of HTTP: rank candidates, append events, recommend, over a user store.

Requests are validated against the model's id spaces (:class:`Catalogue`) before they are queued, so a
malformed request never reaches a batch. The handlers run on the one scoring thread (they are the
:class:`~genrec.serve.batching.DynamicBatcher`'s handlers) and return one result or
:class:`ServiceError` per job. A batch that fails as a whole is retried one job at a time, so one bad
job fails alone; the store changes only after the work for a job succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from genrec.data.preprocess import Sequences
from genrec.models.base import RecModel
from genrec.nn import kv_cache
from genrec.ops.layout import TIME_LIMIT_S, time_spans_checked_on_host
from genrec.serve.graphs import BucketedGraphs
from genrec.serve.journal import Journal, journal_path, prune, replayable
from genrec.serve.metrics import ServiceMetrics
from genrec.serve.recommend import top_items
from genrec.serve.scoring import Scorer
from genrec.serve.store import History, StoreView, UserStore, save_histories, snapshot_generation

log = logging.getLogger("genrec.serve")


class ServiceError(Exception):
    """A request the service refuses: HTTP ``status``, the request ``field`` at fault, a message."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


@dataclass
class Catalogue:
    """The id spaces of a trained model: raw item ids, action values (ratings), the label rule and the
    dataset's users (those with a dense index, which models with a user embedding read)."""

    item_raw: list[str]  # item_raw[i - 1] is dense item i
    action_values: list[float]  # the dataset's sorted rating values; action class = index
    label_threshold: float  # label = action value > threshold
    request_window_s: int
    user_raw: list[str] = field(default_factory=list)  # user_raw[u] is dense user u

    def __post_init__(self):
        self.item_index = {raw: i for i, raw in enumerate(self.item_raw, start=1)}
        self.action_index = {v: i for i, v in enumerate(self.action_values)}
        self.user_index = {raw: u for u, raw in enumerate(self.user_raw)}

    def items(self, raw_ids: Sequence[str], field: str, suffix: str = "") -> np.ndarray:
        """Dense ids of ``raw_ids``; an unknown one is refused as ``{field}[j]{suffix}``."""
        get = self.item_index.get
        dense = [get(raw, 0) for raw in raw_ids]  # dense ids start at 1: 0 marks an unknown one
        if 0 in dense:
            j = dense.index(0)
            raise ServiceError(422, f"{field}[{j}]{suffix}",
                               f"unknown item id {raw_ids[j]!r} ({len(self.item_raw)} items known)")
        return np.array(dense, dtype=np.int64)

    def history(self, events: Sequence, field: str) -> History:
        """``events`` (``.item``, ``.action``, ``.time``) -> a :class:`History`; times must not decrease."""
        items = self.items([e.item for e in events], field, ".item")
        for j, e in enumerate(events):
            if e.action not in self.action_index:
                raise ServiceError(422, f"{field}[{j}].action",
                                   f"unknown action {e.action!r}; the model knows {self.action_values}")
            if j and e.time < events[j - 1].time:
                raise ServiceError(422, f"{field}[{j}].time", f"time {e.time} is before the previous event's "
                                   f"{events[j - 1].time}: events must be in time order")
        actions = [self.action_index[e.action] for e in events]
        labels = [float(e.action > self.label_threshold) for e in events]
        return History.build(items, actions, labels, [e.time for e in events], self.request_window_s)


def dataset_seed(seq: Sequences, index: dict[str, int], max_events: int, request_window_s: int):
    """The store's seed: a dataset user's latest ``max_events`` events, with its dense index (``index``:
    raw user id -> dense, :attr:`Catalogue.user_index`) and every item of its whole dataset history as
    seen (None for other users)."""

    def seed(user: str) -> History | None:
        if user not in index:
            return None
        u = index[user]
        first, e = int(seq.user_offsets[u]), int(seq.user_offsets[u + 1])
        s = max(first, e - max_events)
        return History.build(seq.items[s:e], seq.actions[s:e], seq.labels[s:e], seq.timestamps[s:e], request_window_s,
                             u, np.unique(seq.items[first:e]))

    return seed


@dataclass
class RankJob:
    user: str | None
    candidates: np.ndarray  # [M] dense item ids
    request_time: int | None
    history: History | None  # inline (stateless) history, or None: the store's


@dataclass
class EventsJob:
    user: str
    events: History


@dataclass
class RecommendJob:
    user: str | None
    history: History | None
    k: int
    include_seen: bool


def check_times(timestamps: np.ndarray, field: str) -> None:
    """Times the kernels can take: every timestamp in ``[0, 2^31)`` s (1970 to 2038), so no batch of
    them, with its padding's 0, spans 2^31 s. Checked here on the request's numpy arrays, so the model
    does not read the span back from the device on every call (:func:`time_spans_checked_on_host`)."""
    if len(timestamps) and (timestamps.min() < 0 or timestamps.max() >= TIME_LIMIT_S):
        bad = int(timestamps.min() if timestamps.min() < 0 else timestamps.max())
        raise ServiceError(422, field, f"time {bad} is outside 0 .. 2^31 - 1 s, the times the model's kernels take")


class Engine:
    def __init__(self, model: RecModel, catalogue: Catalogue, store: UserStore, device: torch.device,
                 max_history: int, model_name: str = "", graphs: BucketedGraphs | None = None):
        self.model, self.catalogue, self.store, self.device = model.eval(), catalogue, store, device
        self.max_history = max_history
        self.model_name = model_name or type(model).__name__.lower()
        self.scorer = Scorer(model, device, catalogue.label_threshold, graphs) if Scorer.can_score(model) else None
        self.metrics = ServiceMetrics(device)
        self.journal: Journal | None = None  # set by restore(): appends are journaled before they are applied
        self.state_file: Path | None = None  # set by restore()
        self.snapshot_every = 0  # appends between snapshots (0: only at start and shutdown); set by restore()
        self.snapshot_due = 0  # the current journal's append count that calls for the next periodic snapshot
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="genrec-snapshot")  # periodic snapshots' writes
        self.writing: Future | None = None  # the periodic snapshot being written, if any
        self.handlers = {"rank": self.rank, "events": self.append_events, "recommend": self.recommend,
                         "history": self.user_history}

    # ----------------------------------------------------------------------------------- helpers
    def _history_of(self, user: str | None, inline: History | None, field: str = "user") -> History:
        """The history a request is scored on: the inline one (as the request's dataset user, if it
        names one) or the store's. Refused for a model that reads user ids if it has no dataset user:
        the training data gives dense indices ``0 .. U-1`` to its users and none to anyone else (no OOV
        row in the user tables; offline ``genrec recommend`` refuses such a user too), so such a user is
        refused (422) rather than scored as some dataset user (:attr:`RecModel.reads_user_ids`)."""
        if inline is not None:
            history = replace(inline, user=self.catalogue.user_index.get(user))
        else:
            state = self.store.get(user)
            if state is None:
                raise ServiceError(404, field, f"user {user!r} has no history here: send it inline or POST /events")
            history = state.history
        if self.model.reads_user_ids and history.user is None:
            who = "an inline history without a dataset user" if user is None else f"user {user!r}"
            raise ServiceError(422, "user", f"{self.model_name} reads a trained user embedding, and {who} has none "
                               "(not in the training data); models without one (HSTU, DFGR, SASRec, ...) serve it")
        return history

    def _update_gauges(self) -> None:
        self.metrics.cache_bytes.set(self.store.cache_bytes)
        self.metrics.users.set(len(self.store))
        self.metrics.cached_users.set(self.store.cached_users())

    @staticmethod
    def _guarded(work, what: str):
        """``work()``, or the error it raised as a :class:`ServiceError` (500 for an unexpected one)."""
        try:
            return work()
        except ServiceError as err:
            return err
        except Exception as err:  # noqa: BLE001 - the request fails, the service keeps serving
            log.exception("%s failed", what)
            return ServiceError(500, "", f"{what} failed: {type(err).__name__}: {err}")

    def _batched(self, rows: list[tuple], work, what: str) -> list:
        """``work(*columns)`` over ``rows`` (one tuple of ``work``'s arguments per job; one result per
        job) as one call; if it raises, each job is rerun alone, so the job that broke the batch fails
        alone and the others get what they would get alone."""
        def run(part: list[tuple]) -> list:
            return work(*(list(column) for column in zip(*part, strict=True)))

        if not rows:
            return []
        results = self._guarded(lambda: run(rows), what)
        if not isinstance(results, ServiceError):
            return results
        return [results] if len(rows) == 1 else [self._guarded(lambda r=r: run([r])[0], what) for r in rows]

    # -------------------------------------------------------------------------------------- rank
    def rank(self, jobs: list[RankJob]) -> list:
        if self.scorer is None:
            return [ServiceError(400, "", f"model {self.model_name} does not rank; use /recommend")] * len(jobs)
        results: list = [None] * len(jobs)
        live = []  # (job index, job, history, request time)
        for i, job in enumerate(jobs):
            try:
                history = self._history_of(job.user, job.history)
                when = int(history.timestamps[-1]) if job.request_time is None else job.request_time
                if when < history.timestamps[-1]:
                    raise ServiceError(422, "request_time", f"request_time {when} is before the history's last event "
                                       f"({int(history.timestamps[-1])})")
                check_times(history.timestamps, "user" if job.history is None else "history")
                check_times(np.array([when]), "request_time")
                live.append((i, job, history, when))
            except ServiceError as err:
                results[i] = err
        with time_spans_checked_on_host():
            scores = self._batched([item[1:] for item in live], self._score, "scoring")
        for (i, _, history, _), result in zip(live, scores, strict=True):
            results[i] = result if isinstance(result, ServiceError) else {
                "scores": result, "history_events": len(history)}
        self._update_gauges()
        return results

    def _score(self, jobs: list[RankJob], histories: list[History], when: list[int]) -> list[np.ndarray]:
        """Scores of each job. Candidates, cache hits and misses are counted once the scores exist: a
        batch that fails is rerun job by job (:meth:`_batched`), which counts them."""
        candidates = [job.candidates for job in jobs]
        if self.scorer.cached:
            out, hits, misses = self._score_with_caches(jobs, histories, candidates, when)
        else:
            out, hits, misses = self.scorer.score(histories, candidates, when), 0, 0
        self.metrics.candidates.inc(sum(len(c) for c in candidates))
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(misses)
        return out

    def _score_with_caches(self, jobs: list[RankJob], histories: list[History], candidates: list[np.ndarray],
                           when: list[int]) -> tuple[list[np.ndarray], int, int]:
        """Users with a cache are scored against it (one stacked call); stored users without one are
        encoded together and their caches kept; the rest (inline histories, or no cache budget) are
        scored cold in one call. Returns the scores and the stored users' cache hits and misses."""
        states = [None if job.history is not None else self.store.get(job.user) for job in jobs]
        caches = [None if state is None else state.cache for state in states]
        missed = [k for k, state in enumerate(states) if state is not None and state.cache is None]
        keep = missed if self.store.budget > 0 else []  # jobs whose new cache the store keeps
        for k, cache in zip(keep, self.scorer.encode([histories[k] for k in keep]) if keep else [], strict=True):
            caches[k] = cache
            evicted = self.store.put_cache(jobs[k].user, cache, kv_cache.nbytes(cache))
            self.metrics.cache_evictions.inc(len(evicted))
        out: list = [None] * len(jobs)
        warm = [k for k in range(len(jobs)) if caches[k] is not None]
        if warm:
            scores = self.scorer.score_cached([caches[k] for k in warm], [candidates[k] for k in warm],
                                              [when[k] for k in warm])
            for k, score in zip(warm, scores, strict=True):
                out[k] = score
        cold = [k for k in range(len(jobs)) if caches[k] is None]
        if cold:
            scores = self.scorer.score([histories[k] for k in cold], [candidates[k] for k in cold],
                                       [when[k] for k in cold])
            for k, score in zip(cold, scores, strict=True):
                out[k] = score
        stored = sum(state is not None for state in states)
        return out, stored - len(missed), len(missed)

    # ------------------------------------------------------------------------------------ events
    def append_events(self, jobs: list[EventsJob]) -> list:
        with time_spans_checked_on_host():  # _append checks the times before it extends a cache
            results = [self._guarded(lambda job=job: self._append(job), "append") for job in jobs]
        if self.journal is not None and (self.journal.broken or (
                self.snapshot_every and self.journal.appends >= self.snapshot_due)):
            self._periodic_snapshot()
        self._update_gauges()
        return results

    def _periodic_snapshot(self) -> None:
        """A snapshot after ``snapshot_every`` appends, or to replace a journal that refuses appends,
        written in the background (:meth:`snapshot`). While one is being written the next waits (the
        next batch tries again). Its failure does not touch the batch's replies (their appends are on
        disk already): it is logged and counted, and tried again after another ``snapshot_every``
        appends (at once, if the journal refuses appends meanwhile)."""
        if self.writing is not None and not self.writing.done():
            return
        try:
            self.snapshot("periodic", background=True)
        except Exception as err:  # noqa: BLE001 - the new journal could not start: the current one goes on
            self._snapshot_failed(err)
            self.snapshot_due = self.journal.appends + self.snapshot_every

    def _snapshot_failed(self, err: BaseException) -> None:
        log.error("%s: periodic snapshot failed (%r); the journals keep its appends, retried after %d more appends",
                  self.state_file, err, self.snapshot_every)
        self.metrics.snapshot_failures.inc()

    def _append(self, job: EventsJob, journaled: bool = True) -> dict:
        """Append ``job``'s events; the journal (if any, and unless ``journaled`` is False: a replay)
        holds them on disk before the store changes."""
        check_times(job.events.timestamps, "events")
        state = self.store.get(job.user)
        window = self.catalogue.request_window_s
        if state is None:
            history, mode = replace(job.events, user=self.catalogue.user_index.get(job.user)), "new"
        else:
            last = int(state.history.timestamps[-1])
            if job.events.timestamps[0] < last:
                raise ServiceError(422, "events[0].time", f"time {int(job.events.timestamps[0])} is before the "
                                   f"user's last stored event ({last}): events must be appended in time order")
            check_times(state.history.timestamps, "user")
            history, mode = state.history.appended(job.events, window), "incremental"
        cache = None
        if len(history) > self.max_history:
            # keep room for a quarter of max_history new events before the next re-encode
            history, mode = history.last(max(1, self.max_history * 3 // 4), window), "window"
            self.metrics.reencodes.labels("window").inc()
        elif mode == "incremental" and self.scorer is not None and self.scorer.cached and state.cache is not None:
            cache = self.scorer.extend(state.cache, history, len(job.events))
        elif mode == "incremental":
            mode = "lazy"  # no cache to extend: the next request encodes the whole history
        if journaled and self.journal is not None:
            self.journal.append(job.user, self._raw_events(job.events))
        evicted = self.store.set_history(job.user, history, cache, kv_cache.nbytes(cache) if cache else 0)
        self.metrics.cache_evictions.inc(len(evicted))
        self.metrics.events_appended.inc(len(job.events))
        return {"user": job.user, "history_events": len(history), "mode": mode}

    # --------------------------------------------------------------------------------- recommend
    def recommend(self, jobs: list[RecommendJob]) -> list:
        """The batch's top-k lists in one retrieval call (and one ranking call for their probabilities)."""
        if "retrieval" not in self.model.tasks:
            message = f"model {self.model_name} does not retrieve (tasks: {self.model.tasks})"
            return [ServiceError(400, "", message)] * len(jobs)
        results: list = [None] * len(jobs)
        live = []  # (job index, job, history)
        for i, job in enumerate(jobs):
            try:
                history = self._history_of(job.user, job.history)
                check_times(history.timestamps, "user" if job.history is None else "history")
                live.append((i, job, history))
            except ServiceError as err:
                results[i] = err
        with time_spans_checked_on_host():
            tops = self._batched([item[1:] for item in live], self._recommend, "recommend")
        for (i, *_), result in zip(live, tops, strict=True):
            results[i] = result
        self._update_gauges()  # the requests may have seeded users into the store
        return results

    def _recommend(self, jobs: list[RecommendJob], histories: list[History]) -> list[dict]:
        """Top-k as offline :func:`~genrec.serve.recommend.recommend`: every seen item left out (not only
        the stored window's), and P(like) conditioned on the latest ``max_len - 1`` events, the events
        the retrieval query reads before its placeholder next event."""
        tops = top_items(self.model, [h.sample() for h in histories], [job.k for job in jobs], self.max_history,
                         self.device, [None if job.include_seen else h.seen for job, h in zip(jobs, histories,
                                                                                                strict=True)])
        out = [{"items": [self.catalogue.item_raw[i - 1] for i in items], "scores": scores} for items, scores in tops]
        ranked = [b for b, (items, _) in enumerate(tops) if items] if self.scorer is not None else []
        if ranked:
            window = self.catalogue.request_window_s
            probs = self.scorer.score([histories[b].last(self.max_history - 1, window) for b in ranked],
                                      [np.asarray(tops[b][0]) for b in ranked],
                                      [int(histories[b].timestamps[-1]) for b in ranked])  # [K_b, T] each
            for b, p in zip(ranked, probs, strict=True):
                out[b]["probabilities"] = {name: p[:, t].tolist() for t, name in enumerate(self.scorer.outputs)}
        return out

    def user_history(self, users: list[str]) -> list:
        out = []
        for user in users:
            state = self.store.get(user)
            if state is None:
                out.append(ServiceError(404, "user", f"user {user!r} has no history here"))
                continue
            out.append({"user": user, "events": self._raw_events(state.history), "cached": state.cache is not None})
        self._update_gauges()  # a dataset user read here is seeded into the store
        return out

    # ---------------------------------------------------------------------------------- snapshot
    def save(self, path: Path, generation: int = 0) -> int:
        return self.store.save(path, self.catalogue.item_raw, self.catalogue.action_values, generation)

    def load(self, path: Path) -> int:
        users = self.store.load(path, self.catalogue.item_index, self.catalogue.action_index,
                                self.catalogue.request_window_s, self.catalogue.user_index)
        self._update_gauges()
        return users

    def restore(self, state_file: Path, snapshot_every: int = 0) -> int:
        """Start from ``state_file``: load the snapshot (if any), replay the appends journaled after it
        (:mod:`genrec.serve.journal`), write them into a new snapshot and journal from there on, with a
        new snapshot after every ``snapshot_every`` appends (0: only at :meth:`snapshot` calls).
        Returns the appends replayed."""
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0 appends, got {snapshot_every}")
        state_file = self.state_file = Path(state_file)
        self.snapshot_every = self.snapshot_due = snapshot_every
        generation = snapshot_generation(state_file) if state_file.is_file() else 0
        if state_file.is_file():
            self.load(state_file)
        latest, appends = replayable(state_file, generation)
        for user, events in appends:
            self._append(EventsJob(user, self.catalogue.history([SimpleNamespace(**e) for e in events], "events")),
                         journaled=False)
        if appends:
            log.warning("%s: replayed %d appends journaled after the last snapshot", state_file, len(appends))
        self.snapshot("start", latest + 1)
        return len(appends)

    def snapshot(self, reason: str = "shutdown", generation: int | None = None, background: bool = False) -> None:
        """Start the journal of the next generation, then write every history as the snapshot of that
        generation and delete the older journals (:mod:`genrec.serve.journal`). Only the switch runs on
        the calling (scoring) thread: it opens a copy-on-write view of the store
        (:meth:`UserStore.open_view`: a copy of the list of users). The write runs there too, or with
        ``background`` on the writer thread, while requests go on (a failure there is logged and
        counted, the journals keep every append); a snapshot written in the background is waited for
        before the next one starts.

        If the new journal cannot start, this raises and the current journal goes on taking appends."""
        if self.state_file is None:
            raise RuntimeError("snapshot() before restore(): the engine has no state file")
        self.wait_for_snapshot()
        generation = (self.journal.generation + 1) if generation is None else generation
        journal = Journal(journal_path(self.state_file, generation), generation)
        old, self.journal, self.snapshot_due = self.journal, journal, self.snapshot_every
        if old is not None:
            self._close(old)
        view = self.store.open_view()
        if background:
            try:
                self.writing = self.writer.submit(self._write_in_background, view, generation, reason)
            except BaseException:
                self.store.close_view(view)
                raise
        else:
            self._write(view, generation, reason)

    def _write(self, view: StoreView, generation: int, reason: str) -> None:
        start = time.perf_counter()
        try:
            histories = view.histories()
        finally:
            self.store.close_view(view)
        save_histories(self.state_file, view.users, histories, self.store.seed, self.catalogue.item_raw,
                       self.catalogue.action_values, generation)
        self.metrics.snapshots.labels(reason).inc()  # on disk: the older journals are no longer needed
        try:
            prune(self.state_file, below=generation)
        except ValueError as err:  # a file named as a journal without a valid header: the snapshot stands
            log.warning("%s: the snapshot of generation %d is written, but the older journals were not deleted "
                        "(%s); the next start refuses that file until it is repaired or removed",
                        self.state_file, generation, err)
        self.metrics.snapshot_seconds.set(time.perf_counter() - start)

    def _write_in_background(self, view: StoreView, generation: int, reason: str) -> None:
        try:
            self._write(view, generation, reason)
        except Exception as err:  # noqa: BLE001 - nothing is lost: the journals hold every append
            self._snapshot_failed(err)

    def wait_for_snapshot(self) -> None:
        """Return once no snapshot is being written in the background."""
        if self.writing is not None:
            self.writing.result()
            self.writing = None

    @staticmethod
    def _close(journal: Journal) -> None:
        """Close a journal that is no longer in use; a failure is logged (its lines are on disk)."""
        try:
            journal.close()
        except OSError as err:
            log.warning("%s: closing the journal failed (%r)", journal.path, err)

    def close(self) -> None:
        """Wait for a snapshot being written, stop the writer thread, close the journal."""
        self.wait_for_snapshot()
        self.writer.shutdown()
        journal, self.journal = self.journal, None
        if journal is not None:
            self._close(journal)

    def _raw_events(self, events: History) -> list[dict]:
        """``events`` in raw ids, as a request sends them (what the journal holds and a history read shows)."""
        return [{"item": self.catalogue.item_raw[i - 1], "action": self.catalogue.action_values[a], "time": int(t)}
                for i, a, t in zip(events.items, events.actions, events.timestamps, strict=True)]


def build_engine(model: RecModel, seq: Sequences, label_threshold: float, request_window_s: int, max_len: int,
                 device: torch.device, cache_bytes: int, model_name: str = "",
                 cuda_graphs: tuple[int, int] | None = None) -> Engine:
    """An engine over a trained model and its dataset: the dataset's users start from their latest
    ``max_len`` events. ``cuda_graphs = (max_batch, max_candidates)`` replays cold scoring as CUDA
    graphs (HSTU, DFGR on a CUDA device)."""
    catalogue = Catalogue(seq.item_raw, seq.rating_values, label_threshold, request_window_s, list(seq.user_raw))
    store = UserStore(cache_bytes, dataset_seed(seq, catalogue.user_index, max_len, request_window_s))
    graphs = None
    if cuda_graphs is not None:
        if device.type != "cuda" or model.kv_serving is None:
            raise ValueError(f"CUDA graphs need HSTU or DFGR on a CUDA device, not {model_name} on {device}")
        graphs = BucketedGraphs(model.eval(), cuda_graphs[0], max_len, cuda_graphs[1])
    return Engine(model, catalogue, store, device, max_len, model_name, graphs)
