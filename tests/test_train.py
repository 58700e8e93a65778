"""Trainers: a hand-written step, equivalences, knobs, seeds, early stopping, errors, devices, accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mfutils import bpmf
from mfutils import train as trainers
from mfutils.bpmf import _posterior_mean, fit_bpmf
from mfutils.data import RatingData
from mfutils.metrics import rmse
from mfutils.models import BiasedMF
from mfutils.synthetic import synthetic
from mfutils.train import (History, als_half_step, fit_als, fit_sgd, make_generator, resolve_device,
                           seed_everything)


def _ratings(user_idx, item_idx, rating, n_users, n_items) -> RatingData:
    n = len(rating)
    return RatingData(user_idx=torch.as_tensor(user_idx), item_idx=torch.as_tensor(item_idx),
                      rating=torch.as_tensor(rating, dtype=torch.float32), timestamp=torch.zeros(n, dtype=torch.int64),
                      user_ids=np.arange(n_users), item_ids=np.arange(n_items), name="test")


def _low_rank(n_users=30, n_items=20, rank=2, frac=0.6, seed=0) -> tuple[RatingData, RatingData]:
    """Ratings 3 + P Q^T with no noise; the observed fraction ``frac`` is train, the rest is test."""
    gen = torch.Generator().manual_seed(seed)
    R = 3 + torch.randn(n_users, rank, generator=gen) @ torch.randn(n_items, rank, generator=gen).T
    seen = torch.rand(n_users, n_items, generator=gen) < frac
    parts = [torch.nonzero(m, as_tuple=True) for m in (seen, ~seen)]
    return tuple(_ratings(u, i, R[u, i], n_users, n_items) for u, i in parts)


@pytest.fixture
def data() -> tuple[RatingData, RatingData]:
    return _low_rank()


def _model(train: RatingData, n_factors: int = 2, seed: int = 0, **kwargs) -> BiasedMF:
    return BiasedMF(train.n_users, train.n_items, n_factors, global_mean=float(train.rating.mean()), seed=seed,
                    **kwargs)


def _objective(model: BiasedMF, d: RatingData, reg: float) -> float:
    with torch.no_grad():
        err2 = (d.rating - model(d.user_idx, d.item_idx)) ** 2
        return float((err2 + reg * model.penalty(d.user_idx, d.item_idx)).mean())


# ---------------------------------------------------------------- SGD: one step by hand

def test_hand_written_sgd_step_equals_fit_sgd(data):
    train, _ = data
    lr, reg, n = 0.7, 0.05, train.n_ratings
    model = _model(train, seed=3)
    u, i, r = train.user_idx, train.item_idx, train.rating
    P, Q = model.user_factors.weight.detach().clone(), model.item_factors.weight.detach().clone()
    bu, bi = model.user_bias.weight.detach()[:, 0].clone(), model.item_bias.weight.detach()[:, 0].clone()
    err = r - (model.global_mean + bu[u] + bi[i] + (P[u] * Q[i]).sum(1))  # (n,)
    # d/dp_u of mean(e^2 + reg |p_u|^2 ...) summed over u's ratings: (-2 e q_i + 2 reg p_u) / n
    grad_P = torch.zeros_like(P).index_add_(0, u, -2 * err[:, None] * Q[i] + 2 * reg * P[u]) / n
    grad_Q = torch.zeros_like(Q).index_add_(0, i, -2 * err[:, None] * P[u] + 2 * reg * Q[i]) / n
    grad_bu = torch.zeros_like(bu).index_add_(0, u, -2 * err + 2 * reg * bu[u]) / n
    grad_bi = torch.zeros_like(bi).index_add_(0, i, -2 * err + 2 * reg * bi[i]) / n

    fit_sgd(model, train, optimizer="sgd", lr=lr, reg=reg, n_epochs=1, batch_size=n, device="cpu")

    assert_close(model.user_factors.weight, P - lr * grad_P)
    assert_close(model.item_factors.weight, Q - lr * grad_Q)
    assert_close(model.user_bias.weight[:, 0], bu - lr * grad_bu)
    assert_close(model.item_bias.weight[:, 0], bi - lr * grad_bi)


@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_sgd_takes_the_same_steps_as_autograd(biases, sparse):
    train, _ = synthetic(50, 30, 700, seed=2)  # busy rows: many repeat within a batch of 128
    runs = {}
    for fused in (False, True):
        model = BiasedMF(train.n_users, train.n_items, 4, global_mean=3.5, biases=biases, sparse=sparse, seed=1)
        history = fit_sgd(model, train, lr=1.5, reg=0.07, n_epochs=3, batch_size=128, seed=4, device="cpu",
                          fused=fused)
        runs[fused] = (model, history)
    (slow, slow_history), (fast, fast_history) = runs[False], runs[True]
    assert fast_history.method == "sgd-fused" and slow_history.method == "sgd"
    for a, b in zip(fast.parameters(), slow.parameters()):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_close(fast_history.train_loss, slow_history.train_loss, atol=1e-6, rtol=1e-5)
    assert_close(fast_history.train_rmse, slow_history.train_rmse, atol=1e-6, rtol=1e-5)
    assert not torch.equal(fast.user_factors.weight, BiasedMF(train.n_users, train.n_items, 4, seed=1)
                           .user_factors.weight)  # it did train


def test_fused_sgd_in_chunks_takes_the_same_steps(monkeypatch):
    """A batch computed in several chunks (as on the CPU for large batches) is still one step."""
    train, _ = synthetic(50, 30, 700, seed=2)
    runs = []
    for chunk in (1 << 13, 16):  # one chunk per batch of 128, then eight
        monkeypatch.setattr(trainers, "_FUSED_CHUNK", {"cpu": chunk})
        model = BiasedMF(train.n_users, train.n_items, 4, global_mean=3.5, sparse=True, seed=1)
        runs.append((model, fit_sgd(model, train, lr=1.5, reg=0.07, n_epochs=3, batch_size=128, seed=4,
                                    device="cpu", fused=True)))
    (whole, whole_history), (chunked, chunked_history) = runs
    for a, b in zip(chunked.parameters(), whole.parameters()):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert_close(chunked_history.train_loss, whole_history.train_loss, atol=1e-6, rtol=1e-5)


def test_fused_sgd_packs_numbers_that_fit_int32():
    rows = torch.tensor([0, 2 ** 31])
    with pytest.raises(ValueError, match=r"beyond 2\*\*31 - 1: use fused=False"):
        trainers._pack_ratings(rows, torch.zeros(2, dtype=torch.int64), torch.ones(2))


@pytest.mark.parametrize("fused", [False, True])
def test_an_epoch_on_a_device_takes_the_cpu_steps(data, device, fused):
    """Given the same permutation, one epoch on ``device`` updates the model as one on the CPU does."""
    train, _ = data
    perm = torch.randperm(len(train.rating), generator=make_generator(3))
    models = {}
    for where in (torch.device("cpu"), device):
        model = _model(train, device=where)
        u, i, r = (t.to(where) for t in (train.user_idx, train.item_idx, train.rating))
        if fused:
            trainers._fused_sgd_epoch(model, trainers._pack_ratings(u, i, r), perm.to(where), lr=2.0, reg=0.05,
                                      batch_size=32)
        else:
            opt = trainers._make_optimizer(model, "sgd", 2.0)
            trainers._autograd_sgd_epoch(model, opt, u, i, r, perm.to(where), reg=0.05, batch_size=32)
        models[where.type] = model
    for a, b in zip(models[device.type].parameters(), models["cpu"].parameters()):
        assert_close(a.detach().cpu(), b.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_fit_sgd_shuffles_on_its_device_reproducibly(data, device, fused):
    train, _ = data
    runs = []
    for seed in (0, 0, 1):
        model = _model(train, device=device)
        fit_sgd(model, train, n_epochs=2, batch_size=32, seed=seed, device=device, fused=fused)
        runs.append(model.user_factors.weight.detach().cpu())
    assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5)  # GPU sums in atomics: equal up to rounding
    assert not torch.allclose(runs[2], runs[0], atol=1e-3)  # another seed, another order


def test_fused_sgd_trains_bfloat16_tables(data):
    train, _ = data
    model = _model(train).to(torch.bfloat16)
    history = fit_sgd(model, train, lr=2.0, n_epochs=5, batch_size=32, device="cpu", fused=True)
    assert model.user_factors.weight.dtype == torch.bfloat16 and history.train_loss[-1] < history.train_loss[0]


def test_fused_needs_plain_sgd(data):
    train, _ = data
    with pytest.raises(ValueError, match=r"fused=True writes out the plain SGD step; it needs optimizer='sgd'"):
        fit_sgd(_model(train), train, optimizer="adam", fused=True, device="cpu")


def test_fit_sgd_decreases_the_training_objective(data):
    train, _ = data
    model = _model(train)
    before = _objective(model, train, 0.01)
    history = fit_sgd(model, train, lr=2.0, reg=0.01, n_epochs=15, batch_size=32, device="cpu")
    assert history.train_loss[-1] < history.train_loss[0] and _objective(model, train, 0.01) < 0.5 * before


@pytest.mark.parametrize("change", [{"lr": 0.5}, {"reg": 0.3}, {"n_epochs": 3}, {"batch_size": 8},
                                    {"seed": 1}, {"optimizer": "adam"}])
def test_every_sgd_hyperparameter_changes_the_result(data, change):
    train, _ = data
    base = {"optimizer": "sgd", "lr": 1.0, "reg": 0.05, "n_epochs": 2, "batch_size": 16, "seed": 0}
    a, b = _model(train), _model(train)
    fit_sgd(a, train, device="cpu", **base)
    fit_sgd(b, train, device="cpu", **{**base, **change})
    assert not torch.equal(a.user_factors.weight, b.user_factors.weight)


def test_same_seed_gives_identical_factors_and_a_different_seed_different_ones(data):
    train, _ = data
    runs = [_model(train) for _ in range(3)]
    for model, seed in zip(runs, (5, 5, 6)):
        fit_sgd(model, train, n_epochs=2, batch_size=16, seed=seed, device="cpu")
    assert torch.equal(runs[0].item_factors.weight, runs[1].item_factors.weight)
    assert not torch.equal(runs[0].item_factors.weight, runs[2].item_factors.weight)


def test_sparse_embeddings_train_with_sgd_and_adam(data):
    train, _ = data
    for optimizer in ("sgd", "adam"):
        model = _model(train, sparse=True)
        history = fit_sgd(model, train, optimizer=optimizer, n_epochs=3, batch_size=32, device="cpu")
        assert history.train_loss[-1] < history.train_loss[0]


def test_early_stopping_restores_the_best_epoch():
    train, _ = _low_rank(seed=1)
    gen = torch.Generator().manual_seed(0)
    val = _ratings(train.user_idx[:100], train.item_idx[:100] .flip(0), 1 + 4 * torch.rand(100, generator=gen),
                   train.n_users, train.n_items)  # unrelated ratings: fitting train soon hurts them
    model = _model(train, n_factors=8)
    history = fit_sgd(model, train, val=val, lr=0.5, reg=0.0, n_epochs=40, batch_size=16,
                      early_stopping_patience=2, device="cpu")
    assert history.n_epochs < 40 and history.best_epoch == history.n_epochs - 3
    with torch.no_grad():
        restored = rmse(model(val.user_idx, val.item_idx), val.rating)
    assert restored == pytest.approx(min(history.val_rmse), rel=1e-5)


def test_a_diverging_fit_says_to_lower_lr(data):
    train, _ = data
    with pytest.raises(FloatingPointError, match=r"fit_sgd\(\): the training loss became (nan|inf) in epoch \d+; "
                                                 r"lower lr \(now 100.0\)"):
        fit_sgd(_model(train, n_factors=8), train, lr=100.0, reg=0.0, n_epochs=20, batch_size=16, device="cpu")


def test_callback_sees_every_epoch(data):
    train, val = data
    seen = []
    fit_sgd(_model(train), train, val=val, n_epochs=3, device="cpu",
            callback=lambda epoch, history: seen.append((epoch, history.n_epochs, history.val_rmse[-1])))
    assert [s[:2] for s in seen] == [(0, 1), (1, 2), (2, 3)] and all(math.isfinite(s[2]) for s in seen)


def test_progress_bar_shows_unless_tqdm_disable_is_set(data, capsys, monkeypatch):
    train, _ = data
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    fit_sgd(_model(train), train, n_epochs=2, progress=True, device="cpu")
    assert "fit_sgd()" in capsys.readouterr().err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fit_als(_model(train), train, n_epochs=2, progress=True, device="cpu")
    assert capsys.readouterr().err == ""




# ---------------------------------------------------------------- every trainer, on ratings with known factors

@pytest.fixture(scope="module")
def known() -> tuple[RatingData, torch.Tensor]:
    """1,000 ratings from a known rank-2 biased model (little noise), and the model's own noiseless ratings."""
    data, truth = synthetic(60, 40, 1000, n_factors=2, noise=0.1, seed=0)
    u, i = data.user_idx, data.item_idx
    exact = truth.global_mean + truth.user_bias[u] + truth.item_bias[i] + (truth.user_factors[u]
                                                                           * truth.item_factors[i]).sum(1)
    return data, exact


