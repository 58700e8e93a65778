"""DenseMF and BiasedMF: exact values, the dense/sparse equivalence, unknown ids, seeds and devices."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mfutils import models
from mfutils.models import BiasedMF, DenseMF, dense_masked_loss, gathered_loss


def _observed(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    user_idx, item_idx = torch.nonzero(R, as_tuple=True)  # row-major order of the observed cells
    return user_idx, item_idx, R[user_idx, item_idx]


@pytest.mark.parametrize("reg", [0.0, 0.3])
def test_dense_masked_loss_equals_gathered_loss_value_and_gradients(small_matrix, reg):
    R, mask = small_matrix, small_matrix != 0
    P0, Q0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)), torch.randn(4, 2)
    P_dense, Q_dense = P0.clone().requires_grad_(), Q0.clone().requires_grad_()
    P_sparse, Q_sparse = P0.clone().requires_grad_(), Q0.clone().requires_grad_()

    dense = dense_masked_loss(P_dense, Q_dense, R, mask, reg)
    sparse = gathered_loss(P_sparse, Q_sparse, *_observed(R), reg)
    dense.backward()
    sparse.backward()

    assert_close(dense, sparse)
    assert_close(P_dense.grad, P_sparse.grad)
    assert_close(Q_dense.grad, Q_sparse.grad)
    assert Q_dense.grad[2].abs().sum() == 0  # item 2 is never rated: no signal reaches it


def test_dense_masked_loss_ignores_what_unobserved_cells_hold(small_matrix):
    P, Q = torch.ones(3, 1), torch.ones(4, 1)
    mask = small_matrix != 0
    garbage = small_matrix + 100.0 * (~mask)
    assert_close(dense_masked_loss(P, Q, small_matrix, mask), dense_masked_loss(P, Q, garbage, mask))


def test_gathered_loss_by_hand():
    P, Q = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # predictions 3 and 3 for ratings 4 and 1: errors 1 and -2; penalties (5 + 9) and (5 + 2)
    loss = gathered_loss(P, Q, torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([4.0, 1.0]), reg=0.1)
    assert_close(loss, torch.tensor((1 + 0.1 * 14 + 4 + 0.1 * 7) / 2))


def test_dense_mf_reconstructs_the_full_matrix(small_matrix):
    model = DenseMF(3, 4, 2, seed=0)
    assert model().shape == (3, 4)
    assert_close(model(), model.user_factors @ model.item_factors.T)
    assert_close(model.loss(small_matrix, small_matrix != 0, 0.1),
                 dense_masked_loss(model.user_factors, model.item_factors, small_matrix, small_matrix != 0, 0.1))


def test_biased_forward_is_mean_plus_biases_plus_dot_product():
    model = BiasedMF(2, 3, 2, global_mean=3.5)
    with torch.no_grad():
        model.user_factors.weight.copy_(torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
        model.item_factors.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, -1.0], [2.0, 0.0]]))
        model.user_bias.weight.copy_(torch.tensor([[0.1], [-0.2]]))
        model.item_bias.weight.copy_(torch.tensor([[0.3], [0.0], [-0.5]]))
    pred = model(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert_close(pred, torch.tensor([3.5 + 0.1 + 0.3 + 1.0, 3.5 - 0.2 + 0.0 - 2.0, 3.5 - 0.2 - 0.5 + 1.0]))
    # penalty of (user 1, item 2): |p|^2 = 4.25, |q|^2 = 4, b_u^2 = 0.04, b_i^2 = 0.25
    assert_close(model.penalty(torch.tensor([1]), torch.tensor([2])), torch.tensor([8.54]))


def test_predict_falls_back_to_biases_for_unknown_ids():
    model = BiasedMF(2, 2, 3, global_mean=3.0, init_std=1.0, seed=4)
    with torch.no_grad():
        model.user_bias.weight.fill_(0.25)
        model.item_bias.weight.fill_(-0.5)
        known = model(torch.tensor([1]), torch.tensor([0]))
    # unknown user -> mu + b_i; unknown item -> mu + b_u; both (any out-of-range number) -> mu
    pred = model.predict(torch.tensor([-1, 0, 7, 2, 1]), torch.tensor([1, -1, -1, 5, 0]))
    assert_close(pred, torch.cat([torch.tensor([3.0 - 0.5, 3.0 + 0.25, 3.0, 3.0]), known]))


def test_predict_clips_to_the_rating_range():
    model = BiasedMF(3, 3, 2, global_mean=3.0, init_std=3.0, seed=0)
    users, items = torch.tensor([0, 1, 2, -1]), torch.tensor([0, 1, 2, -1])
    raw, clipped = model.predict(users, items), model.predict(users, items, clip=(2.9, 3.1))
    assert (raw.min() < 2.9 or raw.max() > 3.1) and clipped.min() >= 2.9 and clipped.max() <= 3.1
    assert_close(clipped, raw.clamp(2.9, 3.1))


def test_predict_without_biases_falls_back_to_the_global_mean():
    model = BiasedMF(2, 2, 2, global_mean=2.5, biases=False)
    assert model.user_bias is None and model.item_bias is None
    assert_close(model.predict(torch.tensor([-1, 0]), torch.tensor([0, 9])), torch.tensor([2.5, 2.5]))


def test_same_seed_same_factors_different_seed_different():
    a, b, c = BiasedMF(5, 4, 3, seed=1), BiasedMF(5, 4, 3, seed=1), BiasedMF(5, 4, 3, seed=2)
    assert torch.equal(a.user_factors.weight, b.user_factors.weight)
    assert torch.equal(a.item_factors.weight, b.item_factors.weight)
    assert not torch.equal(a.user_factors.weight, c.user_factors.weight)
    assert torch.equal(DenseMF(5, 4, 3, seed=1).user_factors, DenseMF(5, 4, 3, seed=1).user_factors)


def test_construction_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    BiasedMF(10, 10, 4, seed=3)
    DenseMF(10, 10, 4, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_init_std_scales_the_factors_and_biases_start_at_zero():
    model = BiasedMF(200, 300, 8, init_std=0.05, seed=0)
    assert model.user_factors.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert model.user_bias.weight.abs().sum() == 0 and model.item_bias.weight.abs().sum() == 0


def test_zero_init_std_gives_zero_factors_equal_to_zero_scaled_draws():
    model = BiasedMF(20, 30, 4, init_std=0.0, seed=5)
    scaled = (torch.randn(50, 4, generator=torch.Generator().manual_seed(5)) * 0.0)[:20]
    assert model.user_factors.weight.abs().sum() == 0 and torch.equal(model.user_factors.weight, scaled)


def test_predict_gives_the_same_numbers_for_any_chunk_size(monkeypatch):
    model = BiasedMF(40, 30, 16, global_mean=3.5, init_std=0.5, seed=1)
    gen = torch.Generator().manual_seed(0)
    users, items = torch.randint(-1, 40, (1000,), generator=gen), torch.randint(0, 31, (1000,), generator=gen)
    default = model.predict(users, items, clip=(1.0, 5.0))
    monkeypatch.setattr(models, "_CHUNK", 7)  # 143 chunks, the last one short
    assert torch.equal(model.predict(users, items, clip=(1.0, 5.0)), default)


def test_parameters_start_identical_on_every_device(device):
    cpu, there = BiasedMF(6, 5, 3, seed=7), BiasedMF(6, 5, 3, seed=7, device=device)
    assert there.device.type == device.type and there.global_mean.device.type == device.type
    assert_close(there.user_factors.weight.cpu(), cpu.user_factors.weight)
    assert_close(there.predict(torch.tensor([0, -1]), torch.tensor([1, 2])).cpu(),
                 cpu.predict(torch.tensor([0, -1]), torch.tensor([1, 2])))


def test_sparse_embeddings_give_sparse_gradients():
    model = BiasedMF(4, 4, 2, sparse=True)
    model(torch.tensor([0, 1]), torch.tensor([2, 3])).sum().backward()
    assert model.user_factors.weight.grad.is_sparse and model.item_bias.weight.grad.is_sparse


def test_properties_report_the_sizes():
    model = BiasedMF(7, 9, 4)
    assert (model.n_users, model.n_items, model.n_factors) == (7, 9, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_factors": 0}, r"BiasedMF\(\): n_factors must be a positive integer; got 0"),
    ({"n_users": 2.5}, r"BiasedMF\(\): n_users must be a positive integer; got 2.5"),
    ({"init_std": -1.0}, r"BiasedMF\(\): init_std must be >= 0; got -1.0"),
])
def test_bad_sizes_raise(kwargs, message):
    args = {"n_users": 3, "n_items": 3, "n_factors": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        BiasedMF(args.pop("n_users"), args.pop("n_items"), args.pop("n_factors"), **args)
