"""Recommendations: top-k with exclusion, ranking metrics (against scikit-learn and by hand), similar items, fold-in."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import ndcg_score
from torch.testing import assert_close

from mfutils import recommend
from mfutils.data import RatingData
from mfutils.models import BiasedMF
from mfutils.synthetic import synthetic
from mfutils.train import fit_als


def _ratings(users, items, ratings, n_users, n_items) -> RatingData:
    n = len(ratings)
    return RatingData(user_idx=torch.tensor(users), item_idx=torch.tensor(items),
                      rating=torch.tensor(ratings, dtype=torch.float32), timestamp=torch.zeros(n, dtype=torch.int64),
                      user_ids=np.arange(n_users), item_ids=np.arange(n_items), name="test")


@pytest.fixture(scope="module")
def trained() -> tuple[BiasedMF, RatingData]:
    data, _ = synthetic(80, 50, 1500, n_factors=3, seed=3)
    model = BiasedMF(data.n_users, data.n_items, 4, global_mean=float(data.rating.mean()), seed=0)
    fit_als(model, data, reg=0.1, n_epochs=5, device="cpu")
    return model, data


def test_scores_are_the_model_predictions_for_every_pair(trained):
    model, _ = trained
    users = torch.tensor([3, 0, 7])
    scores = recommend.score_users(model, users)
    pairs_u, pairs_i = users.repeat_interleave(model.n_items), torch.arange(model.n_items).repeat(3)
    assert_close(scores.reshape(-1), model(pairs_u, pairs_i).detach())


def test_top_k_equals_sorting_each_users_unrated_items(trained, monkeypatch):
    model, data = trained
    monkeypatch.setattr(recommend, "_USER_CHUNK", 7)  # several chunks
    items, scores = recommend.top_k(model, 5, exclude=data)
    assert items.shape == scores.shape == (model.n_users, 5)
    for u in range(model.n_users):
        rated = set(data.item_idx[data.user_idx == u].tolist())
        with torch.no_grad():
            pred = model(torch.full((model.n_items,), u), torch.arange(model.n_items))
        expected = sorted((i for i in range(model.n_items) if i not in rated), key=lambda i: (-pred[i].item(), i))[:5]
        assert items[u].tolist() == expected
        assert not rated & set(items[u].tolist())
        assert_close(scores[u], pred[expected])


def test_mask_rated_hides_exactly_the_rated_pairs_of_the_given_users():
    rated = _ratings([0, 0, 2, 3], [1, 4, 0, 4], [4.0, 3.0, 5.0, 1.0], 4, 5)
    scores = recommend.mask_rated(torch.zeros(2, 5), rated, users=torch.tensor([3, 0]))
    assert torch.isneginf(scores).nonzero().tolist() == [[0, 4], [1, 1], [1, 4]]
    with pytest.raises(ValueError, match=r"scores must have shape \(len\(users\), n_items\) = \(4, 5\)"):
        recommend.mask_rated(torch.zeros(4, 6), rated)
    expected = r"users must be numbers in 0..3 \(the users of rated\); got values from 0 to 7"
    with pytest.raises(ValueError, match=expected):
        recommend.mask_rated(torch.zeros(2, 5), rated, users=torch.tensor([7, 0]))


def test_ties_go_to_the_lower_item_and_exhausted_lists_are_padded():
    scores = torch.tensor([[1.0, 2.0, 2.0, -torch.inf], [-torch.inf, -torch.inf, 0.5, -torch.inf]])
    items, top = recommend.top_k_from_scores(scores, 3)
    assert items.tolist() == [[1, 2, 0], [2, -1, -1]]
    assert top[1, 1:].tolist() == [-math.inf, -math.inf]


def test_top_k_rejects_bad_arguments(trained):
    model, data = trained
    with pytest.raises(ValueError, match="k must be a positive integer; got 0"):
        recommend.top_k(model, 0)
    with pytest.raises(ValueError, match=r"users must be numbers in 0\.\.79 .* Use fold_in\(\)"):
        recommend.top_k(model, 3, users=torch.tensor([80]))
    other = _ratings([0], [0], [3.0], 5, 5)
    with pytest.raises(ValueError, match="exclude has 5 users and 5 items but the model has 80 and 50"):
        recommend.top_k(model, 3, exclude=other)


def test_metrics_on_a_hand_checked_case():
    items = torch.tensor([[4, 1, 7], [2, 3, 5], [0, 1, 2], [9, -1, -1]])
    relevant = [{1, 7, 8}, {6}, set(), {9}]
    report = recommend.ranking_metrics(items, relevant, n_items=10)
    # user 0: hits at ranks 2 and 3 of 3 relevant; user 1: none; user 2: no relevant items (skipped); user 3: rank 1
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))
    assert report.n_users == 3 and report.n_skipped == 1 and report.k == 3
    assert report.precision == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert report.recall == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert report.hit_rate == pytest.approx(2 / 3)
    assert report.ndcg == pytest.approx((ndcg0 + 0 + 1) / 3)
    assert report.coverage == pytest.approx(len({4, 1, 7, 2, 3, 5, 0, 9}) / 10)


@pytest.mark.parametrize("seed", range(5))
def test_ndcg_matches_scikit_learn_on_random_cases(seed):
    gen = np.random.default_rng(seed)
    n_users, n_items, k = 30, 40, 10
    relevance = (gen.random((n_users, n_items)) < 0.15).astype(float)
    relevance[relevance.sum(1) == 0, gen.integers(n_items)] = 1.0  # scikit-learn scores such users 0; we skip them
    scores = gen.random((n_users, n_items))  # continuous: no ties
    items, _ = recommend.top_k_from_scores(torch.tensor(scores), k)
    relevant = [set(np.flatnonzero(row).tolist()) for row in relevance]
    report = recommend.ranking_metrics(items, relevant, n_items)
    assert report.ndcg == pytest.approx(ndcg_score(relevance, scores, k=k), abs=1e-12)


def test_relevant_items_respect_the_threshold():
    test = _ratings([0, 0, 1, 2], [3, 4, 3, 1], [5.0, 2.0, 4.0, 1.0], 4, 5)
    assert recommend.relevant_items(test, torch.tensor([0, 1, 2, 3])) == [{3, 4}, {3}, {1}, set()]
    assert recommend.relevant_items(test, torch.tensor([0, 2]), threshold=4) == [{3}, set()]


def test_similar_items_rank_by_cosine_and_leave_the_item_out(trained):
    model, _ = trained
    items, sims = recommend.similar_items(model, 5, k=4)
    q = model.item_factors.weight.detach()
    cos = (q @ q[5]) / (q.norm(dim=1) * q[5].norm())
    cos[5] = -2
    assert items.tolist() == torch.argsort(cos, descending=True, stable=True)[:4].tolist()
    assert_close(sims, cos[items])
    with_bias, _ = recommend.similar_items(model, 5, k=4, with_bias=True)
    assert 5 not in with_bias.tolist()
    allowed = torch.ones(model.n_items, dtype=torch.bool)
    allowed[items[:2]] = False
    filtered, _ = recommend.similar_items(model, 5, k=2, allowed=allowed)
    assert filtered.tolist() == items[2:4].tolist()
    with pytest.raises(ValueError, match=r"item must be a number in 0\.\.49; got 50"):
        recommend.similar_items(model, 50)


def test_fold_in_equals_the_als_user_step_for_a_known_user(trained):
    model, data = trained
    u = 4
    mine = data.user_idx == u
    p, b = recommend.fold_in(model, data.item_idx[mine], data.rating[mine], reg=0.1)
    # closed form: ridge regression of r - mu - b_i on (q_i, 1) with ridge reg * n_u
    Y = torch.cat([model.item_factors.weight[data.item_idx[mine]], torch.ones(int(mine.sum()), 1)], 1).detach()
    t = data.rating[mine] - model.global_mean - model.item_bias.weight[data.item_idx[mine], 0].detach()
    closed = torch.linalg.solve(Y.T @ Y + 0.1 * int(mine.sum()) * torch.eye(Y.shape[1]), Y.T @ t)
    assert_close(torch.cat([p, torch.tensor([b])]), closed, atol=1e-5, rtol=1e-4)


def test_fold_in_rejects_bad_input(trained):
    model, _ = trained
    for items, ratings, message in [([], [], "non-empty"), ([1, 1], [3.0, 4.0], "distinct"),
                                    ([50], [3.0], r"0\.\.49")]:
        with pytest.raises(ValueError, match=message):
            recommend.fold_in(model, torch.tensor(items, dtype=torch.int64), torch.tensor(ratings), reg=0.1)
    with pytest.raises(ValueError, match="reg must be > 0"):
        recommend.fold_in(model, torch.tensor([1]), torch.tensor([3.0]), reg=0.0)