@pytest.mark.parametrize("method", ["sgd", "adam", "als", "bpmf"])
def test_each_method_decreases_the_training_objective_on_synthetic_data_with_known_factors(known, method):
    train, exact = known
    reg = 0.01
    if method == "bpmf":  # its objective is the posterior; sample by sample, the training error must fall
        model, history = fit_bpmf(train, n_factors=2, n_samples=8, n_burnin=2, seed=0, device="cpu")
        first, last = history.train_loss[0], _objective(model, train, 0.0)
        start = float(((train.rating - train.rating.mean()) ** 2).mean())  # all factors and biases zero
        assert last < first < start
    else:
        model = _model(train, n_factors=2)
        start = _objective(model, train, reg)
        if method == "als":
            history = fit_als(model, train, reg=reg, n_epochs=8, device="cpu")
        else:
            history = fit_sgd(model, train, optimizer=method, reg=reg, n_epochs=8, batch_size=64, device="cpu",
                              lr=2.0 if method == "sgd" else 0.05)
        assert history.train_loss[-1] < history.train_loss[0] and _objective(model, train, reg) < 0.5 * start
    with torch.no_grad():  # and the fit moved towards the factors that made the data
        fitted = model(train.user_idx, train.item_idx)
    assert rmse(fitted, exact) < rmse(torch.full_like(exact, float(train.rating.mean())), exact)


