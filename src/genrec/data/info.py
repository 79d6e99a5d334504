"""What a model may know about a dataset before training: sizes and item side features.

It lives with the data because every floor above reads it (the models to size their tables, the
trainer and the serving code to build a model for a prepared dataset).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from genrec.data.preprocess import Sequences


@dataclass
class DatasetInfo:
    num_items: int  # dense ids 1..num_items, 0 = padding
    num_actions: int  # rating classes
    num_users: int
    item_genres: np.ndarray  # [num_items + 1, G] multi-hot (row 0 padding)
    rating_values: list[float]
    signal_names: list[str] = field(default_factory=lambda: ["like"])  # the action signals, in batch order


def dataset_info(seq: Sequences) -> DatasetInfo:
    genres, _ = seq.genre_matrix()
    return DatasetInfo(seq.num_items, seq.num_actions, seq.num_users, genres, seq.rating_values,
                       list(seq.signal_names) or ["like"])
