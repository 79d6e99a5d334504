"""Synthetic multi-signal event logs with a known latent model, for scale, throughput and memory tests.

Every file this module writes is labelled synthetic (``synthetic.json`` beside the Parquet parts,
and a ``synthetic`` key in the Parquet metadata); a synthetic log is never a quality claim.

The generator is a planted model, so that a yardstick can compare a model with the Bayes optimum:

* items have Zipf popularity ``p(i) ∝ rank(i)^-zipf`` (which item is popular is a random permutation);
* users and items have latent vectors ``u ~ N(0, I/k)``, ``v ~ N(0, I)`` in ``R^k``; the affinity of
  a pair is ``z = u·v`` (about unit variance);
* signal ``s`` of an impression is Bernoulli with ``P(s = 1 | u, i) = sigmoid(weight[s]·z + bias[s])``,
  independently across signals given ``z`` (so all signals are correlated through the affinity);
* each user's history length is heavy tailed (log-normal, ``length_sigma``), at least ``min_length``;
  a history is cut into requests of geometric size (mean ``request_size``) whose impressions share
  a timestamp and a request id; gaps between requests are exponential (``mean_gap_s``).

:meth:`LatentModel.probabilities` gives the exact ``P(signal | user, item)`` of any pair, from the
``latent.npz`` saved beside the log.

With ``topics > 0`` the items of a history follow a planted *sequential* model instead of independent
Zipf draws, so that what a sequential recommender can learn is known exactly (the planted-structure
yardstick, :mod:`genrec.eval.planted`):

* each user has a hidden topic ``c`` (uniform over ``topics``); the user's vector is the topic's
  centroid ``u = mu[c]``, so the signals too depend on the user only through the topic;
* each item has a home topic; topic ``c`` draws item ``j`` with ``P_c(j) ∝ pop(j)·affinity^[home(j)=c]``;
* each item has ``successors`` follow-up items (Dirichlet(1) weights): item-to-item transitions;
* the first item is drawn from ``P_c``; item ``t + 1`` is a successor of item ``t`` with probability
  ``transition``, else a fresh draw from ``P_c``;
* every event is its own request, one second or more after the previous one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_SIGNALS = ("click", "like", "follow", "share", "comment", "long_view", "forward", "hate")


@dataclass(frozen=True)
class SynthConfig:
    users: int = 1000
    events: int = 100_000
    items: int | None = None  # default: max(100, events // 100)
    signals: tuple[str, ...] = ("click", "like", "follow")
    latent_dim: int = 8
    zipf: float = 1.1  # item popularity exponent
    length_sigma: float = 1.0  # log-normal sigma of history lengths (heavier tail when larger)
    min_length: int = 3
    request_size: float = 4.0  # mean impressions per request
    mean_gap_s: float = 3600.0  # mean seconds between a user's requests
    start_time: int = 1_700_000_000
    span_s: int = 30 * 86400  # users start uniformly within this span
    seed: int = 0
    part_events: int = 4_000_000  # events per Parquet part (bounds the generator's memory)
    # base rates: bias[s] = logit(base_rate[s]) (cycled when there are more signals)
    base_rates: tuple[float, ...] = (0.3, 0.05, 0.01, 0.02, 0.01, 0.2, 0.01, 0.005)
    weights: tuple[float, ...] = (1.5, 1.2, 1.0, 1.0, 0.8, 1.2, 1.0, -1.0)
    # the planted sequential model (0 topics: items drawn independently from the Zipf popularity)
    topics: int = 0  # hidden user topics; > 0 plants topics and item-to-item transitions
    topic_affinity: float = 20.0  # how much more a topic draws its own items
    transition: float = 0.5  # probability that the next item is a successor of the previous one
    successors: int = 3  # follow-up items per item

    @property
    def num_items(self) -> int:
        return self.items if self.items is not None else max(100, self.events // 100)


@dataclass
class LatentModel:
    """The planted model of a synthetic log: what a perfect model could know."""

    user_vectors: np.ndarray  # [U, k] float32, row = user_id
    item_vectors: np.ndarray  # [I, k] float32, row = item_id
    weights: np.ndarray  # [S]
    biases: np.ndarray  # [S]
    signals: list[str] = field(default_factory=list)
    # the planted sequential model (SynthConfig.topics > 0); None with independent item draws
    user_topics: np.ndarray | None = None  # [U] int64, row = user_id
    topic_vectors: np.ndarray | None = None  # [K, k] float32: every user of topic c has vector topic_vectors[c]
    topic_item_probs: np.ndarray | None = None  # [K, I] float64, P_c(item), rows sum to 1
    successor_items: np.ndarray | None = None  # [I, S] int64, follow-up items of each item
    successor_probs: np.ndarray | None = None  # [I, S] float64, rows sum to 1
    transition: float = 0.0  # P(the next item is a successor of the previous one)

    @property
    def sequential(self) -> bool:
        return self.user_topics is not None

    def next_item_probs(self, topic_probs: np.ndarray, previous: np.ndarray | None) -> np.ndarray:
        """``P(next item | previous item)`` ``[N, I]`` under topic distributions ``topic_probs`` ``[N, K]``
        (a one-hot row: a known topic) and raw previous items ``[N]`` (None: the first item of a
        history). The successor part does not depend on the topic, so the topics mix first."""
        probs = topic_probs @ self.topic_item_probs  # [N, I]
        if previous is None:
            return probs
        probs *= 1.0 - self.transition
        rows = np.arange(len(probs))[:, None]
        np.add.at(probs, (rows, self.successor_items[previous]), self.transition * self.successor_probs[previous])
        return probs

    def probabilities(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Exact ``P(signal = 1 | user, item)`` ``[N, S]`` for raw ``user_id`` / ``item_id`` arrays ``[N]``."""
        z = np.einsum("nk,nk->n", self.user_vectors[users], self.item_vectors[items])  # [N]
        return 1.0 / (1.0 + np.exp(-(z[:, None] * self.weights[None, :] + self.biases[None, :])))

    def save(self, path: Path) -> None:
        planted = {} if not self.sequential else {
            "user_topics": self.user_topics, "topic_vectors": self.topic_vectors,
            "topic_item_probs": self.topic_item_probs,
            "successor_items": self.successor_items, "successor_probs": self.successor_probs,
            "transition": np.float64(self.transition)}
        np.savez(path, user_vectors=self.user_vectors, item_vectors=self.item_vectors, weights=self.weights,
                 biases=self.biases, signals=np.array(self.signals), **planted)

    @classmethod
    def load(cls, path: str | Path) -> LatentModel:
        z = np.load(path)
        planted = {} if "user_topics" not in z else {
            "user_topics": z["user_topics"], "topic_vectors": z["topic_vectors"],
            "topic_item_probs": z["topic_item_probs"],
            "successor_items": z["successor_items"], "successor_probs": z["successor_probs"],
            "transition": float(z["transition"])}
        return cls(z["user_vectors"], z["item_vectors"], z["weights"], z["biases"], [str(s) for s in z["signals"]],
                   **planted)