def test_minibatch_epochs_see_every_rating_exactly_once(data, monkeypatch):
    train, _ = data
    model, seen, epochs = _model(train), [], []
    forward = model.forward

    def recording(user_idx, item_idx):
        seen.append(user_idx * train.n_items + item_idx)  # one id per (user, item) pair: (B,)
        return forward(user_idx, item_idx)

    monkeypatch.setattr(model, "forward", recording)
    fit_sgd(model, train, n_epochs=3, batch_size=50, device="cpu",
            callback=lambda epoch, history: (epochs.append(list(seen)), seen.clear()))
    everyone = torch.sort(train.user_idx * train.n_items + train.item_idx).values
    assert len(epochs) == 3
    for batches in epochs:
        assert {len(b) for b in batches[:-1]} == {50} and 0 < len(batches[-1]) <= 50
        assert torch.equal(torch.sort(torch.cat(batches)).values, everyone)  # every rating once, none twice
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # and each epoch in a fresh order


# ---------------------------------------------------------------- errors at the boundary

def test_out_of_range_user_idx_raises_with_the_fix(data):
    train, _ = data
    model = BiasedMF(train.n_users - 1, train.n_items, 2)
    n = train.n_users - 1
    with pytest.raises(ValueError, match=rf"fit_sgd\(\): train.user_idx contains {n} but the model has "
                                         rf"n_users={n} \(valid 0..{n - 1}\); build the model from the same "
                                         r"RatingData you train on"):
        fit_sgd(model, train, device="cpu")


