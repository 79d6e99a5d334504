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

    def probabilities(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Exact ``P(signal = 1 | user, item)`` ``[N, S]`` for raw ``user_id`` / ``item_id`` arrays ``[N]``."""
        z = np.einsum("nk,nk->n", self.user_vectors[users], self.item_vectors[items])  # [N]
        return 1.0 / (1.0 + np.exp(-(z[:, None] * self.weights[None, :] + self.biases[None, :])))

    def save(self, path: Path) -> None:
        np.savez(path, user_vectors=self.user_vectors, item_vectors=self.item_vectors, weights=self.weights,
                 biases=self.biases, signals=np.array(self.signals))

    @classmethod
    def load(cls, path: str | Path) -> LatentModel:
        z = np.load(path)
        return cls(z["user_vectors"], z["item_vectors"], z["weights"], z["biases"], [str(s) for s in z["signals"]])


def _lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed per-user history lengths ``[U]`` summing to exactly ``cfg.events``."""
    if cfg.events < cfg.users * cfg.min_length:
        raise ValueError(f"--events {cfg.events} is fewer than users x min_length = {cfg.users * cfg.min_length}")
    weight = rng.lognormal(0.0, cfg.length_sigma, cfg.users)
    extra = cfg.events - cfg.users * cfg.min_length
    share = np.floor(weight / weight.sum() * extra).astype(np.int64)
    share[rng.choice(cfg.users, extra - int(share.sum()), replace=False)] += 1  # hand out the rounding rest
    return share + cfg.min_length


def latent_model(cfg: SynthConfig) -> LatentModel:
    rng = np.random.default_rng([cfg.seed, 1])
    k = cfg.latent_dim
    s = len(cfg.signals)
    rates = np.resize(np.asarray(cfg.base_rates, dtype=np.float64), s)
    return LatentModel(
        user_vectors=(rng.standard_normal((cfg.users, k)) / np.sqrt(k)).astype(np.float32),
        item_vectors=rng.standard_normal((cfg.num_items, k)).astype(np.float32),
        weights=np.resize(np.asarray(cfg.weights, dtype=np.float64), s),
        biases=np.log(rates / (1 - rates)),
        signals=list(cfg.signals),
    )


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
    request = np.cumsum(boundary) - 1 + request_base  # [n] globally unique ids
    gaps = np.where(boundary, rng.exponential(cfg.mean_gap_s, n), 0.0)
    gaps[starts[:-1]] = 0.0
    t0 = cfg.start_time + rng.integers(0, cfg.span_s, len(users))
    user_gap_sum = np.cumsum(gaps)
    offset = user_gap_sum - np.repeat(user_gap_sum[starts[:-1]], lengths)
    timestamp = np.repeat(t0, lengths) + offset.astype(np.int64)
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
    model = latent_model(cfg)
    lengths = _lengths(cfg, rng)
    ranks = np.arange(1, cfg.num_items + 1, dtype=np.float64)
    popularity = ranks ** -cfg.zipf
    popularity_cdf = np.cumsum(popularity / popularity.sum())
    item_of_rank = rng.permutation(cfg.num_items)
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
