"""A tiny MovieLens-format dataset, so multi-process tests spend their seconds on the collectives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_ml_csv

USERS, ITEMS = 23, 30


def tiny_movielens(folder: Path, seed: int = 0) -> Path:
    """23 users with 8-16 ratings each, 2 ratings per request (equal timestamps), half-star ratings."""
    rng = np.random.default_rng(seed)
    lines = ["userId,movieId,rating,timestamp"]
    for user in range(1, USERS + 1):
        n = int(rng.integers(8, 17))
        items = rng.choice(np.arange(1, ITEMS + 1), n, replace=False)
        t = 1_300_000_000 + int(rng.integers(0, 10**6))
        for i, item in enumerate(items):
            t += int(rng.integers(100, 10_000)) if i % 2 == 0 else 0
            lines.append(f"{user},{item},{rng.integers(1, 11) / 2:.1f},{t}")
    movies = ["movieId,title,genres"] + [f"{i},Movie {i} (2000),{'Drama' if i % 2 else 'Comedy'}"
                                         for i in range(1, ITEMS + 1)]
    return write_ml_csv(folder / "ml-latest-small", "\n".join(lines) + "\n", "\n".join(movies) + "\n").parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_movielens(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_sequences(tiny_data):
    """The training windows of the tiny dataset (temporal split, up to 10 events)."""
    from genrec.data.batching import WindowDataset
    from genrec.data.preprocess import PrepConfig, prepare
    from genrec.data.splits import SplitConfig, windows

    seq = prepare("ml-latest-small", tiny_data, PrepConfig(3.0, 0, 3, "drop"), allow_download=False)
    return WindowDataset(seq, windows(seq, "train", SplitConfig("temporal", 0.8, 0.9), 10, None))


@pytest.fixture
def one_thread():
    """The ranks run one thread each; the single-process side does too, so both use the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