def test_out_of_range_val_item_idx_raises(data):
    train, val = data
    bad = _ratings(val.user_idx, val.item_idx + 100, val.rating, train.n_users, train.n_items + 100)
    with pytest.raises(ValueError, match=r"fit_als\(\): val.item_idx contains 1\d\d but the model has n_items=20"):
        fit_als(_model(train), train, val=bad, device="cpu")


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "rmsprop"}, r"optimizer must be one of \['adam', 'sgd'\]; got 'rmsprop'"),
    ({"lr": 0.0}, r"lr must be > 0 and batch_size a positive integer; got lr=0.0"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"reg": -0.1}, r"reg must be >= 0; got -0.1"),
    ({"n_epochs": 0}, r"n_epochs must be a positive integer; got 0"),
    ({"early_stopping_patience": 2}, r"early_stopping_patience=2 needs val= and a value >= 1"),
])
def test_bad_hyperparameters_raise(data, kwargs, message):
    train, _ = data
    with pytest.raises(ValueError, match=message):
        fit_sgd(_model(train), train, device="cpu", **kwargs)


def test_nan_ratings_raise(data):
    train, _ = data
    bad = _ratings(train.user_idx, train.item_idx, torch.where(train.rating > 3, float("nan"), train.rating),
                   train.n_users, train.n_items)
    with pytest.raises(ValueError, match=r"train.rating contains NaN or inf"):
        fit_sgd(_model(train), bad, device="cpu")


def test_fit_als_needs_a_positive_reg(data):
    with pytest.raises(ValueError, match=r"fit_als\(\): reg must be > 0"):
        fit_als(_model(data[0]), data[0], reg=0.0, device="cpu")


# ---------------------------------------------------------------- ALS

