"""Features of the classic CTR rankers (DIN, DIEN, DCN-v2, DeepFM, GDCN), built the same way for all.

For each target event: the user id, the target item id, the target item's genres (mean of genre
embeddings), and the behaviour sequence: the last ``history`` events of *earlier requests* (item +
action embedding; the target's own request is never included, so neither its label nor its
neighbours' labels are read). The generative models see the same information through their masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genrec.data.batching import JaggedBatch
from genrec.data.info import DatasetInfo
from genrec.nn.events import Events


@dataclass
class CTRInputs:
    user: torch.Tensor  # [N, D]
    target: torch.Tensor  # [N, D] target item
    genres: torch.Tensor  # [N, D] target genres (mean of genre embeddings)
    history: torch.Tensor  # [N, H, D] behaviour: item + action, most recent last
    history_mask: torch.Tensor  # [N, H] bool

    def pooled_history(self) -> torch.Tensor:  # [N, D] mean over valid behaviours
        weights = self.history_mask.to(self.history.dtype)
        return (self.history * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    def fields(self) -> torch.Tensor:  # [N, 4, D] one embedding per field
        return torch.stack([self.user, self.target, self.genres, self.pooled_history()], dim=1)


class CTRFeatureEmbedding(nn.Module):
    def __init__(self, info: DatasetInfo, dim: int, history: int):
        super().__init__()
        self.history = history
        self.signal_names = list(info.signal_names)  # the models' heads give one logit per signal
        self.user_emb = nn.Embedding(info.num_users, dim)
        self.item_emb = nn.Embedding(info.num_items + 1, dim, padding_idx=0)
        self.action_emb = nn.Embedding(info.num_actions, dim)
        self.genre_emb = nn.Linear(info.item_genres.shape[1], dim, bias=False)
        genres = torch.as_tensor(info.item_genres)
        self.register_buffer("item_genres", genres / genres.sum(1, keepdim=True).clamp(min=1), persistent=False)
        for table in (self.user_emb, self.item_emb, self.action_emb):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, batch: JaggedBatch) -> CTRInputs:
        """Features of the batch's targets, in flat target order."""
        ev = Events.from_batch(batch)
        seq, pos = torch.nonzero(ev.target, as_tuple=True)  # targets in flat (sequence, position) order
        return self._inputs(ev, seq, ev.request_start[seq, pos], ev.items[seq, pos], batch.users[seq])

    def for_candidates(self, history: JaggedBatch, candidates: torch.Tensor) -> CTRInputs:
        """Features of ``candidates`` ``[B, M]`` as the next request after each whole sequence of
        ``history``: ``B · M`` rows in ``[B, M]`` order."""
        ev = Events.from_batch(history)
        b, m = candidates.shape
        rows = torch.arange(b, device=candidates.device).repeat_interleave(m)  # [B * M]
        return self._inputs(ev, rows, ev.valid.sum(1)[rows], candidates.reshape(-1), history.users[rows])

    def _inputs(self, ev: Events, rows: torch.Tensor, start: torch.Tensor, items: torch.Tensor,
                users: torch.Tensor) -> CTRInputs:
        """Features of ``N`` scored items: ``rows`` ``[N]`` the sequence each is scored in, ``start``
        ``[N]`` the index of its request's first event (its history is the events before)."""
        idx = start[:, None] - self.history + torch.arange(self.history, device=start.device)[None, :]  # [N, H]
        mask = idx >= 0
        idx = idx.clamp(min=0)
        seq = rows[:, None].expand_as(idx)
        history = self.item_emb(ev.items[seq, idx]) + self.action_emb(ev.actions[seq, idx])
        return CTRInputs(user=self.user_emb(users), target=self.item_emb(items),
                         genres=self.genre_emb(self.item_genres[items]), history=history * mask[..., None],
                         history_mask=mask)


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers[:-2])  # no activation after the last layer
