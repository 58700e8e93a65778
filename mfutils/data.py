r"""Ratings as tensors: the :class:`RatingData` container and seeded splits.

Raw identifiers (``user_id``, ``item_id``) are whatever the source file uses: integers for MovieLens,
arbitrary tokens for a reader's own file. Models need *numbers*: 0-based, contiguous ``user_idx`` and
``item_idx``, assigned from the sorted raw ids so that reloading the same data numbers it the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

__all__ = ["RatingData", "from_arrays"]


@dataclass(frozen=True)
class RatingData:
    r"""A set of ratings :math:`r_{ui}` with the maps between raw ids and 0-based numbers.

    Attributes:
        user_idx: int64, shape ``(n_ratings,)``, values in ``0..n_users-1``.
        item_idx: int64, shape ``(n_ratings,)``, values in ``0..n_items-1``.
        rating: float32, shape ``(n_ratings,)``.
        timestamp: int64, shape ``(n_ratings,)`` (seconds since the epoch; zeros when unknown).
        user_ids: raw user ids, shape ``(n_users,)``; ``user_ids[u]`` is the raw id of user number ``u``.
        item_ids: raw item ids, shape ``(n_items,)``.
        item_titles: titles aligned with ``item_ids``, or ``None``.
        item_genres: ``"|"``-joined genres aligned with ``item_ids``, or ``None``.
        name: where the data came from, e.g. ``"ml-100k"``.

    All tensors live on the CPU; trainers move them to their ``device`` once per fit. A subset (a split)
    keeps the full id maps, so ``n_users`` and ``n_items`` are the same for train and test.
    """

    user_idx: torch.Tensor
    item_idx: torch.Tensor
    rating: torch.Tensor
    timestamp: torch.Tensor
    user_ids: np.ndarray
    item_ids: np.ndarray
    item_titles: np.ndarray | None = None
    item_genres: np.ndarray | None = None
    name: str = ""

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_ratings(self) -> int:
        return int(self.rating.shape[0])

    def __len__(self) -> int:
        return self.n_ratings

    def __repr__(self) -> str:
        return (f"RatingData(name={self.name!r}, n_ratings={self.n_ratings:,}, "
                f"n_users={self.n_users:,}, n_items={self.n_items:,})")

    def subset(self, index: torch.Tensor | np.ndarray) -> RatingData:
        """The ratings selected by a boolean mask or an integer index, with the same id maps."""
        index = torch.as_tensor(index)
        return replace(self, user_idx=self.user_idx[index], item_idx=self.item_idx[index],
                       rating=self.rating[index], timestamp=self.timestamp[index])

    def user_idx_of(self, user_ids) -> np.ndarray:
        """Numbers of the given raw user ids; raises ``KeyError`` naming the first unknown id."""
        return _lookup(self.user_ids, user_ids, "user")

    def item_idx_of(self, item_ids) -> np.ndarray:
        """Numbers of the given raw item ids; raises ``KeyError`` naming the first unknown id."""
        return _lookup(self.item_ids, item_ids, "item")

    def to_frame(self) -> pd.DataFrame:
        """One row per rating: raw ids, numbers, rating and timestamp."""
        u, i = self.user_idx.numpy(), self.item_idx.numpy()
        return pd.DataFrame({"user_id": self.user_ids[u], "item_id": self.item_ids[i],
                             "user_idx": u, "item_idx": i,
                             "rating": self.rating.numpy(), "timestamp": self.timestamp.numpy()})


def _lookup(sorted_ids: np.ndarray, ids, kind: str) -> np.ndarray:
    ids = np.asarray(ids)
    pos = np.searchsorted(sorted_ids, ids)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    bad = sorted_ids[pos_c] != ids
    if bad.any():
        raise KeyError(f"unknown {kind} id {ids[bad][0]!r}: it is not among the "
                       f"{len(sorted_ids):,} {kind}s of this data")
    return pos


def from_arrays(user_ids, item_ids, ratings, timestamps=None, *, name: str = "",
                items: pd.DataFrame | None = None) -> RatingData:
    r"""Build :class:`RatingData` from raw per-rating arrays, numbering ids in sorted order.

    Args:
        user_ids, item_ids: raw ids per rating, shape ``(n_ratings,)`` (ints or strings).
        ratings: numeric, shape ``(n_ratings,)``; stored as float32.
        timestamps: ints, shape ``(n_ratings,)``, or ``None`` (stored as zeros).
        name: a label for the data.
        items: optional frame indexed by raw item id with columns ``title`` and/or ``genres``.
    """
    user_ids, item_ids = np.asarray(user_ids), np.asarray(item_ids)
    ratings = np.asarray(ratings, dtype=np.float32)
    n = len(ratings)
    if not (len(user_ids) == len(item_ids) == n):
        raise ValueError(f"from_arrays(): user_ids, item_ids and ratings must have the same length; "
                         f"got {len(user_ids)}, {len(item_ids)} and {n}")
    if timestamps is None:
        timestamps = np.zeros(n, dtype=np.int64)
    uniq_u, u_idx = np.unique(user_ids, return_inverse=True)
    uniq_i, i_idx = np.unique(item_ids, return_inverse=True)
    titles = genres = None
    if items is not None:
        items = items.reindex(uniq_i)
        titles = items["title"].to_numpy(dtype=object) if "title" in items else None
        genres = items["genres"].to_numpy(dtype=object) if "genres" in items else None
    return RatingData(
        user_idx=torch.from_numpy(u_idx.astype(np.int64).reshape(-1)),
        item_idx=torch.from_numpy(i_idx.astype(np.int64).reshape(-1)),
        rating=torch.from_numpy(ratings),
        timestamp=torch.from_numpy(np.asarray(timestamps, dtype=np.int64)),
        user_ids=uniq_u, item_ids=uniq_i, item_titles=titles, item_genres=genres, name=name)