def test_als_half_step_equals_lstsq_on_the_augmented_system():
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]), torch.tensor([0, 2, 3, 1, 3, 0, 1, 2, 3])
    target, other = torch.randn(9, generator=gen), torch.randn(4, 3, generator=gen)
    ridge = torch.rand(4, 3, generator=gen)[:3] + 0.1  # (n_rows=3, k=3)
    crow = torch.tensor([0, 3, 5, 9])
    solved = als_half_step(crow, cols, target, other, ridge)
    for row in range(3):
        sel = rows == row
        A = torch.cat([other[cols[sel]], torch.diag(ridge[row].sqrt())])  # [Y_u; sqrt(rho) I]
        b = torch.cat([target[sel], torch.zeros(3)])
        expected = torch.linalg.lstsq(A.double(), b.double()[:, None]).solution[:, 0].float()
        assert_close(solved[row], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_floats", [6, 40, 1 << 20])  # one row per chunk, a few rows, all rows at once
def test_als_half_step_with_ones_solves_against_the_column_of_ones(monkeypatch, chunk_floats):
    """``ones=True`` borders the Gram matrices instead of gathering [Y, 1]: the same solution, row by row."""
    monkeypatch.setitem(trainers._GRAM_CHUNK_FLOATS, "cpu", chunk_floats)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([3, 0, 7, 1, 12, 2])  # an empty row, and rows longer than a small chunk
    cols = torch.cat([torch.randperm(15, generator=gen)[:n].sort().values for n in counts.tolist()])
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    target, Y = torch.randn(len(cols), generator=gen), torch.randn(15, 3, generator=gen)
    ridge = torch.rand(len(counts), 1, generator=gen).expand(-1, 4) + 0.1  # (n_rows, k + 1)
    bordered = als_half_step(crow, cols, target, Y, ridge, ones=True)
    explicit = als_half_step(crow, cols, target, torch.cat([Y, torch.ones(15, 1)], 1), ridge)
    assert bordered.shape == (len(counts), 4)
    assert_close(bordered, explicit, atol=1e-5, rtol=1e-5)
    assert torch.equal(bordered[1], torch.zeros(4))  # no entries: zero factors and bias


@pytest.mark.parametrize("chunk_floats", [6, 40, 1 << 20])  # one row per chunk, a few rows, all rows at once
def test_row_grams_in_chunks_equal_the_per_row_sums(monkeypatch, chunk_floats):
    monkeypatch.setitem(trainers._GRAM_CHUNK_FLOATS, "cpu", chunk_floats)
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 7, 1, 0, 12, 2])  # empty rows, and rows longer than a small chunk
    cols = torch.cat([torch.randperm(15, generator=gen)[:n].sort().values for n in counts.tolist()])
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    target, Y = torch.randn(len(cols), generator=gen), torch.randn(15, 3, generator=gen)
    chunks = list(trainers._row_gram_chunks(crow, cols, target, Y))
    yielded = torch.cat([rows for rows, _, _, _ in chunks])
    assert sorted(yielded.tolist()) == [0, 2, 3, 5, 6] and yielded[0] == 5  # longest first, no empty rows
    assert len(chunks) == {6: 5, 40: 3, 1 << 20: 1}[chunk_floats]
    gram, rhs = torch.zeros(len(counts), 3, 3), torch.zeros(len(counts), 3)
    for rows, g, h, sumsq in chunks:
        gram[rows], rhs[rows] = g, h
        own = torch.cat([target[crow[row]:crow[row + 1]] for row in rows.tolist()])  # the chunk's targets
        assert_close(sumsq, own @ own)
    for row in range(len(counts)):
        mine = slice(crow[row], crow[row + 1])
        assert_close(gram[row], Y[cols[mine]].T @ Y[cols[mine]])
        assert_close(rhs[row], Y[cols[mine]].T @ target[mine])


@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("chunk_floats", [6, 1 << 20])
def test_solve_rows_returns_the_objective_its_rows_reach(monkeypatch, ones, chunk_floats):
    """t^T t - x^T h per row equals the squared residual plus the ridge term at the solution, summed."""
    monkeypatch.setitem(trainers._GRAM_CHUNK_FLOATS, "cpu", chunk_floats)
    gen = torch.Generator().manual_seed(2)
    counts = torch.tensor([3, 0, 7, 1, 12, 2])
    cols = torch.cat([torch.randperm(15, generator=gen)[:n].sort().values for n in counts.tolist()])
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    target, Y = torch.randn(len(cols), generator=gen), torch.randn(15, 3, generator=gen)
    ridge = torch.rand(len(counts), 1, generator=gen).expand(-1, 3 + ones) + 0.1
    solved, reached = trainers._solve_rows(crow, cols, target, Y, ridge, ones=ones)
    assert reached.dtype == torch.float64 and torch.equal(solved, als_half_step(crow, cols, target, Y, ridge,
                                                                                  ones=ones))
    full = torch.cat([Y, torch.ones(15, 1)], 1) if ones else Y
    by_hand = 0.0
    for row in range(len(counts)):
        mine = slice(crow[row], crow[row + 1])
        residual = target[mine].double() - full[cols[mine]].double() @ solved[row].double()
        by_hand += float(residual @ residual + (ridge[row].double() * solved[row].double() ** 2).sum())
    assert float(reached) == pytest.approx(by_hand, rel=1e-5)


def test_fit_als_reports_the_training_rmse_of_its_model(data):
    """The loss comes from the item half-step's own sums; the RMSE it implies is the model's, recomputed."""
    train, _ = data
    model = _model(train, n_factors=3)
    history = fit_als(model, train, reg=0.05, n_epochs=3, device="cpu")
    with torch.no_grad():
        rmse = float(((train.rating - model(train.user_idx, train.item_idx)) ** 2).mean().sqrt())
    assert history.train_rmse[-1] == pytest.approx(rmse, rel=1e-5)


