"""Tests for mfutils.synthetic: exact counts, distinct pairs, MovieLens-like shape, and seeding."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mfutils.synthetic import SIZES, SyntheticTruth, synthetic


@pytest.fixture(scope="module")
def generated():
    return synthetic(500, 1000, 20_000, n_factors=8, seed=0)


def _top_decile_share(idx: torch.Tensor, n: int) -> float:
    counts = torch.bincount(idx, minlength=n).sort(descending=True).values
    return (counts[: n // 10].sum() / counts.sum()).item()


def test_exactly_n_ratings_on_distinct_pairs_with_ids_0_to_n(generated):
    data, _ = generated
    assert (data.n_ratings, data.n_users, data.n_items, data.name) == (20_000, 500, 1000, "synthetic")
    keys = data.user_idx * data.n_items + data.item_idx
    assert torch.unique(keys).numel() == 20_000
    assert np.array_equal(data.user_ids, np.arange(500)) and data.user_ids.dtype == np.int64
    assert data.user_idx.dtype == data.item_idx.dtype == data.timestamp.dtype == torch.int64


def test_ratings_are_whole_stars_with_a_movielens_like_mean_and_spread(generated):
    rating = generated[0].rating
    assert rating.dtype == torch.float32
    assert set(rating.unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 3.3 < rating.mean().item() < 3.7 and 0.95 < rating.std().item() < 1.25


def test_item_popularity_and_user_activity_follow_a_power_law(generated):
    data, _ = generated
    assert _top_decile_share(data.item_idx, data.n_items) > 0.35          # uniform would give 0.10
    assert _top_decile_share(data.user_idx, data.n_users) > 0.2


def test_zero_exponents_give_near_uniform_activity():
    data, _ = synthetic(500, 1000, 20_000, popularity_exponent=0.0, activity_exponent=0.0, seed=0)
    assert _top_decile_share(data.item_idx, 1000) < 0.15 and _top_decile_share(data.user_idx, 500) < 0.15


def test_truth_has_the_documented_shapes_and_is_frozen(generated):
    _, truth = generated
    assert isinstance(truth, SyntheticTruth)
    assert truth.user_factors.shape == (500, 8) and truth.item_factors.shape == (1000, 8)
    assert truth.user_bias.shape == (500,) and truth.item_bias.shape == (1000,)
    assert truth.user_factors.dtype == torch.float32 and isinstance(truth.global_mean, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        truth.global_mean = 0.0


def test_without_noise_ratings_are_the_rounded_clipped_truth():
    data, t = synthetic(50, 80, 600, noise=0.0, seed=3)
    u, i = data.user_idx, data.item_idx
    exact = t.global_mean + t.user_bias[u] + t.item_bias[i] + (t.user_factors[u] * t.item_factors[i]).sum(1)
    assert torch.equal(data.rating, exact.round().clamp(1, 5))


def test_same_seed_gives_identical_data_and_another_seed_different_data():
    (a, ta), (b, tb), (c, tc) = (synthetic(100, 200, 3000, seed=s) for s in (5, 5, 6))
    for x, y in [(a.user_idx, b.user_idx), (a.item_idx, b.item_idx), (a.rating, b.rating),
                 (a.timestamp, b.timestamp), (ta.user_factors, tb.user_factors)]:
        assert torch.equal(x, y)
    assert not torch.equal(a.item_idx, c.item_idx) and not torch.equal(ta.item_bias, tc.item_bias)


def test_generation_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    synthetic(20, 30, 100, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_half_full_matrix_still_gets_exactly_n_distinct_pairs():
    data, _ = synthetic(10, 10, 50, seed=0)
    assert torch.unique(data.user_idx * 10 + data.item_idx).numel() == 50


def test_two_million_ratings_generate_quickly():
    data, _ = synthetic(20_000, 5_000, 2_000_000, n_factors=4, seed=0)
    assert data.n_ratings == 2_000_000


def test_presets_unpack_into_synthetic():
    assert SIZES["ml-20m"] == (138_493, 26_744, 20_000_263)
    data, _ = synthetic(*SIZES["ml-100k"], n_factors=2)
    assert (data.n_users, data.n_items, data.n_ratings) == SIZES["ml-100k"] == (943, 1682, 100_000)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_users=10, n_items=10, n_ratings=51), r"n_ratings=51 is more than half of the n_users\*n_items=100 "
                                                 r"possible .* at most 50 ratings"),
    (dict(n_users=0, n_items=10, n_ratings=5), r"n_users must be a positive int; got 0"),
    (dict(n_users=10, n_items=10, n_ratings=5.0), r"n_ratings must be a positive int; got 5\.0"),
    (dict(n_users=10, n_items=10, n_ratings=5, n_factors=True), r"n_factors must be a positive int; got True"),
    (dict(n_users=10, n_items=10, n_ratings=5, noise=-1.0), r"noise must be a finite number >= 0; got -1\.0"),
    (dict(n_users=10, n_items=10, n_ratings=5, popularity_exponent=float("nan")), r"popularity_exponent must"),
])
def test_bad_arguments_raise_with_the_value_and_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=rf"synthetic\(\): {match}"):
        synthetic(**kwargs)


def test_generation_runs_on_every_device_and_returns_cpu_tensors(device):
    data, truth = synthetic(50, 80, 600, seed=0, device=device)
    assert data.n_ratings == 600 and data.rating.device.type == "cpu" and truth.item_bias.device.type == "cpu"
    assert torch.unique(data.user_idx * 80 + data.item_idx).numel() == 600
    reference = synthetic(50, 80, 600, seed=0)[1]
    assert torch.equal(truth.user_factors, reference.user_factors)          # the truth is device-independent
