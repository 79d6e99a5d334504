"""One entry point from a run's data settings to :class:`~genrec.data.preprocess.Sequences`, whatever
the source: a team's own event log (``data.event_log``), a public multi-action log by name
(KuaiRand, KuaiSAR, RecFlow, Taobao, Amazon), MovieLens with several signals (``data.signals``),
or a rating dataset with its one label."""

from __future__ import annotations

import inspect
from pathlib import Path

from genrec.data import store
from genrec.data.eventlog import EventLogSpec
from genrec.data.multisignal import prepare_movielens_signals
from genrec.data.preprocess import PrepConfig, Sequences, prepare
from genrec.data.public_logs import PUBLIC_LOGS, read_log


def prepare_sequences(dataset: str, data_dir: str | Path | None, prep: PrepConfig, *,
                      event_log: dict | None = None, signals: tuple[str, ...] = (), allow_download: bool = True,
                      log=print) -> Sequences:
    """Sequences of the configured source (see the module docstring), from its cache when unchanged."""
    store_cfg = store.StoreConfig(request_window_s=prep.request_window_s, min_user_events=prep.min_user_events,
                                  duplicates=prep.duplicates)
    if event_log is not None:
        spec = EventLogSpec.from_dict(event_log, "data.event_log")
        return store.prepare(spec, store_cfg, log=log)
    if dataset in PUBLIC_LOGS:
        reader = PUBLIC_LOGS[dataset].reader
        args = {"signals": tuple(signals)} if signals and "signals" in inspect.signature(reader).parameters else {}
        if signals and not args:
            raise ValueError(f"data.signals: {dataset} has a fixed set of signals; leave data.signals empty")
        return store.prepare(read_log(dataset, data_dir, allow_download=allow_download, **args), store_cfg, log=log)
    if signals:
        return prepare_movielens_signals(dataset, tuple(signals), data_dir, prep, allow_download=allow_download,
                                         log=log)
    return prepare(dataset, data_dir, prep, allow_download=allow_download, log=log)
