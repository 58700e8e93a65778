r"""From predicted ratings to recommendations: top-k lists, ranking metrics, similar items, new users.

A rating model scores every (user, item) pair, :math:`\hat r_{ui} = \mu + b_u + b_i + p_u^\top q_i`.
A recommender shows each user the ``k`` items with the highest scores among those the user has not
rated yet. This module computes those lists for many users at once (one matrix product per chunk of
users, on the model's device), measures them against held-out ratings, finds items whose factors point
the same way, and places a new user from a few ratings without retraining.

**Ties.** Items with equal scores are ranked by increasing item number (a stable sort), so every list is
reproducible. **Excluded items** (already rated) never appear; a list has ``min(k, n_items)`` places, and
where fewer items remain the rest hold item ``-1`` and score ``-inf``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mfutils.data import RatingData
from mfutils.models import BiasedMF
from mfutils.train import _by_row, als_half_step

__all__ = ["score_users", "top_k", "top_k_from_scores", "mask_rated", "RankingReport", "ranking_metrics",
           "relevant_items", "similar_items", "fold_in"]

_USER_CHUNK = 1024  # users scored per matrix product in top_k: bounds the (chunk, n_items) score block


def _users(model: BiasedMF, users: torch.Tensor | None) -> torch.Tensor:
    if users is None:
        return torch.arange(model.n_users, device=model.device)
    users = torch.as_tensor(users, dtype=torch.int64).to(model.device)
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= model.n_users):
        raise ValueError(f"users must be numbers in 0..{model.n_users - 1} (the model's users); got values from "
                         f"{int(users.min())} to {int(users.max())}. Use fold_in() for a user the model has not seen.")
    return users


@torch.no_grad()
def score_users(model: BiasedMF, users: torch.Tensor | None = None) -> torch.Tensor:
    r"""Predicted ratings of every item for ``users``: :math:`\mu + b_u + b_i + P_{\text{users}} Q^\top`.

    Args:
        model: a trained :class:`~mfutils.models.BiasedMF`.
        users: int64 user numbers, shape ``(m,)``; ``None`` for all users.
    Returns:
        float32 scores, shape ``(m, n_items)``, on the model's device.
    """
    users = _users(model, users)
    scores = model.user_factors(users) @ model.item_factors.weight.T + model.global_mean  # (m, n_items)
    if model.user_bias is not None:
        scores += model.user_bias(users) + model.item_bias.weight.T  # (m, 1) and (1, n_items) broadcast
    return scores


def top_k_from_scores(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring columns of each row, ties by increasing column number; ``-inf`` marks excluded.

    Args:
        scores: float, shape ``(m, n_items)``; ``-inf`` for items that must not be recommended.
        k: list length, ``1 <= k``.
    Returns:
        ``(items, top_scores)``, shapes ``(m, min(k, n_items))``: int64 item numbers (``-1`` where fewer
        than ``k`` items were allowed) and their scores.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    top_scores, items = torch.sort(scores, dim=1, descending=True, stable=True)  # ties: lower item first
    top_scores, items = top_scores[:, :k], items[:, :k]
    return torch.where(torch.isneginf(top_scores), -1, items), top_scores


@torch.no_grad()
def top_k(model: BiasedMF, k: int = 10, *, exclude: RatingData | None = None,
          users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` recommendations for many users at once, leaving out the items each has already rated.

    Scores one chunk of users at a time with one matrix product (:func:`score_users`), sets the pairs in
    ``exclude`` to ``-inf`` and sorts (:func:`top_k_from_scores`).

    Args:
        model: a trained :class:`~mfutils.models.BiasedMF`.
        k: list length.
        exclude: ratings whose (user, item) pairs must not be recommended, usually the training set.
        users: int64 user numbers, shape ``(m,)``; ``None`` for all users.
    Returns:
        ``(items, scores)``, int64 and float32, shape ``(m, min(k, n_items))``, on the model's device.
    """
    users = _users(model, users)
    seen = None
    if exclude is not None:
        if exclude.n_users != model.n_users or exclude.n_items != model.n_items:
            raise ValueError(f"exclude has {exclude.n_users} users and {exclude.n_items} items but the model has "
                             f"{model.n_users} and {model.n_items}; pass ratings numbered like the training data")
        _, crow, cols = _by_row(exclude.user_idx.to(model.device), exclude.item_idx.to(model.device), model.n_users)
        seen = (crow, cols)
    out_items, out_scores = [], []
    for chunk in users.split(_USER_CHUNK):  # (c,)
        scores = score_users(model, chunk)  # (c, n_items)
        if seen is not None:
            _mask(scores, chunk, *seen)
        items, top = top_k_from_scores(scores, k)
        out_items.append(items)
        out_scores.append(top)
    return torch.cat(out_items), torch.cat(out_scores)