def _lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed per-user history lengths ``[U]`` summing to exactly ``cfg.events``."""
    if cfg.events < cfg.users * cfg.min_length:
        raise ValueError(f"--events {cfg.events} is fewer than users x min_length = {cfg.users * cfg.min_length}")
    weight = rng.lognormal(0.0, cfg.length_sigma, cfg.users)
    extra = cfg.events - cfg.users * cfg.min_length
    share = np.floor(weight / weight.sum() * extra).astype(np.int64)
    share[rng.choice(cfg.users, extra - int(share.sum()), replace=False)] += 1  # hand out the rounding rest
    return share + cfg.min_length


def latent_model(cfg: SynthConfig, popularity: np.ndarray | None = None) -> LatentModel:
    """The planted model; ``popularity`` ``[I]`` (item id order) is what the topics' item draws build on."""
    rng = np.random.default_rng([cfg.seed, 1])
    k = cfg.latent_dim
    s = len(cfg.signals)
    rates = np.resize(np.asarray(cfg.base_rates, dtype=np.float64), s)
    model = LatentModel(
        user_vectors=(rng.standard_normal((cfg.users, k)) / np.sqrt(k)).astype(np.float32),
        item_vectors=rng.standard_normal((cfg.num_items, k)).astype(np.float32),
        weights=np.resize(np.asarray(cfg.weights, dtype=np.float64), s),
        biases=np.log(rates / (1 - rates)),
        signals=list(cfg.signals),
    )
    if cfg.topics:
        plant = np.random.default_rng([cfg.seed, 3])
        centroids = (plant.standard_normal((cfg.topics, k)) / np.sqrt(k)).astype(np.float32)  # [K, k]
        model.user_topics = plant.integers(0, cfg.topics, cfg.users)
        model.topic_vectors = centroids
        model.user_vectors = centroids[model.user_topics]  # [U, k]: a user is its topic
        home = plant.integers(0, cfg.topics, cfg.num_items)  # [I]
        weight = popularity[None, :] * np.where(home[None, :] == np.arange(cfg.topics)[:, None],
                                                cfg.topic_affinity, 1.0)  # [K, I]
        model.topic_item_probs = weight / weight.sum(1, keepdims=True)
        model.successor_items = np.stack([plant.choice(cfg.num_items, cfg.successors, replace=False)
                                          for _ in range(cfg.num_items)])  # [I, S]
        model.successor_probs = plant.dirichlet(np.ones(cfg.successors), cfg.num_items)  # [I, S]
        model.transition = cfg.transition
    return model