def test_fit_als_never_increases_the_objective_and_reports_it(data):
    train, _ = data
    model = _model(train, n_factors=3)
    history = fit_als(model, train, reg=0.02, n_epochs=6, device="cpu")
    assert all(b <= a + 1e-5 for a, b in zip(history.train_loss, history.train_loss[1:]))
    assert history.train_loss[-1] == pytest.approx(_objective(model, train, 0.02), rel=1e-5)


def test_fit_als_recovers_a_low_rank_matrix(data):
    train, test = data
    model = _model(train, n_factors=2)
    history = fit_als(model, train, val=test, reg=1e-4, n_epochs=30, device="cpu")
    assert history.val_rmse[-1] < 0.05 and history.method == "als"
    assert rmse(model.predict(test.user_idx, test.item_idx), test.rating) < 0.05


@pytest.mark.parametrize("change", [{"reg": 0.5}, {"n_epochs": 2}])
def test_every_als_hyperparameter_changes_the_result(data, change):
    train, _ = data
    a, b = _model(train), _model(train)
    fit_als(a, train, reg=0.1, n_epochs=3, device="cpu")
    fit_als(b, train, device="cpu", **{"reg": 0.1, "n_epochs": 3, **change})
    assert not torch.equal(a.user_factors.weight, b.user_factors.weight)


def test_fit_als_gives_users_without_ratings_zero_factors():
    train, _ = _low_rank()
    keep = train.user_idx != 0
    sub = train.subset(keep)
    model = _model(sub)
    fit_als(model, sub, n_epochs=2, device="cpu")
    assert model.user_factors.weight[0].abs().sum() == 0 and model.user_bias.weight[0].abs().sum() == 0


def test_fit_als_without_biases(data):
    train, test = data
    model = _model(train, biases=False)
    history = fit_als(model, train, val=test, reg=1e-3, n_epochs=10, device="cpu")
    assert history.val_rmse[-1] < history.val_rmse[0]


# ---------------------------------------------------------------- BPMF

def test_posterior_mean_model_predicts_the_average_of_the_samples():
    gen = torch.Generator().manual_seed(0)
    samples = [(torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen)) for _ in range(3)]
    model = _posterior_mean(samples, global_mean=3.0, device=torch.device("cpu"))
    u, i = torch.tensor([0, 1, 3, 2]), torch.tensor([4, 0, 2, 2])
    each = [3.0 + Xu[u, 2] + Xi[i, 2] + (Xu[u, :2] * Xi[i, :2]).sum(1) for Xu, Xi in samples]
    assert model.n_factors == 2 * 3
    assert_close(model.predict(u, i), torch.stack(each).mean(0))


def test_fit_bpmf_history_scores_the_returned_model(data):
    train, test = data
    model, history = fit_bpmf(train, n_factors=2, n_samples=6, n_burnin=4, noise_precision=100.0, val=test,
                              device="cpu")  # noise-free ratings: a high noise precision
    assert history.n_epochs == 10 and history.method == "bpmf"
    with torch.no_grad():
        final = rmse(model(test.user_idx, test.item_idx), test.rating)
    assert final == pytest.approx(history.val_rmse[-1], rel=1e-4) and final < 0.1 < history.val_rmse[0]


@pytest.mark.parametrize("change", [{"n_factors": 3}, {"n_samples": 3}, {"n_burnin": 1},
                                    {"noise_precision": 5.0}, {"seed": 1}])
def test_every_bpmf_hyperparameter_changes_the_result(data, change):
    train, test = data
    base = {"n_factors": 2, "n_samples": 4, "n_burnin": 2, "noise_precision": 2.0, "seed": 0}
    a = fit_bpmf(train, device="cpu", **base)[0].predict(test.user_idx, test.item_idx)
    b = fit_bpmf(train, device="cpu", **{**base, **change})[0].predict(test.user_idx, test.item_idx)
    c = fit_bpmf(train, device="cpu", **base)[0].predict(test.user_idx, test.item_idx)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_bpmf_column_solver_equals_cholesky_then_triangular_solves():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(5, 4, 9, generator=gen)
    A = B @ B.mT + 0.1 * torch.eye(4)  # (n=5, k1=4, k1) SPD
    b, z = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    x = bpmf._solve_columns(A.permute(1, 2, 0), b.T, z.T)  # batch last: (2, k1, n)
    L = torch.linalg.cholesky(A.double())
    mean = torch.cholesky_solve(b.double().unsqueeze(2), L).squeeze(2)
    noise = torch.linalg.solve_triangular(L.mT, z.double().unsqueeze(2), upper=True).squeeze(2)
    assert_close(x[1].T.double(), mean, atol=1e-4, rtol=1e-4)  # A^{-1} b
    assert_close(x[0].T.double(), mean + noise, atol=1e-4, rtol=1e-4)  # + L^{-T} z: covariance A^{-1}