def _mask(scores: torch.Tensor, users: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor) -> None:
    """Set ``scores[row, item] = -inf`` for every item that ``users[row]`` has in the CSR arrays ``crow, cols``."""
    starts, counts = crow[users], crow[users + 1] - crow[users]  # (c,)
    rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)  # (nnz_c,)
    entries = torch.arange(len(rows), device=users.device) + (starts - torch.cumsum(counts, 0) + counts)[rows]
    scores[rows, cols[entries]] = -torch.inf


def mask_rated(scores: torch.Tensor, rated: RatingData, users: torch.Tensor | None = None) -> torch.Tensor:
    """``scores`` (``(m, n_items)``, rows for ``users``, default all) with every pair in ``rated`` set to ``-inf``.

    For rankings that do not come from a model, such as a popularity or random baseline. Works in place
    and returns ``scores``.
    """
    users = torch.arange(scores.shape[0]) if users is None else torch.as_tensor(users, dtype=torch.int64)
    if scores.shape != (len(users), rated.n_items):
        raise ValueError(f"scores must have shape (len(users), n_items) = ({len(users)}, {rated.n_items}); "
                         f"got {tuple(scores.shape)}")
    if users.numel() and (int(users.min()) < 0 or int(users.max()) >= rated.n_users):
        raise ValueError(f"users must be numbers in 0..{rated.n_users - 1} (the users of rated); got values from "
                         f"{int(users.min())} to {int(users.max())}")
    users = users.to(scores.device)
    _, crow, cols = _by_row(rated.user_idx.to(scores.device), rated.item_idx.to(scores.device), rated.n_users)
    _mask(scores, users, crow, cols)
    return scores


def relevant_items(test: RatingData, users: torch.Tensor, *, threshold: float | None = None) -> list[set[int]]:
    """For each of ``users``, the set of items it rated in ``test`` (at least ``threshold`` stars, if given)."""
    keep = torch.ones(test.n_ratings, dtype=torch.bool) if threshold is None else test.rating >= threshold
    sets: dict[int, set[int]] = {}
    for u, i in zip(test.user_idx[keep].tolist(), test.item_idx[keep].tolist()):
        sets.setdefault(u, set()).add(i)
    return [sets.get(int(u), set()) for u in torch.as_tensor(users).tolist()]


@dataclass(frozen=True)
class RankingReport:
    r"""Ranking metrics of top-``k`` lists, averaged over the users that have at least one relevant item.

    Attributes:
        k: list length.
        precision, recall, ndcg, hit_rate: means over the evaluated users (see :func:`ranking_metrics`).
        coverage: fraction of the catalogue that appears in at least one list (all users' lists).
        n_users: users evaluated (with at least one relevant item); n_skipped: users without any.
    """

    k: int
    precision: float
    recall: float
    ndcg: float
    hit_rate: float
    coverage: float
    n_users: int
    n_skipped: int

    def as_dict(self) -> dict[str, float]:
        return {f"precision@{self.k}": self.precision, f"recall@{self.k}": self.recall, f"ndcg@{self.k}": self.ndcg,
                f"hit rate@{self.k}": self.hit_rate, "coverage": self.coverage}


def ranking_metrics(items: torch.Tensor, relevant: list[set[int]], n_items: int) -> RankingReport:
    r"""Precision, recall, NDCG and hit rate at ``k`` of top-``k`` lists against held-out relevant items.

    For a user with relevant set :math:`R` (non-empty) and list :math:`i_1, \dots, i_k`, with
    :math:`h_j = 1` if :math:`i_j \in R`:

    - precision@k :math:`= \frac1k \sum_j h_j`; recall@k :math:`= \frac{1}{|R|} \sum_j h_j`;
    - hit rate@k :math:`= 1` if any :math:`h_j = 1`;
    - NDCG@k :math:`= \mathrm{DCG}/\mathrm{IDCG}` with binary gains, :math:`\mathrm{DCG} = \sum_j h_j / \log_2(j + 1)`
      and IDCG the same for a list that puts :math:`\min(|R|, k)` relevant items first.

    Users with an empty :math:`R` have no defined recall or NDCG; they are left out of every mean and
    counted in ``n_skipped``. Padding (item ``-1``) is never relevant. Coverage counts the distinct
    items in all lists, padding excluded, over ``n_items``.

    Args:
        items: int64 top-``k`` lists, shape ``(m, k)`` (any device).
        relevant: ``m`` sets of relevant item numbers, aligned with the rows of ``items``.
        n_items: catalogue size, for coverage.
    Returns:
        A :class:`RankingReport`.
    """
    if items.ndim != 2 or len(relevant) != items.shape[0]:
        raise ValueError(f"items must be (m, k) with one relevant set per row; got items {tuple(items.shape)} and "
                         f"{len(relevant)} sets")
    m, k = items.shape
    lists = items.cpu()
    counts = torch.tensor([len(r) for r in relevant], dtype=torch.float64)  # (m,)
    hits = torch.tensor([[int(i) in r for i in row] for row, r in zip(lists.tolist(), relevant)],
                        dtype=torch.float64).reshape(m, k)  # (m, k)
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))  # (k,)
    dcg = hits @ discount  # (m,)
    ideal = torch.cumsum(discount, 0)[(counts.clamp(min=1, max=k) - 1).long()]  # (m,)
    n_hits = hits.sum(1)
    evaluated = counts > 0
    n_eval = int(evaluated.sum())
    shown = lists[lists >= 0].unique()

    def mean(values: torch.Tensor) -> float:
        return float(values[evaluated].mean()) if n_eval else float("nan")

    return RankingReport(k=k, precision=mean(n_hits / k), recall=mean(n_hits / counts.clamp(min=1)),
                         ndcg=mean(dcg / ideal), hit_rate=mean((n_hits > 0).double()),
                         coverage=len(shown) / n_items, n_users=n_eval, n_skipped=m - n_eval)


