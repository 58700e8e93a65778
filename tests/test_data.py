"""Tests for mfutils.data: RatingData construction and the seeded splits."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mfutils.data import RatingData, from_arrays, per_user_split, random_split, temporal_split


@pytest.fixture
def ratings() -> RatingData:
    """40 users with 1..60 ratings each on distinct items; user 0 has exactly one rating."""
    gen = np.random.default_rng(7)
    counts = np.concatenate([[1], gen.integers(2, 60, size=39)])        # (40,)
    users = np.repeat(np.arange(40) * 10 + 3, counts)                    # raw ids 3, 13, ...
    items = np.concatenate([gen.choice(200, size=c, replace=False) for c in counts]) + 1000
    stars = gen.integers(1, 6, size=len(users)).astype(np.float32)
    times = gen.integers(0, 50, size=len(users))                        # many ties on purpose
    return from_arrays(users, items, stars, times, name="toy")


def _keys(data: RatingData) -> np.ndarray:
    return (data.user_idx * data.n_items + data.item_idx).numpy()


def _frame(data: RatingData) -> pd.DataFrame:
    return data.to_frame().sort_values(["user_id", "item_id"]).reset_index(drop=True)


SPLITS = {"random": lambda d, **kw: random_split(d, 0.25, **kw),
          "per_user": lambda d, **kw: per_user_split(d, 0.25, **kw),
          "temporal": lambda d, **kw: temporal_split(d, 0.25)}


@pytest.mark.parametrize("split", SPLITS)
def test_split_is_disjoint_covers_the_data_and_keeps_the_id_maps(ratings, split):
    train, test = SPLITS[split](ratings)
    assert np.intersect1d(_keys(train), _keys(test)).size == 0
    both = pd.concat([_frame(train), _frame(test)]).sort_values(["user_id", "item_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, _frame(ratings))                 # ratings and timestamps travel along
    for part in (train, test):
        assert part.user_ids is ratings.user_ids and part.item_ids is ratings.item_ids


@pytest.mark.parametrize("split", ["random", "per_user"])
def test_same_seed_gives_the_same_split_and_another_seed_a_different_one(ratings, split):
    a, b, c = (SPLITS[split](ratings, seed=s)[1] for s in (0, 0, 1))
    assert np.array_equal(_keys(a), _keys(b))
    assert not np.array_equal(_keys(a), _keys(c))


def test_splits_leave_the_global_random_state_alone(ratings):
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    random_split(ratings, seed=3)
    per_user_split(ratings, seed=3)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)


def test_random_split_holds_out_the_rounded_fraction(ratings):
    _, test = random_split(ratings, 0.3, seed=0)
    assert test.n_ratings == round(0.3 * ratings.n_ratings)


def test_per_user_split_keeps_every_user_with_two_ratings_in_train_and_test(ratings):
    train, test = per_user_split(ratings, 0.25, seed=0)
    n_u = np.bincount(ratings.user_idx.numpy(), minlength=ratings.n_users)
    n_test = np.bincount(test.user_idx.numpy(), minlength=ratings.n_users)
    n_train = np.bincount(train.user_idx.numpy(), minlength=ratings.n_users)
    expected = np.clip(np.floor(0.25 * n_u + 0.5), 1, n_u - 1).astype(int)
    expected[n_u < 2] = 0
    assert np.array_equal(n_test, expected)
    assert (n_train[n_u >= 2] >= 1).all() and (n_test[n_u >= 2] >= 1).all()
    assert n_train[0] == 1 and n_test[0] == 0                            # the one-rating user stays in train


def test_per_user_split_never_holds_out_everything_even_for_a_large_fraction(ratings):
    train, test = per_user_split(ratings, 0.99, seed=0)
    n_train = np.bincount(train.user_idx.numpy(), minlength=ratings.n_users)
    assert (n_train >= 1).all()


def test_temporal_split_holds_out_each_users_latest_ratings(ratings):
    train, test = temporal_split(ratings, 0.25)
    tr, te = train.to_frame(), test.to_frame()
    latest_train = tr.groupby("user_idx")["timestamp"].max()
    earliest_test = te.groupby("user_idx")["timestamp"].min()
    assert (earliest_test >= latest_train.reindex(earliest_test.index)).all()
    assert np.array_equal(_keys(test), _keys(temporal_split(ratings, 0.25)[1]))


def test_temporal_split_breaks_timestamp_ties_by_original_order():
    data = from_arrays([1, 1, 1, 1], [10, 20, 30, 40], [1, 2, 3, 4], [5, 9, 9, 1])
    train, test = temporal_split(data, 0.5)
    assert test.to_frame()["item_id"].tolist() == [20, 30]
    train, test = temporal_split(data, 0.25)
    assert test.to_frame()["item_id"].tolist() == [30]                   # last of the two at t=9


@pytest.mark.parametrize("test_frac", [0, 1, 1.5, -0.2, float("nan"), "0.2", True, None])
@pytest.mark.parametrize("split", SPLITS)
def test_bad_test_frac_raises_with_the_value_and_a_fix(ratings, split, test_frac):
    func = {"random": random_split, "per_user": per_user_split, "temporal": temporal_split}[split]
    with pytest.raises(ValueError, match=rf"{func.__name__}\(\): test_frac must be a number strictly "
                                         r"between 0 and 1; got .*e\.g\. test_frac=0\.2"):
        func(ratings, test_frac)


@pytest.mark.parametrize("func", [random_split, per_user_split])
def test_non_int_seed_raises(ratings, func):
    with pytest.raises(TypeError, match=rf"{func.__name__}\(\): seed must be an int; got 0.5"):
        func(ratings, seed=0.5)


def test_splitting_something_else_than_rating_data_raises():
    with pytest.raises(TypeError, match=r"random_split\(\): data must be a RatingData; got DataFrame"):
        random_split(pd.DataFrame({"rating": [1.0, 2.0]}))


def test_splitting_a_single_rating_raises():
    with pytest.raises(ValueError, match=r"per_user_split\(\): data has 1 rating\(s\); a split needs at least 2"):
        per_user_split(from_arrays([1], [2], [3.0]))


def test_from_arrays_wants_one_timestamp_per_rating():
    with pytest.raises(ValueError, match=r"from_arrays\(\): timestamps must have one entry per rating \(3\); got 2"):
        from_arrays([1, 2, 3], [1, 1, 2], [4.0, 3.0, 5.0], timestamps=[10, 20])


def test_from_arrays_copies_read_only_pandas_columns():
    frame = pd.DataFrame({"u": [1, 2], "i": [3, 4], "r": np.array([4.0, 5.0], np.float32), "t": [7, 8]})
    data = from_arrays(frame["u"], frame["i"], frame["r"], frame["t"])
    assert not np.shares_memory(data.rating.numpy(), frame["r"].to_numpy())
    data.rating[0] = 1.0                                                 # writable, and the frame is untouched
    assert frame["r"].tolist() == [4.0, 5.0]