def test_bpmf_redoes_a_float32_breakdown_in_float64(monkeypatch):
    calls, solve = [], bpmf._solve_columns

    def flaky(A, b, z):
        calls.append(A.dtype)
        x = solve(A, b, z)
        return torch.full_like(x, math.nan) if len(calls) == 1 else x

    monkeypatch.setattr(bpmf, "_solve_columns", flaky)
    gram, rhs = torch.eye(3).unsqueeze(2).expand(3, 3, 4) * 2, torch.ones(3, 4)
    draw, mean = bpmf._draw(gram, rhs, torch.zeros(3), torch.eye(3), 1.0, None)
    assert calls == [torch.float32, torch.float64] and draw.dtype == torch.float32
    assert_close(mean, torch.full((4, 3), 1 / 3))  # (I + 2 I) x = 1


def test_bpmf_sums_and_training_error_equal_the_direct_computation(data):
    train, _ = data
    gen = torch.Generator().manual_seed(0)
    u, i, centred = train.user_idx, train.item_idx, train.rating - 3.0
    X_user, X_item = torch.randn(train.n_users, 3, generator=gen), torch.randn(train.n_items, 3, generator=gen)
    sides = {"user": bpmf._Side(u, i, centred, train.n_users, train.n_items, 3),
             "item": bpmf._Side(i, u, centred, train.n_items, train.n_users, 3)}
    gram, rhs = sides["item"].sums_for(X_user)  # (3, 3, n_items), (3, n_items)
    design = torch.cat([X_user[:, :2], torch.ones(train.n_users, 1)], 1)[u]  # (p_u, 1) per rating
    target = centred - X_user[u, 2]  # r - mu - b_u
    for item in (0, 7):
        rows = i == item
        assert_close(gram[:, :, item], design[rows].T @ design[rows])
        assert_close(rhs[:, item], design[rows].T @ target[rows])
    sse = bpmf._sample_sse(sides, {"user": X_user, "item": X_item}, gram, rhs, float((centred.double() ** 2).sum()))
    direct = ((target - (design * X_item[i]).sum(1)) ** 2).sum()
    assert float(sse) == pytest.approx(float(direct), rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [({"n_samples": 0}, r"n_samples must be an integer >= 1; got 0"),
                                             ({"n_factors": 2.0}, r"n_factors must be an integer >= 1; got 2\.0"),
                                             ({"noise_precision": -1.0}, r"noise_precision must be > 0")])
def test_bad_bpmf_arguments_raise(data, kwargs, message):
    with pytest.raises(ValueError, match=rf"fit_bpmf\(\): {message}"):
        fit_bpmf(data[0], device="cpu", **kwargs)


def test_bpmf_checks_val_like_the_other_trainers(data):
    train, val = data
    outside = RatingData(user_idx=val.user_idx + train.n_users, item_idx=val.item_idx, rating=val.rating,
                         timestamp=val.timestamp, user_ids=val.user_ids, item_ids=val.item_ids)
    with pytest.raises(ValueError, match=rf"fit_bpmf\(\): val.user_idx holds numbers outside 0..{train.n_users - 1}"):
        fit_bpmf(train, val=outside, device="cpu")
    broken = RatingData(user_idx=val.user_idx, item_idx=val.item_idx, rating=val.rating.clone().fill_(math.nan),
                        timestamp=val.timestamp, user_ids=val.user_ids, item_ids=val.item_ids)
    with pytest.raises(ValueError, match=r"fit_bpmf\(\): val.rating contains NaN or inf"):
        fit_bpmf(train, val=broken, device="cpu")


# ---------------------------------------------------------------- devices, seeds, History

def test_resolve_device_auto_picks_cuda_only_when_present():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")).type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_cuda_without_cuda_raises():
    with pytest.raises(RuntimeError, match=r"device='cuda' was requested but CUDA is not available"):
        resolve_device("cuda")


def test_resolve_device_rejects_nonsense():
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'; use 'auto', 'cpu' or 'cuda'"):
        resolve_device("gpu0")


def test_seed_everything_and_make_generator_repeat_their_draws():
    seed_everything(3)
    a = (torch.rand(2), np.random.rand())
    seed_everything(3)
    assert torch.equal(a[0], torch.rand(2)) and a[1] == np.random.rand()
    assert torch.equal(torch.rand(3, generator=make_generator(1)), torch.rand(3, generator=make_generator(1)))


