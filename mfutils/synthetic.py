r"""MovieLens-like synthetic ratings with a known ground truth, at any size.

The generator draws who rates what from power-law (Zipf) activity, then rates each pair with a biased
low-rank model plus Gaussian noise, rounded and clipped to 1..5 stars:

.. math:: r_{ui} = \mathrm{clip}_{[1,5]}\,\mathrm{round}\big(\mu + b_u + b_i + p_u^\top q_i + \sigma\varepsilon\big),
   \qquad \varepsilon \sim \mathcal N(0, 1).

Use it to time trainers at ML-20M or Netflix scale without downloading anything, and to check that a
model recovers a truth it can be compared with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mfutils.data import RatingData

__all__ = ["SIZES", "SyntheticTruth", "synthetic"]

SIZES: dict[str, tuple[int, int, int]] = {
    "ml-100k": (943, 1682, 100_000),
    "ml-1m": (6040, 3706, 1_000_209),
    "ml-10m": (69878, 10677, 10_000_054),
    "ml-20m": (138493, 26744, 20_000_263),
    "netflix": (480189, 17770, 100_480_507),
}
r"""``(n_users, n_items, n_ratings)`` of real data sets, e.g. ``synthetic(*SIZES["ml-20m"])``."""

_GLOBAL_MEAN = 3.55
_USER_BIAS_STD, _ITEM_BIAS_STD, _INTERACTION_VAR = 0.45, 0.55, 0.6
_TIME_RANGE = (946_684_800, 1_577_836_800)        # 2000-01-01 .. 2020-01-01, seconds since the epoch
_MAX_ROUNDS = 40
_CHUNK = 1 << 22                                  # ratings scored per step: bounds the (chunk, k) temporaries


@dataclass(frozen=True)
class SyntheticTruth:
    r"""The model that generated the ratings (before noise, rounding and clipping).

    Attributes:
        user_factors: float32, shape ``(n_users, n_factors)``, on the CPU.
        item_factors: float32, shape ``(n_items, n_factors)``.
        user_bias: float32, shape ``(n_users,)``.
        item_bias: float32, shape ``(n_items,)``.
        global_mean: :math:`\mu`.
        noise: :math:`\sigma`, the standard deviation of the Gaussian noise.
    """

    user_factors: torch.Tensor
    item_factors: torch.Tensor
    user_bias: torch.Tensor
    item_bias: torch.Tensor
    global_mean: float
    noise: float


def synthetic(n_users: int, n_items: int, n_ratings: int, *, n_factors: int = 16, noise: float = 0.5,
              popularity_exponent: float = 1.0, activity_exponent: float = 0.6, seed: int = 0,
              device: str | torch.device = "cpu") -> tuple[RatingData, SyntheticTruth]:
    r"""Draw ``n_ratings`` distinct (user, item) ratings from a known biased matrix-factorization model.

    Item ``i`` of popularity rank :math:`\rho_i` (a random permutation) is drawn with probability
    :math:`\propto (\rho_i + 1)^{-a}`, :math:`a` = ``popularity_exponent``; users likewise with
    ``activity_exponent``. Pairs are drawn by inverse CDF and deduplicated, and the shortfall is redrawn
    until exactly ``n_ratings`` distinct pairs remain. The defaults give MovieLens-like stars (mean about
    3.5, standard deviation about 1.1) and a heavy popularity head.

    Args:
        n_users, n_items: sizes; raw ids are ``0..n_users-1`` and ``0..n_items-1``.
        n_ratings: how many ratings, at most half of ``n_users * n_items``.
        n_factors: rank :math:`k` of the interaction term :math:`p_u^\top q_i`.
        noise: standard deviation :math:`\sigma \ge 0` of the Gaussian noise.
        popularity_exponent, activity_exponent: Zipf exponents for items and users (0 = uniform).
        seed: seeds private generators: the truth comes from a CPU generator (the same on every device);
            the pairs, noise and timestamps from one on ``device``.
        device: where to sample (``"cuda"`` is faster at 100M ratings); the results are returned on the CPU.
    Returns:
        ``(data, truth)``: ``data`` is a :class:`~mfutils.data.RatingData` named ``"synthetic"``, sorted by
        user then item, with float32 whole-star ratings of shape ``(n_ratings,)`` and random timestamps;
        ``truth`` is a :class:`SyntheticTruth`.
    Raises:
        ValueError: a non-positive size, ``n_ratings`` over half the matrix, or a negative noise/exponent.
        RuntimeError: exponents so steep that redrawing cannot find ``n_ratings`` distinct pairs.
    Example:
        >>> data, truth = synthetic(*SIZES["ml-100k"], seed=0)
    """
    _check_args(n_users, n_items, n_ratings, n_factors, noise, popularity_exponent, activity_exponent)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    truth = _make_truth(n_users, n_items, n_factors, noise, seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    user_cdf = _zipf_cdf(n_users, activity_exponent, gen, device)            # (n_users,) float64
    item_cdf = _zipf_cdf(n_items, popularity_exponent, gen, device)          # (n_items,)
    keys = _distinct_pairs(user_cdf, item_cdf, n_ratings, gen)               # (n_ratings,) sorted
    user_idx, item_idx = keys // n_items, keys % n_items                     # (n_ratings,) each
    del keys
    rating = _score(truth, user_idx, item_idx, gen)                          # (n_ratings,) float32
    timestamp = torch.randint(*_TIME_RANGE, (n_ratings,), generator=gen, device=device)
    data = RatingData(user_idx=user_idx.cpu(), item_idx=item_idx.cpu(), rating=rating.cpu(),
                      timestamp=timestamp.cpu(), user_ids=np.arange(n_users, dtype=np.int64),
                      item_ids=np.arange(n_items, dtype=np.int64), name="synthetic")
    return data, truth


def _check_args(n_users, n_items, n_ratings, n_factors, noise, popularity_exponent, activity_exponent) -> None:
    for arg, value in [("n_users", n_users), ("n_items", n_items), ("n_ratings", n_ratings),
                       ("n_factors", n_factors)]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"synthetic(): {arg} must be a positive int; got {value!r}")
    if n_ratings > n_users * n_items // 2:
        raise ValueError(f"synthetic(): n_ratings={n_ratings:,} is more than half of the "
                         f"n_users*n_items={n_users * n_items:,} possible (user, item) pairs; ask for at most "
                         f"{n_users * n_items // 2:,} ratings, or more users or items")
    for arg, value in [("noise", noise), ("popularity_exponent", popularity_exponent),
                       ("activity_exponent", activity_exponent)]:
        if not value >= 0 or not math.isfinite(value):
            raise ValueError(f"synthetic(): {arg} must be a finite number >= 0; got {value!r}")


def _make_truth(n_users: int, n_items: int, n_factors: int, noise: float, seed: int) -> SyntheticTruth:
    gen = torch.Generator().manual_seed(seed)
    scale = (_INTERACTION_VAR / n_factors) ** 0.25          # so that Var(p_u . q_i) = _INTERACTION_VAR
    return SyntheticTruth(
        user_factors=torch.randn(n_users, n_factors, generator=gen) * scale,
        item_factors=torch.randn(n_items, n_factors, generator=gen) * scale,
        user_bias=torch.randn(n_users, generator=gen) * _USER_BIAS_STD,
        item_bias=torch.randn(n_items, generator=gen) * _ITEM_BIAS_STD,
        global_mean=_GLOBAL_MEAN, noise=float(noise))


def _zipf_cdf(n: int, exponent: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    rank = torch.randperm(n, generator=gen, device=device)                  # (n,) popularity rank of each id
    weight = (rank.double() + 1.0) ** -exponent                             # (n,)
    cdf = torch.cumsum(weight, 0)
    return cdf / cdf[-1]


def _draw(cdf: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(m, generator=gen, device=cdf.device, dtype=torch.float64)  # (m,)
    return torch.searchsorted(cdf, u).clamp_(max=len(cdf) - 1)              # (m,) int64


def _distinct_pairs(user_cdf: torch.Tensor, item_cdf: torch.Tensor, n_ratings: int,
                    gen: torch.Generator) -> torch.Tensor:
    r"""Exactly ``n_ratings`` distinct keys ``user_idx * n_items + item_idx``, sorted, shape ``(n_ratings,)``."""
    n_items = len(item_cdf)
    keys = torch.empty(0, dtype=torch.int64, device=user_cdf.device)
    need, draws = n_ratings, n_ratings
    for _ in range(_MAX_ROUNDS):
        new = torch.unique(_draw(user_cdf, draws, gen) * n_items + _draw(item_cdf, draws, gen))  # sorted
        if len(keys):
            new = new[~torch.isin(new, keys, assume_unique=True)]           # (n_new,) not seen before
        if len(new) >= need:                                                 # keep a random `need` of them
            new = new[torch.randperm(len(new), generator=gen, device=new.device)[:need]]
            return torch.sort(torch.cat([keys, new])).values
        keys = torch.cat([keys, new])
        yield_ = max(len(new) / draws, 0.02)
        need -= len(new)
        draws = min(int(need / yield_ * 1.2) + 64, 4 * n_ratings + 64)
    raise RuntimeError(f"synthetic(): found only {len(keys):,} of {n_ratings:,} distinct pairs after "
                       f"{_MAX_ROUNDS} rounds; the popularity head is saturated. Lower popularity_exponent "
                       f"or activity_exponent, or ask for fewer ratings")


def _score(truth: SyntheticTruth, user_idx: torch.Tensor, item_idx: torch.Tensor,
           gen: torch.Generator) -> torch.Tensor:
    device = user_idx.device
    P, Q = truth.user_factors.to(device), truth.item_factors.to(device)     # (n_users, k), (n_items, k)
    bu, bi = truth.user_bias.to(device), truth.item_bias.to(device)
    out = torch.empty(len(user_idx), dtype=torch.float32, device=device)
    for start in range(0, len(user_idx), _CHUNK):                          # chunks, not ratings
        u, i = user_idx[start:start + _CHUNK], item_idx[start:start + _CHUNK]   # (c,)
        r = truth.global_mean + bu[u] + bi[i] + (P[u] * Q[i]).sum(1)        # (c,)
        r += truth.noise * torch.randn(len(u), generator=gen, device=device)
        out[start:start + len(u)] = r.round_().clamp_(1.0, 5.0)
    return out
