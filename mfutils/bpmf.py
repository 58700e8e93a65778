r"""Bayesian biased matrix factorization by Gibbs sampling (BPMF, Salakhutdinov & Mnih, 2008).

ALS finds *one* setting of the factors. BPMF draws many settings from their posterior and averages the
predictions, which is what makes it more accurate on sparse data. The model is the biased one,

.. math:: r_{ui} \sim \mathcal N\big(\mu + b_u + b_i + p_u^\top q_i,\; \alpha^{-1}\big),

with each user's :math:`x_u = (p_u, b_u)` drawn from a shared prior :math:`\mathcal N(\mu_U, \Lambda_U^{-1})`
(items likewise), and a Normal-Wishart hyperprior on :math:`(\mu_U, \Lambda_U)` (:math:`\mu_0=0`,
:math:`\beta_0=2`, :math:`W_0=I`, :math:`\nu_0=k+1`). One sweep samples, in turn, the user hyperparameters,
every user row given the items (one batched Cholesky, as in ALS), then the same for items:

.. math:: x_u \mid \cdot \sim \mathcal N\big(A_u^{-1} b_u,\; A_u^{-1}\big),\quad
          A_u = \Lambda_U + \alpha \sum_{i\in I_u} \tilde q_i \tilde q_i^\top,\quad
          b_u = \Lambda_U \mu_U + \alpha \sum_{i\in I_u} \tilde q_i (r_{ui} - \mu - b_i).

**The averaged predictor is itself a BiasedMF.** The mean of :math:`S` samples' predictions is
:math:`\mu + \bar b_u + \bar b_i + \tilde p_u^\top \tilde q_i` with :math:`\tilde p_u = (p_u^{(1)}, \dots,
p_u^{(S)})/\sqrt S` (and likewise :math:`\tilde q_i`), so :func:`fit_bpmf` returns an ordinary
:class:`~mfutils.models.BiasedMF` with ``n_factors * n_samples`` factors, and everything downstream
(``predict``, unknown ids, clipping) works unchanged.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from mfutils.data import RatingData
from mfutils.models import BiasedMF
from mfutils.train import History, _by_row, _cholesky, _epochs, _on, _row_grams, make_generator, resolve_device

__all__ = ["fit_bpmf", "DEFAULT_PRECISION_SCALE"]

DEFAULT_PRECISION_SCALE = 2.0
r"""Default noise precision :math:`\alpha = 2 / \mathrm{Var}(r)`: the best value on 10 % validation splits of
the ml-100k ``u1``-``u3.base`` files (:math:`\alpha\,\mathrm{Var}(r)` from 1.9 to 2.5 was best) and on 20 %
splits of ml-latest-small (best near 1.9). Much larger values overfit: at 3.2 the ml-100k RMSE rises by ~0.015."""


def _sample_hyper(X: torch.Tensor, generator: torch.Generator, beta0: float = 2.0):
    r"""Draw :math:`(\mu, \Lambda)` from the Normal-Wishart posterior given rows ``X`` (shape ``(n, k)``)."""
    n, k = X.shape
    mean = X.mean(0)  # (k,)
    centred = X - mean  # (n, k)
    w_inv = (torch.eye(k, device=X.device) + centred.T @ centred
             + (beta0 * n / (beta0 + n)) * torch.outer(mean, mean))  # (k, k)
    w_chol = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(w_inv)))  # (k, k)
    draws = torch.randn(n + k, k, generator=generator).to(X.device) @ w_chol.T  # (nu, k), rows ~ N(0, W)
    precision = draws.T @ draws  # Wishart(W, nu = k + n): (k, k)
    chol = torch.linalg.cholesky((beta0 + n) * precision)
    noise = torch.randn(k, 1, generator=generator).to(X.device)
    return n * mean / (beta0 + n) + torch.linalg.solve_triangular(chol.T, noise, upper=True)[:, 0], precision


def _sample_rows(crow: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, other: torch.Tensor,
                 mean: torch.Tensor, precision: torch.Tensor, alpha: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """One Gibbs half-step: every row of one side at once; ``generator=None`` returns the conditional mean."""
    gram, rhs = _row_grams(crow, cols, target, other)  # (n, k, k), (n, k)
    chol = _cholesky(alpha * gram + precision)  # (n, k, k)
    x = torch.cholesky_solve((alpha * rhs + precision @ mean).unsqueeze(2), chol)  # (n, k, 1)
    if generator is not None:  # x + L^{-T} z has covariance (L L^T)^{-1} = A^{-1}
        z = torch.randn(x.shape, generator=generator).to(x.device)
        x = x + torch.linalg.solve_triangular(chol.mT, z, upper=True)
    return x.squeeze(2)  # (n, k)


def _with_ones(X: torch.Tensor) -> torch.Tensor:
    """Rows ``(p, b)`` become ``(p, 1)``: the design rows the other side regresses on, shape ``(n, k + 1)``."""
    return torch.cat([X[:, :-1], torch.ones_like(X[:, :1])], 1)


def _predict(X_u: torch.Tensor, X_i: torch.Tensor, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """:math:`b_u + b_i + p_u^\top q_i` from rows ``(p, b)``, shape ``(B,)``: ``(p_u, b_u)·(q_i, 1) + b_i``."""
    gather = torch.index_select  # 3-4x faster than X[u] on the CPU
    return (gather(X_u, 0, u) * gather(_with_ones(X_i), 0, i)).sum(1) + gather(X_i[:, -1], 0, i)


def _variance(r: torch.Tensor) -> float:
    """Var(r), floored at (0.1 max|r|)^2 so constant or near-constant ratings keep a sane precision."""
    floor = (0.1 * max(float(r.abs().max()), 1e-3)) ** 2
    return max(float(r.var()) if len(r) > 1 else 0.0, floor)


def _check(train: RatingData, n_factors: int, n_samples: int, n_burnin: int, alpha: float | None) -> None:
    who = "fit_bpmf()"
    if train.n_ratings == 0 or not torch.isfinite(train.rating).all():
        raise ValueError(f"{who}: train must hold at least one rating and no NaN/inf ratings; got {train!r}")
    for name, value, low in (("n_factors", n_factors, 1), ("n_samples", n_samples, 1), ("n_burnin", n_burnin, 0)):
        if int(value) != value or value < low:
            raise ValueError(f"{who}: {name} must be an integer >= {low}; got {value!r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"{who}: noise_precision must be > 0 (or None for the default); got {alpha!r}")


def fit_bpmf(train: RatingData, *, n_factors: int = 8, n_samples: int = 32, n_burnin: int = 8,
             noise_precision: float | None = None, seed: int = 0, device: str | torch.device = "auto",
             val: RatingData | None = None, progress: bool = False,
             callback: Callable[[int, History], None] | None = None) -> tuple[BiasedMF, History]:
    r"""Gibbs-sample a biased MF and return its posterior-mean predictor as a :class:`BiasedMF`.

    Sweep 0 is a ridge (ALS) warm start with the prior :math:`\mathcal N(0, I/10)`; the next ``n_burnin - 1``
    sweeps are discarded; the last ``n_samples`` sweeps are averaged (see the module docstring).

    Args:
        train: training ratings; every user and item of ``train.n_users``/``n_items`` gets a row.
        n_factors: rank :math:`k` of each sample (the returned model has ``n_factors * n_samples``).
        n_samples: sweeps averaged. n_burnin: sweeps discarded first.
        noise_precision: :math:`\alpha`; ``None`` uses ``DEFAULT_PRECISION_SCALE / Var(train.rating)``.
        seed: seeds the initial item factors and every draw (CPU generator, so any device draws the same).
        device, val, progress, callback: as in :func:`mfutils.train.fit_sgd`.
    Returns:
        ``(model, history)``. ``history.train_loss`` is the current sample's training MSE; ``train_rmse``
        and ``val_rmse`` score the running posterior mean (the current sample during burn-in).
    """
    _check(train, n_factors, n_samples, n_burnin, noise_precision)
    device, generator = resolve_device(device), make_generator(seed)
    (u, i, r), val_data = _on(train, device), _on(val, device)
    global_mean, k = float(r.mean()), n_factors
    alpha = noise_precision or DEFAULT_PRECISION_SCALE / _variance(r)
    layouts = {"user": _by_row(u, i, train.n_users), "item": _by_row(i, u, train.n_items)}
    targets = {side: r[order] - global_mean for side, (order, _, _) in layouts.items()}  # sorted by row
    X = {"user": torch.zeros(train.n_users, k + 1, device=device),
         "item": torch.cat([0.1 * torch.randn(train.n_items, k, generator=generator),
                            torch.zeros(train.n_items, 1)], 1).to(device)}  # rows (p, b): (n, k + 1)
    scored = [(u, i, r)] + ([val_data] if val_data is not None else [])
    samples, sums, history = [], None, History(method="bpmf")
    for sweep in _epochs(n_burnin + n_samples, progress, "fit_bpmf()"):
        start = time.perf_counter()
        for side, other in (("user", "item"), ("item", "user")):
            prior = ((torch.zeros(k + 1, device=device), 10 * torch.eye(k + 1, device=device)) if sweep == 0
                     else _sample_hyper(X[side], generator))
            _, crow, cols = layouts[side]
            target = targets[side] - X[other][:, k].index_select(0, cols)  # r - mu - b_other: (n_ratings,)
            X[side] = _sample_rows(crow, cols, target, _with_ones(X[other]), *prior, alpha,
                                   generator if sweep else None)
        preds = [_predict(X["user"], X["item"], d[0], d[1]) + global_mean for d in scored]  # (n,) each
        if sweep >= n_burnin:
            samples.append((X["user"], X["item"]))
            sums = preds if sums is None else [s + p for s, p in zip(sums, preds)]
        shown = preds if sums is None else [s / len(samples) for s in sums]
        mse = torch.stack([((p - d[2]) ** 2).mean() for p, d in zip([preds[0], *shown], [scored[0], *scored])])
        mse = mse.tolist()  # the sweep's one CPU-GPU sync: [sample train, mean train, (mean val)]
        history = history.append(train_loss=mse[0], train_rmse=math.sqrt(mse[1]),
                                 val_rmse=math.sqrt(mse[2]) if val is not None else math.nan,
                                 seconds=time.perf_counter() - start)
        if callback is not None:
            callback(sweep, history)
    return _posterior_mean(samples, global_mean, device), history


def _posterior_mean(samples: list[tuple[torch.Tensor, torch.Tensor]], global_mean: float,
                    device: torch.device) -> BiasedMF:
    """Concatenate the samples' factors (scaled by 1/sqrt(S)) and average their biases."""
    scale = 1.0 / math.sqrt(len(samples))
    n_users, n_items, k = samples[0][0].shape[0], samples[0][1].shape[0], samples[0][0].shape[1] - 1
    model = BiasedMF(n_users, n_items, k * len(samples), global_mean=global_mean, init_std=0.0, device=device)
    with torch.no_grad():
        for table, bias, j in ((model.user_factors, model.user_bias, 0), (model.item_factors, model.item_bias, 1)):
            table.weight.copy_(torch.cat([s[j][:, :k] for s in samples], 1) * scale)  # (n, k * S)
            bias.weight.copy_(torch.stack([s[j][:, k] for s in samples], 1).mean(1, keepdim=True))  # (n, 1)
    return model