def test_history_is_immutable_and_easy_to_plot():
    h0 = History(method="sgd")
    h1 = h0.append(train_loss=2.0, train_rmse=1.2, val_rmse=1.1, seconds=0.1)
    h2 = h1.append(train_loss=1.0, train_rmse=1.0, val_rmse=1.3, seconds=0.1)
    assert h0.n_epochs == 0 and h2.n_epochs == 2 and h2.best_epoch == 0
    assert {len(v) for v in h2.as_dict().values()} == {2}
    no_val = History().append(train_loss=2.0, train_rmse=1.0, val_rmse=math.nan, seconds=0.1).append(
        train_loss=1.0, train_rmse=1.0, val_rmse=math.nan, seconds=0.1)
    assert no_val.best_epoch == 1


# ---------------------------------------------------------------- accuracy on real data (slow)

@pytest.mark.slow
def test_trainers_beat_surprise_svd_on_ml100k_u1():
    from mfutils.movielens import load_ml100k_fold

    train, test = load_ml100k_fold(1, progress=False)
    model = _model(train, n_factors=20)
    fit_als(model, train, device="cpu")
    assert rmse(model.predict(test.user_idx, test.item_idx, clip=(1, 5)), test.rating) < 0.935
    bayes, _ = fit_bpmf(train, n_factors=8, n_samples=32, n_burnin=8, device="cpu")
    assert rmse(bayes.predict(test.user_idx, test.item_idx, clip=(1, 5)), test.rating) < 0.915


# ---------------------------------------------------------------- phase_seconds: where an epoch's time goes

FUSED_PHASES = {"permutation", "gather records", "gather rows", "arithmetic", "scatter-add"}
ALS_PHASES = {"targets", "gather rows", "products", "factorization", "solves", "loss"}


@pytest.mark.parametrize("method, phases", [("fused", FUSED_PHASES), ("als", ALS_PHASES)])
def test_phase_seconds_times_each_phase_within_the_epochs_and_changes_no_result(data, method, phases):
    train, _ = data

    def fit(model):
        if method == "als":
            return fit_als(model, train, reg=0.1, n_epochs=2, device="cpu")
        return fit_sgd(model, train, fused=True, n_epochs=2, batch_size=64, device="cpu")

    plain, timed = _model(train, seed=1), _model(train, seed=1)
    expected = fit(plain)
    with trainers.phase_seconds() as seconds:
        history = fit(timed)
    assert set(seconds) == phases and all(s > 0 for s in seconds.values())
    assert sum(seconds.values()) <= sum(history.seconds)  # the phases lie inside the epochs' wall time
    assert history.train_loss == expected.train_loss  # timing takes nothing from the arithmetic
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), timed.parameters()))
    assert trainers._PHASES is None  # closed: later epochs are not timed
    fit(_model(train, seed=1))
    assert set(seconds) == phases and sum(seconds.values()) <= sum(history.seconds)


def test_phase_seconds_blocks_do_not_nest_and_refuse_a_gpu():
    with trainers.phase_seconds():
        with pytest.raises(RuntimeError, match="a block is already open; blocks do not nest"):
            with trainers.phase_seconds():
                pass
        with pytest.raises(ValueError, match="phase_seconds\\(\\) times CPU epochs only; on cuda:0 the clock"):
            trainers._check_phase_device("fit_sgd()", torch.device("cuda", 0))
        trainers._check_phase_device("fit_sgd()", torch.device("cpu"))  # no error
    trainers._check_phase_device("fit_sgd()", torch.device("cuda", 0))  # outside a block: nothing is timed


def test_fit_als_scores_a_perfect_fit_as_zero_not_as_an_error():
    """t^T t - x^T h of an exact fit is rounding noise around zero; the reported RMSE must stay a number."""
    train, _ = _low_rank(frac=1.0)  # every rating of an exact rank-2 matrix
    rmses = []
    for seed in range(4):
        history = fit_als(_model(train, n_factors=2, seed=seed), train, reg=1e-6, n_epochs=15, device="cpu")
        rmses += history.train_rmse
    assert all(0.0 <= x < 1e-2 for x in rmses[-1::-15])  # every run ends near zero
    assert all(math.isfinite(x) for x in rmses)


def test_fit_als_says_to_raise_reg_when_a_system_is_singular_even_in_float64():
    train, _ = _low_rank(frac=1.0)  # exact rank 2: at rank 4 every Gram matrix is singular but for the ridge
    with pytest.raises(FloatingPointError, match=r"fit_als\(\): .*singular.*raise reg \(now 1e-12\) or lower the "
                                                 r"rank \(now 4\)"):
        fit_als(_model(train, n_factors=4), train, reg=1e-12, n_epochs=3, device="cpu")
