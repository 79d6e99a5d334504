"""MovieLens as a multi-signal event log: rating-derived signals and tags as a second behaviour.

Signals (``DataConfig.signals``; any subset, in this order of names):

* ``like``: the rating is above the label threshold (UniGRF's "rating > 3");
* ``five_star``: the rating is the scale's top value (5);
* ``rated``: the event is a rating (0 for a tag-only event);
* ``tagged``: the user tagged the movie at this event (ml-latest(-small)/ml-20m ``tags.csv``).

A tag is its own event at its own time (tags in ml-latest-small are mostly applied long after the
rating: median 37 M seconds), the first tag time of each (user, movie); a tag at exactly a rating's
time marks that rating event instead. Tag-only events carry 0 for the rating signals. The events go
through the generic event-log store (:mod:`genrec.data.store`), so policies, caching and the action
code are those of any event log; genres come from the dataset's movie table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import polars as pl

from genrec.data import registry
from genrec.data.errors import DataError
from genrec.data.eventlog import EventLogSpec, SignalSpec
from genrec.data.preprocess import PrepConfig, Sequences, cache_root, input_digest
from genrec.data.readers import RawData, Source, read_movielens_tags
from genrec.data.store import StoreConfig, build, load

RATING_SIGNALS = ("like", "five_star", "rated", "tagged")


def movielens_events(raw: RawData, path: Path, signals: tuple[str, ...], threshold: float) -> pl.DataFrame:
    """One row per event ``(user, item, timestamp, <signal>...)``: the ratings of ``raw`` and, for the
    ``tagged`` signal, the tags of ``path``."""
    ratings = pl.from_arrow(raw.events)
    top = ratings["rating"].max()
    events = ratings.select("user", "item", "timestamp",
                            (pl.col("rating") > threshold).cast(pl.Int8).alias("like"),
                            (pl.col("rating") == top).cast(pl.Int8).alias("five_star"),
                            pl.lit(1, pl.Int8).alias("rated"), pl.lit(0, pl.Int8).alias("tagged"))
    if "tagged" in signals:
        tags = pl.from_arrow(read_movielens_tags(path)).group_by("user", "item").agg(pl.col("timestamp").min())
        on_rating = tags.join(events.select("user", "item", "timestamp"), on=["user", "item", "timestamp"],
                              how="semi")
        events = events.join(on_rating.with_columns(pl.lit(1, pl.Int8).alias("hit")), on=["user", "item",
                             "timestamp"], how="left").with_columns(
            pl.when(pl.col("hit") == 1).then(1).otherwise(pl.col("tagged")).cast(pl.Int8).alias("tagged")
        ).drop("hit")
        tag_only = tags.join(on_rating, on=["user", "item", "timestamp"], how="anti").select(
            "user", "item", "timestamp", *(pl.lit(v, pl.Int8).alias(s) for s, v in
                                           (("like", 0), ("five_star", 0), ("rated", 0), ("tagged", 1))))
        events = pl.concat([events, tag_only])
    return events


def prepare_movielens_signals(name: str, signals: tuple[str, ...], data_dir: str | Path | None = None,
                              cfg: PrepConfig | None = None, *, allow_download: bool = True,
                              log=print) -> Sequences:
    """Sequences of MovieLens dataset ``name`` with the multi-signal events above, cached."""
    cfg = cfg or PrepConfig()
    unknown = [s for s in signals if s not in RATING_SIGNALS]
    if unknown or not signals:
        raise ValueError(f"data.signals {list(signals)}: choose from {list(RATING_SIGNALS)}")
    path = registry.ensure(name, data_dir, allow_download=allow_download)
    if "tagged" in signals and not Source(path).has("tags.csv"):
        raise DataError(str(path), f"{name} has no tags.csv; the 'tagged' signal needs it")
    files = registry.spec_for(name).files + (("tags.csv",) if "tagged" in signals else ())
    key = hashlib.sha256(json.dumps([name, input_digest(path, files), list(signals),
                                     asdict(cfg)]).encode()).hexdigest()[:16]
    folder = cache_root() / f"{name}-signals-{key}"
    raw = registry.spec_for(name).reader(path)
    if not (folder / "meta.json").is_file():
        events = movielens_events(raw, path, signals, cfg.label_threshold)
        folder.parent.mkdir(parents=True, exist_ok=True)
        table = folder.parent / f"{folder.name}.events.parquet"
        events.write_parquet(table)
        spec = EventLogSpec(str(table), tuple(SignalSpec(s, s) for s in signals), user="user", item="item",
                            timestamp="timestamp", name=name)
        build(spec, folder, StoreConfig(request_window_s=cfg.request_window_s, min_user_events=cfg.min_user_events,
                                        duplicates=cfg.duplicates), log=log)
        table.unlink()
    seq = load(folder)
    seq.source_digest = folder.name
    items = raw.items
    genres = dict(zip(items.column("item").to_pylist(), items.column("genres").to_pylist(), strict=True))
    titles = dict(zip(items.column("item").to_pylist(), items.column("title").to_pylist(), strict=True))
    seq.item_genres = [[g for g in (genres.get(i) or []) if g and g != "(no genres listed)"] for i in seq.item_raw]
    seq.item_titles = [titles.get(i) or "" for i in seq.item_raw]
    return seq