def _planted_items(model: LatentModel, users: np.ndarray, lengths: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """Items ``[n]`` of ``users``' histories (user-major, in time order) drawn from the planted chain."""
    starts = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    item = np.zeros(int(starts[-1]), dtype=np.int64)
    topics = model.user_topics[users]
    cdf = np.cumsum(model.topic_item_probs, axis=1)  # [K, I]
    for t in range(int(lengths.max())):
        live = np.flatnonzero(lengths > t)
        at = starts[live] + t
        fresh = np.empty(len(live), dtype=np.int64)
        for c in np.unique(topics[live]):  # a draw from P_c per user
            mine = topics[live] == c
            fresh[mine] = np.minimum(np.searchsorted(cdf[c], rng.random(int(mine.sum()))), cdf.shape[1] - 1)
        if t:
            previous = item[at - 1]
            follow = rng.random(len(live)) < model.transition
            pick = (rng.random(len(live))[:, None] > np.cumsum(model.successor_probs[previous], 1)).sum(1)
            pick = np.minimum(pick, model.successor_items.shape[1] - 1)
            fresh = np.where(follow, model.successor_items[previous, pick], fresh)
        item[at] = fresh
    return item


def _user_chunk(cfg: SynthConfig, model: LatentModel, users: np.ndarray, lengths: np.ndarray,
                popularity_cdf: np.ndarray, item_of_rank: np.ndarray, request_base: int,
                rng: np.random.Generator) -> tuple[pa.Table, int]:
    """Events of ``users`` (their ``lengths``), sorted by time as a log would be; the next request id."""
    n = int(lengths.sum())
    user = np.repeat(users, lengths)  # [n]
    starts = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # requests: each event opens a new request with probability 1 / request_size (geometric sizes),
    # a user's first event always does
    boundary = rng.random(n) < 1.0 / max(cfg.request_size, 1.0)
    boundary[starts[:-1]] = True
    if model.sequential:  # one event per request, in a strict order of time
        boundary[:] = True
    request = np.cumsum(boundary) - 1 + request_base  # [n] globally unique ids
    gaps = np.where(boundary, rng.exponential(cfg.mean_gap_s, n), 0.0)
    if model.sequential:
        gaps = np.ceil(gaps)
    gaps[starts[:-1]] = 0.0
    t0 = cfg.start_time + rng.integers(0, cfg.span_s, len(users))
    user_gap_sum = np.cumsum(gaps)
    offset = user_gap_sum - np.repeat(user_gap_sum[starts[:-1]], lengths)
    timestamp = np.repeat(t0, lengths) + offset.astype(np.int64)
    if model.sequential:
        item = _planted_items(model, users, lengths, rng)
    else:
        item = _draw_items(request, popularity_cdf, item_of_rank, rng)
    probs = model.probabilities(user, item)  # [n, S]
    hits = rng.random(probs.shape) < probs
    order = np.lexsort((np.arange(n), timestamp))  # the log is written in time order
    columns = {"user_id": user[order].astype(np.int64), "item_id": item[order].astype(np.int64),
               "timestamp": timestamp[order], "request_id": request[order].astype(np.int64)}
    for s, name in enumerate(cfg.signals):
        columns[name] = hits[order, s].astype(np.int8)
    return pa.table(columns), int(request[-1]) + 1


def _draw_items(request: np.ndarray, popularity_cdf: np.ndarray, item_of_rank: np.ndarray,
                rng: np.random.Generator, rounds: int = 20) -> np.ndarray:
    """Zipf draws ``[n]``, redrawn where an item repeats within its request (a feed shows an item once
    per request); a repeat left after ``rounds`` redraws stays and is collapsed by the duplicates policy."""

    def draw(k: int) -> np.ndarray:
        return item_of_rank[np.minimum(np.searchsorted(popularity_cdf, rng.random(k)), len(item_of_rank) - 1)]

    item = draw(len(request))
    for _ in range(rounds):
        repeat = ~pl.Series((request.astype(np.int64) << 32) | item).is_first_distinct().to_numpy()
        if not repeat.any():
            break
        item[repeat] = draw(int(repeat.sum()))
    return item


def generate(cfg: SynthConfig, out_dir: str | Path, log=print) -> dict:
    """Write the synthetic log as Parquet parts under ``out_dir`` plus ``synthetic.json`` and
    ``latent.npz``; return the summary written to ``synthetic.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    rng = np.random.default_rng([cfg.seed, 2])
    lengths = _lengths(cfg, rng)
    ranks = np.arange(1, cfg.num_items + 1, dtype=np.float64)
    popularity = ranks ** -cfg.zipf
    popularity_cdf = np.cumsum(popularity / popularity.sum())
    item_of_rank = rng.permutation(cfg.num_items)
    by_item = np.empty(cfg.num_items)
    by_item[item_of_rank] = popularity / popularity.sum()  # [I] P(item), item id order
    model = latent_model(cfg, by_item)
    meta = {"synthetic": "true", "generator": "genrec.data.synth", "config": json.dumps(asdict(cfg))}
    user_start = np.zeros(cfg.users + 1, dtype=np.int64)
    np.cumsum(lengths, out=user_start[1:])
    request_base, part, u = 0, 0, 0
    rates = np.zeros(len(cfg.signals))
    while u < cfg.users:
        # users [u, v) hold about part_events events
        v = max(u + 1, int(np.searchsorted(user_start, user_start[u] + cfg.part_events, side="right")) - 1)
        v = min(v, cfg.users)
        table, request_base = _user_chunk(cfg, model, np.arange(u, v), lengths[u:v], popularity_cdf,
                                          item_of_rank, request_base, rng)
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, out / f"part-{part:05d}.parquet", compression="lz4")
        for s, name in enumerate(cfg.signals):
            rates[s] += int(np.asarray(table.column(name)).sum())
        part += 1
        u = v
    model.save(out / "latent.npz")
    summary = {
        "synthetic": True,
        "note": "SYNTHETIC log from genrec.data.synth: for throughput, scale and memory tests, never a quality claim",
        "config": asdict(cfg), "parts": part, "users": cfg.users, "items": cfg.num_items, "events": cfg.events,
        "requests": request_base, "signal_rates": {n: rates[s] / cfg.events for s, n in enumerate(cfg.signals)},
        "columns": {"user": "user_id", "item": "item_id", "timestamp": "timestamp (s)", "request": "request_id",
                    "signals": list(cfg.signals)},
    }
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    log(f"[synth] SYNTHETIC log: {cfg.events:,} events, {cfg.users:,} users, {cfg.num_items:,} items, "
        f"{request_base:,} requests, signals {', '.join(cfg.signals)} -> {out}")
    return summary


def signal_names(spec: str) -> tuple[str, ...]:
    """``"3"`` -> the first three default names; ``"click,like"`` -> those names."""
    if spec.strip().isdigit():
        n = int(spec)
        if not 1 <= n <= len(DEFAULT_SIGNALS):
            raise ValueError(f"--signals {n}: between 1 and {len(DEFAULT_SIGNALS)} (or give names)")
        return DEFAULT_SIGNALS[:n]
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--signals {spec!r}: a count or distinct comma-separated names")
    return names
