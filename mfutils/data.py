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

__all__ = ["RatingData", "from_arrays", "random_split", "per_user_split", "temporal_split"]


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
    ratings = np.array(ratings, dtype=np.float32)   # a writable copy: pandas 3 hands out read-only views
    n = len(ratings)
    if not (len(user_ids) == len(item_ids) == n):
        raise ValueError(f"from_arrays(): user_ids, item_ids and ratings must have the same length; "
                         f"got {len(user_ids)}, {len(item_ids)} and {n}")
    if timestamps is None:
        timestamps = np.zeros(n, dtype=np.int64)
    elif len(timestamps) != n:
        raise ValueError(f"from_arrays(): timestamps must have one entry per rating ({n}); got {len(timestamps)}. "
                         f"Pass timestamps=None if there are none")
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
        timestamp=torch.from_numpy(np.array(timestamps, dtype=np.int64)),
        user_ids=uniq_u, item_ids=uniq_i, item_titles=titles, item_genres=genres, name=name)


# ----------------------------------------------------------------------------------------- splits

def _check_split_args(func: str, data: RatingData, test_frac: float, seed: int | None = None) -> None:
    if not isinstance(data, RatingData):
        raise TypeError(f"{func}(): data must be a RatingData; got {type(data).__name__}. Build one with "
                        f"mfutils.data.from_arrays(...) or load it with mfutils.movielens.load_movielens(...)")
    if isinstance(test_frac, bool) or not isinstance(test_frac, (int, float, np.floating)) \
            or not 0.0 < float(test_frac) < 1.0:
        raise ValueError(f"{func}(): test_frac must be a number strictly between 0 and 1; got {test_frac!r}. "
                         f"Pass the fraction of ratings to hold out, e.g. test_frac=0.2")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"{func}(): seed must be an int; got {seed!r} ({type(seed).__name__}). "
                        f"Pass e.g. seed=0; the same seed gives the same split")
    if data.n_ratings < 2:
        raise ValueError(f"{func}(): data has {data.n_ratings} rating(s); a split needs at least 2")


def _split_by_mask(data: RatingData, test_mask: np.ndarray) -> tuple[RatingData, RatingData]:
    test_mask = torch.from_numpy(test_mask)                    # (n_ratings,) bool
    return data.subset(~test_mask), data.subset(test_mask)


def _last_k_per_user(user_idx: np.ndarray, order: np.ndarray, test_frac: float) -> np.ndarray:
    r"""Mark, for every user, the last ``k_u`` of their ratings in ``order`` (sorted by user first).

    ``k_u`` is :math:`\mathrm{round}(\text{test\_frac}\cdot n_u)` (half up), clipped to ``1..n_u-1``; users
    with fewer than two ratings get ``k_u = 0``. Returns a bool mask of shape ``(n_ratings,)``.
    """
    n_u = np.bincount(user_idx)                                # (n_users,)
    k_u = np.clip(np.floor(test_frac * n_u + 0.5).astype(np.int64), 1, np.maximum(n_u - 1, 1))
    k_u[n_u < 2] = 0
    end = np.cumsum(n_u)                                       # (n_users,) one past each user's block
    sorted_users = user_idx[order]                             # (n_ratings,)
    from_end = end[sorted_users] - np.arange(len(order)) - 1   # (n_ratings,) 0 = user's last rating
    mask = np.zeros(len(order), dtype=bool)
    mask[order[from_end < k_u[sorted_users]]] = True
    return mask


def random_split(data: RatingData, test_frac: float = 0.2, *, seed: int = 0) -> tuple[RatingData, RatingData]:
    r"""Hold out a uniformly random ``round(test_frac * n_ratings)`` of the ratings.

    Args:
        data: the ratings to split.
        test_frac: fraction of ratings for the test set, strictly between 0 and 1.
        seed: seeds a private ``np.random.default_rng``; the same seed gives the same split.
    Returns:
        ``(train, test)``: subsets of ``data`` in their original order, with the same id maps (so the same
        ``n_users`` and ``n_items``). Together they hold every rating exactly once.
    Raises:
        ValueError: ``test_frac`` outside ``(0, 1)``, or fewer than 2 ratings.
        TypeError: ``data`` is not a :class:`RatingData`, or ``seed`` is neither an int nor ``None``
            (``None`` draws an unseeded split).
    Example:
        >>> train, test = random_split(data, 0.2, seed=0)
    """
    _check_split_args("random_split", data, test_frac, seed)
    n = data.n_ratings
    n_test = min(max(int(np.floor(test_frac * n + 0.5)), 1), n - 1)
    picked = np.random.default_rng(seed).permutation(n)[:n_test]   # (n_test,)
    mask = np.zeros(n, dtype=bool)
    mask[picked] = True
    return _split_by_mask(data, mask)


def per_user_split(data: RatingData, test_frac: float = 0.2, *, seed: int = 0) -> tuple[RatingData, RatingData]:
    r"""Hold out a random ``test_frac`` of each user's ratings, so every user with 2 or more appears in both.

    A user with :math:`n_u \ge 2` ratings gives :math:`\mathrm{round}(\text{test\_frac}\cdot n_u)` (half
    up) of them to the test set, at least 1 and at most :math:`n_u - 1`. Users with one rating stay in train.

    Args:
        data: the ratings to split.
        test_frac: target fraction per user, strictly between 0 and 1.
        seed: seeds a private ``np.random.default_rng``.
    Returns:
        ``(train, test)`` subsets of ``data`` in their original order, with the same id maps.
    Raises:
        ValueError: ``test_frac`` outside ``(0, 1)``, or fewer than 2 ratings.
        TypeError: ``data`` is not a :class:`RatingData`, or ``seed`` is neither an int nor ``None``
            (``None`` draws an unseeded split).
    """
    _check_split_args("per_user_split", data, test_frac, seed)
    user_idx = data.user_idx.numpy()
    noise = np.random.default_rng(seed).random(len(user_idx))      # (n_ratings,) random rank keys
    order = np.lexsort((noise, user_idx))                          # (n_ratings,) by user, then random
    return _split_by_mask(data, _last_k_per_user(user_idx, order, float(test_frac)))


def temporal_split(data: RatingData, test_frac: float = 0.2) -> tuple[RatingData, RatingData]:
    r"""Hold out each user's latest ratings: "train on the past, predict the future".

    Per-user counts follow :func:`per_user_split`. Ratings are ordered by ``timestamp``; among equal
    timestamps, a rating that comes later in ``data`` counts as later. Deterministic: no seed.

    Args:
        data: the ratings to split; its ``timestamp`` should be meaningful (not all zeros).
        test_frac: target fraction per user, strictly between 0 and 1.
    Returns:
        ``(train, test)`` subsets of ``data`` in their original order, with the same id maps.
    Raises:
        ValueError: ``test_frac`` outside ``(0, 1)``, or fewer than 2 ratings.
        TypeError: ``data`` is not a :class:`RatingData`.
    """
    _check_split_args("temporal_split", data, test_frac)
    user_idx = data.user_idx.numpy()
    n = len(user_idx)
    order = np.lexsort((np.arange(n), data.timestamp.numpy(), user_idx))  # (n_ratings,) by user, time, position
    return _split_by_mask(data, _last_k_per_user(user_idx, order, float(test_frac)))