@torch.no_grad()
def similar_items(model: BiasedMF, item: int, k: int = 10, *, with_bias: bool = False,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The ``k`` items whose factor vectors have the highest cosine similarity with ``item``'s.

    :math:`\cos(q_i, q_j) = q_i^\top q_j / (\lVert q_i\rVert \lVert q_j\rVert)`; with ``with_bias`` the
    vectors are :math:`(q_i, b_i)`, so items that are liked or disliked alike also count as similar.
    The item itself is left out, and so is any item where ``allowed`` (bool, ``(n_items,)``) is false, for
    instance items with too few ratings for their factors to mean much; ties by increasing item number.

    Returns:
        ``(items, similarities)``, shapes ``(min(k, n),)`` where ``n`` is the number of candidate items.
    """
    if not 0 <= item < model.n_items:
        raise ValueError(f"item must be a number in 0..{model.n_items - 1}; got {item}")
    vectors = model.item_factors.weight
    if with_bias:
        if model.item_bias is None:
            raise ValueError("with_bias=True needs a model with biases")
        vectors = torch.cat([vectors, model.item_bias.weight], 1)
    unit = torch.nn.functional.normalize(vectors, dim=1)  # (n_items, d)
    sims = unit @ unit[item]  # (n_items,)
    sims[item] = -torch.inf
    if allowed is not None:
        sims[~allowed.to(sims.device)] = -torch.inf
    found, top = top_k_from_scores(sims[None, :], k)
    return found[0], top[0]


@torch.no_grad()
def fold_in(model: BiasedMF, items: torch.Tensor, ratings: torch.Tensor, reg: float) -> tuple[torch.Tensor, float]:
    r"""Factors and bias of a new user from a few ratings, the item side held fixed: one ridge solve.

    Minimises :math:`\sum_{i} (r_i - \mu - b_i - b - p^\top q_i)^2 + \lambda n (\lVert p\rVert^2 + b^2)` over
    :math:`(p, b)`, the user step of :func:`mfutils.train.fit_als` for this one user (same objective, same
    weighted ridge :math:`\lambda n`).

    Args:
        model: a trained model with biases.
        items: int64 item numbers the new user rated, shape ``(n,)``, no repeats.
        ratings: their ratings, shape ``(n,)``.
        reg: :math:`\lambda > 0`, usually the one the model was trained with.
    Returns:
        ``(p, b)``: float32 factors of shape ``(n_factors,)`` on the model's device, and the bias.
    """
    items = torch.as_tensor(items, dtype=torch.int64).to(model.device)
    ratings = torch.as_tensor(ratings, dtype=torch.float32).to(model.device)
    if model.user_bias is None:
        raise ValueError("fold_in() needs a model with biases")
    if items.ndim != 1 or items.shape != ratings.shape or items.numel() == 0:
        raise ValueError(f"items and ratings must be two non-empty vectors of one length; got {tuple(items.shape)} "
                         f"and {tuple(ratings.shape)}")
    if int(items.min()) < 0 or int(items.max()) >= model.n_items or len(items.unique()) != len(items):
        raise ValueError(f"items must be distinct numbers in 0..{model.n_items - 1}")
    if not reg > 0:
        raise ValueError(f"reg must be > 0; got {reg!r}")
    order = torch.argsort(items)
    items, ratings = items[order], ratings[order]
    target = ratings - model.global_mean - model.item_bias.weight[items, 0]  # (n,)
    crow = torch.tensor([0, len(items)], device=model.device)
    ridge = torch.full((1, model.n_factors + 1), reg * len(items), device=model.device)
    solved = als_half_step(crow, items, target, model.item_factors.weight, ridge, ones=True)[0]  # (k + 1,)
    return solved[:-1], float(solved[-1])
