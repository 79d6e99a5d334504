"""Prometheus metrics of one service instance (its own registry: two services in one process, as in
the tests, never share counters)."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self, device: torch.device):
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # resident memory, CPU seconds, open files (Linux /proc)
        self.requests = Counter("genrec_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("genrec_request_latency_seconds", "Time from request received to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("genrec_batch_size", "Jobs per scoring call", ["kind"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("genrec_batch_seconds", "Time the scoring thread spent on one batch (the rest "
                                       "of a request's latency is HTTP, validation, queueing and batching)", ["kind"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = Counter("genrec_candidates_scored", "Candidates scored", registry=r)
        self.cache_hits = Counter("genrec_cache_hits", "Rank requests that found the user's KV cache", registry=r)
        self.cache_misses = Counter("genrec_cache_misses", "Rank requests that encoded a stored user's history",
                                    registry=r)
        self.cache_evictions = Counter("genrec_cache_evictions", "KV caches evicted to stay under the byte budget",
                                       registry=r)
        self.events_appended = Counter("genrec_events_appended", "Events appended through /events", registry=r)
        self.reencodes = Counter("genrec_history_reencodes", "Appends that re-encode instead of extending",
                                 ["reason"], registry=r)
        self.reencodes.labels("window")  # exported at 0 from the start
        self.snapshots = Counter("genrec_snapshots", "State-file snapshots written (the journal compacted)",
                                 ["reason"], registry=r)
        for reason in ("start", "periodic", "shutdown"):
            self.snapshots.labels(reason)
        self.snapshot_failures = Counter("genrec_snapshot_failures", "Periodic snapshots that failed (the journals "
                                         "keep every append)", registry=r)
        self.snapshot_seconds = Gauge("genrec_snapshot_seconds", "Time the last snapshot took to write (in the "
                                      "background for a periodic one)", registry=r)
        self.cache_bytes = Gauge("genrec_cache_bytes", "Bytes held by per-user KV caches", registry=r)
        self.users = Gauge("genrec_users", "Users in the store", registry=r)
        self.cached_users = Gauge("genrec_cached_users", "Users whose KV cache is held", registry=r)
        if device.type == "cuda":
            gpu = Gauge("genrec_gpu_memory_allocated_bytes", "GPU memory allocated by tensors", registry=r)
            gpu.set_function(lambda: torch.cuda.memory_allocated(device))
            peak = Gauge("genrec_gpu_memory_peak_bytes", "Peak GPU memory allocated by tensors", registry=r)
            peak.set_function(lambda: torch.cuda.max_memory_allocated(device))

    def observe_batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)
        self.batch_seconds.labels(kind).observe(seconds)
