r"""Bayesian biased matrix factorization by Gibbs sampling (BPMF, Salakhutdinov & Mnih, 2008).

ALS finds *one* setting of the factors. BPMF draws many settings from their posterior and averages the
predictions, which is what makes it more accurate on sparse data. The model is the biased one,

.. math:: r_{ui} \sim \mathcal N\big(\mu + b_u + b_i + p_u^\top q_i,\; \alpha^{-1}\big),

with each user's :math:`x_u = (p_u, b_u)` drawn from a shared prior :math:`\mathcal N(\mu_U, \Lambda_U^{-1})`
(items likewise), and a Normal-Wishart hyperprior on :math:`(\mu_U, \Lambda_U)` (:math:`\mu_0=0`,
:math:`\beta_0=2`, :math:`W_0=I`, :math:`\nu_0=k+1`). One sweep samples, in turn, the user hyperparameters,
every user row given the items (all rows at once, like ALS, with a Cholesky of its own: see below), then
the same for items:

.. math:: x_u \mid \cdot \sim \mathcal N\big(A_u^{-1} b_u,\; A_u^{-1}\big),\quad
          A_u = \Lambda_U + \alpha \sum_{i\in I_u} \tilde q_i \tilde q_i^\top,\quad
          b_u = \Lambda_U \mu_U + \alpha \sum_{i\in I_u} \tilde q_i (r_{ui} - \mu - b_i).

**Rao-Blackwellised averaging.** A kept sweep contributes the pair (user draw, item *conditional mean*
:math:`A_i^{-1}b_i` given those users) instead of the item draw: the same expected prediction with less
Monte Carlo noise, which matters because the average is over only a few sweeps. With the default weak warm
start (prior precision 1 in sweep 0) the chain is stationary within a few sweeps, so 4 burn-in and 16 kept
sweeps match the accuracy that 8 + 32 plain sweeps from a tight start reached (validation RMSE on 10 %
splits of ml-100k ``u1``-``u3.base``: 0.9118 at rank 8, 0.9129 at rank 6, vs 0.9113 before).

**Where the time goes, and what keeps it small.** Each half-step is two sparse-dense products (CSR with int32
indices) and a Cholesky factorisation per row. The Gram matrices are symmetric, so only their
:math:`(k+1)(k+2)/2` upper entries are summed (28 instead of 49 at :math:`k=6`); the bias terms
:math:`\sum_i b_i \tilde q_i` ride along in the same product, against a 0/1 pattern built once per fit.
With :math:`A = LL^\top`, the draw :math:`x = L^{-\top}(L^{-1} b + z)`, :math:`z\sim\mathcal N(0, I)`, has
mean :math:`A^{-1}b` and covariance :math:`A^{-1}`; the factorisation, :math:`L^{-1}b` and one back
substitution for both :math:`x` and the mean run column by column over all rows at once (rows last in
memory), which beats a batched LAPACK call per 7×7 matrix. The training error of the current sample comes
from the item half-step's own sums, :math:`\sum t^2 - 2\sum_i x_i^\top b_i + \sum_i x_i^\top G_i x_i`, so no
sweep gathers a prediction per rating. The benchmarks appendix of the book records how long a sweep takes.

**The averaged predictor is itself a BiasedMF.** The mean of :math:`S` kept pairs' predictions is
:math:`\mu + \bar b_u + \bar b_i + \tilde p_u^\top \tilde q_i` with :math:`\tilde p_u = (p_u^{(1)}, \dots,
p_u^{(S)})/\sqrt S` (and likewise :math:`\tilde q_i`), so :func:`fit_bpmf` returns an ordinary
:class:`~mfutils.models.BiasedMF` with ``n_factors * n_samples`` factors, and everything downstream
(``predict``, unknown ids, clipping) works unchanged.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Callable

import torch

from mfutils.data import RatingData
from mfutils.models import BiasedMF
from mfutils.train import History, _by_row, _epochs, _on, make_generator, resolve_device

__all__ = ["fit_bpmf", "DEFAULT_PRECISION_SCALE"]

DEFAULT_PRECISION_SCALE = 1.5
r"""Default noise precision :math:`\alpha = 1.5 / \mathrm{Var}(r)`: the best of 1.0-2.5 on 10 % validation
splits of the ml-100k ``u1``-``u3.base`` files and of ml-latest-small (20 sweeps). Larger values make single
samples sharper but the 16-sample average noisier (2.0: +0.005 RMSE on ml-100k); less noisy synthetic data
prefer 2.0 (by 0.005)."""
_WARM_PRECISION = 1.0  # prior precision of sweep 0's ridge solve; 10 (a tight start) needed ~30 sweeps to forget


def _sample_hyper(X: torch.Tensor, generator: torch.Generator, beta0: float = 2.0):
    r"""Draw :math:`(\mu, \Lambda)` from the Normal-Wishart posterior given rows ``X`` (shape ``(n, k)``).

    With :math:`W^{-1} = I + S + \frac{\beta_0 n}{\beta_0 + n}\bar x\bar x^\top = CC^\top`, the rows of
    :math:`D = ZC^{-1}` (:math:`Z` standard normal, :math:`(n+k) \times k`) are :math:`\mathcal N(0, W)` draws,
    so :math:`\Lambda = D^\top D \sim \mathcal W(W, n + k)`; then :math:`\mu \sim \mathcal N(\frac{n\bar x}
    {\beta_0+n}, ((\beta_0+n)\Lambda)^{-1})`. Returns float32 ``(k,)`` and ``(k, k)``.
    """
    n, k = X.shape
    mean = X.mean(0)  # (k,)
    centred = X - mean  # (n, k)
    w_inv = (torch.eye(k, device=X.device) + centred.T @ centred
             + (beta0 * n / (beta0 + n)) * torch.outer(mean, mean))  # (k, k)
    z = torch.randn(n + k + 1, k, generator=generator).to(X.device)  # (n + k + 1, k)
    draws = torch.linalg.solve_triangular(torch.linalg.cholesky(w_inv), z[1:], upper=False, left=False)
    precision = draws.T @ draws  # Wishart(W, nu = n + k): (k, k)
    chol = torch.linalg.cholesky((beta0 + n) * precision)
    shift = torch.linalg.solve_triangular(chol.T, z[0].unsqueeze(1), upper=True)[:, 0]  # (k,)
    return n * mean / (beta0 + n) + shift, precision


class _Side:
    """What one half-step needs about one side (users or items), built once per fit.

    ``pattern`` and ``centred`` are CSR ``(n_rows, n_cols)`` matrices of this side's ratings: 0/1 and
    :math:`r - \\mu`. ``upper`` picks the Gram's upper-triangle entries and ``full`` spreads them back.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, centred: torch.Tensor, n_rows: int,
                 n_cols: int, k1: int) -> None:
        order, crow, col = _by_row(rows, cols, n_rows)
        self.counts = torch.diff(crow).to(centred.dtype)  # (n_rows,) ratings per row
        if crow[-1] < 2 ** 31:  # int32 indices: the sparse kernels need not convert them on every call
            crow, col = crow.int(), col.int()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.pattern = torch.sparse_csr_tensor(crow, col, torch.ones_like(centred), (n_rows, n_cols),
                                                   check_invariants=False)
            self.centred = torch.sparse_csr_tensor(crow, col, centred[order], (n_rows, n_cols),
                                                   check_invariants=False)
        self.sums = self.centred @ torch.ones(n_cols, 1, device=rows.device)  # (n_rows, 1): sum of r - mu
        up = torch.triu_indices(k1, k1, device=rows.device)  # (2, k1 (k1 + 1) / 2)
        self.upper, self.n_upper = (up[0], up[1]), int(up.shape[1])
        index = torch.zeros(k1, k1, dtype=torch.int64, device=rows.device)
        index[up[0], up[1]] = torch.arange(up.shape[1], device=rows.device)
        self.full = torch.maximum(index, index.T).reshape(-1)  # (k1 * k1,) position in the upper list

    def sums_for(self, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Per row, batch last: the Gram :math:`G = \sum \tilde y \tilde y^\top` and :math:`\sum \tilde y (r-\mu-b)`.

        Args:
            other: the other side's rows :math:`(y, b)`, float32, shape ``(n_cols, k1)``.
        Returns:
            float32 ``(k1, k1, n_rows)`` and ``(k1, n_rows)``.
        """
        n_cols, k1 = other.shape
        design = torch.cat([other[:, :-1], torch.ones_like(other[:, :1])], 1)  # rows (y, 1): (n_cols, k1)
        stacked = torch.cat([design.index_select(1, self.upper[0]) * design.index_select(1, self.upper[1]),
                             other[:, -1:] * design], 1)  # upper products, b * (y, 1): (n_cols, k1 (k1+3)/2)
        summed = (self.pattern @ stacked).T  # (k1 (k1 + 3) / 2, n_rows)
        gram = summed[:self.n_upper].index_select(0, self.full).view(k1, k1, -1)  # (k1, k1, n_rows)
        return gram, (self.centred @ design).T - summed[self.n_upper:]  # (k1, k1, n_rows), (k1, n_rows)


def _draw(gram: torch.Tensor, rhs: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor, alpha: float,
          generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rows :math:`x \sim \mathcal N(A^{-1}b, A^{-1})` and their conditional means :math:`A^{-1}b`.

    :math:`A = \Lambda + \alpha G` and :math:`b = \Lambda\mu + \alpha\,\mathrm{rhs}`. With :math:`A = LL^\top`,
    :math:`x = L^{-\top}(L^{-1}b + z)`. The Cholesky factorisation, :math:`L^{-1}b` and the back substitution
    run column by column over all rows at once (batch last): for :math:`k+1 \le 10` that is faster than a
    batched LAPACK call per matrix. If float32 rounding broke positive definiteness, it is redone in float64.

    Args:
        gram, rhs: :meth:`_Side.sums_for`'s sums, float32, shapes ``(k1, k1, n)`` and ``(k1, n)``.
        mean, precision: the prior :math:`(\mu, \Lambda)`, shapes ``(k1,)`` and ``(k1, k1)``.
        generator: draws :math:`z`; ``None`` returns the mean twice (no draw).
    Returns:
        ``(draw, mean)``, float32, shape ``(n, k1)`` each.
    """
    A = torch.add(precision.unsqueeze(2), gram, alpha=alpha)  # (k1, k1, n)
    b = torch.add((precision @ mean).unsqueeze(1), rhs, alpha=alpha)  # (k1, n)
    z = None if generator is None else torch.randn(b.shape, generator=generator).to(b.device)  # (k1, n)
    x = _solve_columns(A, b, z)
    if not bool(torch.isfinite(x).all()):  # rare: badly scaled ratings
        x = _solve_columns(A.double(), b.double(), None if z is None else z.double()).float()
    return x[0].T, x[-1].T  # (n, k1) each


def _solve_columns(A: torch.Tensor, b: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    r""":math:`L^{-\top}(L^{-1}b + z)` and :math:`L^{-\top}L^{-1}b` for every batch column of ``A`` ``(k1, k1, n)``.

    Only the lower triangle of ``A`` is read. Returns ``(2, k1, n)`` (``(1, k1, n)`` when ``z`` is None).
    """
    k1 = A.shape[0]
    L, w = torch.empty_like(A), torch.empty_like(b)  # lower factor (k1, k1, n), L^{-1} b (k1, n)
    for j in range(k1):  # Cholesky-Crout, with the forward substitution riding along
        col, t = (A[j:, j] - (L[j:, :j] * L[j, :j]).sum(1), b[j] - (w[:j] * L[j, :j]).sum(0)) if j else (A[:, 0], b[0])
        L[j, j] = d = col[0].sqrt()  # (n,)
        L[j + 1:, j] = col[1:] / d  # (k1 - j - 1, n)
        w[j] = t / d
    y = w.unsqueeze(0) if z is None else torch.stack([w + z, w])  # (2, k1, n)
    x = torch.empty_like(y)
    for j in reversed(range(k1)):  # back substitution with L^T
        x[:, j] = (y[:, j] - (L[j + 1:, j] * x[:, j + 1:]).sum(1)) / L[j, j]
    return x


def _variance(r: torch.Tensor) -> float:
    """Var(r), floored at (0.1 max|r|)^2 so constant or near-constant ratings keep a sane precision."""
    floor = (0.1 * max(float(r.abs().max()), 1e-3)) ** 2
    return max(float(r.var()) if len(r) > 1 else 0.0, floor)


def _check(train: RatingData, n_factors: int, n_samples: int, n_burnin: int, alpha: float | None,
           val: RatingData | None = None) -> None:
    who = "fit_bpmf()"
    if train.n_ratings == 0 or not torch.isfinite(train.rating).all():
        raise ValueError(f"{who}: train must hold at least one rating and no NaN/inf ratings; got {train!r}")
    for name, value, low in (("n_factors", n_factors, 1), ("n_samples", n_samples, 1), ("n_burnin", n_burnin, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{who}: {name} must be an integer >= {low}; got {value!r}")
    if val is not None:
        for name, idx, n in (("user_idx", val.user_idx, train.n_users), ("item_idx", val.item_idx, train.n_items)):
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise ValueError(f"{who}: val.{name} holds numbers outside 0..{n - 1}, the numbering of train; "
                                 f"split val from the same RatingData as train")
        if not torch.isfinite(val.rating).all():
            raise ValueError(f"{who}: val.rating contains NaN or inf; drop or fix those ratings first")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"{who}: noise_precision must be > 0 (or None for the default); got {alpha!r}")


def _sample_sse(sides: dict[str, _Side], X: dict[str, torch.Tensor], gram: torch.Tensor, rhs: torch.Tensor,
                centred_ss: float) -> torch.Tensor:
    r"""Training squared error of the current sample, from the item half-step's sums (float64 scalar).

    With :math:`t = r - \mu - b_u`: :math:`\sum t^2 - 2\sum_i x_i^\top \sum_u t\,\tilde p_u
    + \sum_i x_i^\top G_i x_i`, where :math:`\sum t^2 = \sum (r-\mu)^2 - 2\sum_u b_u s_u + \sum_u n_u b_u^2`.
    """
    b_u, x = X["user"][:, -1].double(), X["item"].T  # (n_users,), (k1, n_items)
    users = sides["user"]
    t_ss = centred_ss - 2 * (b_u * users.sums[:, 0].double()).sum() + (users.counts.double() * b_u ** 2).sum()
    quad = ((gram * x.unsqueeze(1)).sum(0) - 2 * rhs) * x  # (k1, n_items)
    return t_ss + quad.double().sum()


def fit_bpmf(train: RatingData, *, n_factors: int = 6, n_samples: int = 16, n_burnin: int = 4,
             noise_precision: float | None = None, seed: int = 0, device: str | torch.device = "auto",
             val: RatingData | None = None, progress: bool = False,
             callback: Callable[[int, History], None] | None = None) -> tuple[BiasedMF, History]:
    r"""Gibbs-sample a biased MF and return its posterior-mean predictor as a :class:`BiasedMF`.

    Sweep 0 is a ridge (ALS) warm start with the prior :math:`\mathcal N(0, I)`; the next ``n_burnin - 1``
    sweeps are discarded; the last ``n_samples`` sweeps are averaged, each as (user draw, item conditional
    mean) (see the module docstring). The defaults are the CLI's, chosen on validation splits.

    Args:
        train: training ratings; every user and item of ``train.n_users``/``n_items`` gets a row.
        n_factors: rank :math:`k` of each sample (the returned model has ``n_factors * n_samples``).
        n_samples: sweeps averaged. n_burnin: sweeps discarded first.
        noise_precision: :math:`\alpha`; ``None`` uses ``DEFAULT_PRECISION_SCALE / Var(train.rating)``.
        seed: seeds the initial item factors and every draw (CPU generator, so any device draws the same).
        device, val, progress, callback: as in :func:`mfutils.train.fit_sgd`.
    Returns:
        ``(model, history)``. ``history.train_loss`` is the current sample's training MSE and
        ``train_rmse`` its square root; ``val_rmse`` scores the running posterior mean (the current
        sample during burn-in), and is ``nan`` without ``val``.
    """
    _check(train, n_factors, n_samples, n_burnin, noise_precision, val)
    device, generator = resolve_device(device), make_generator(seed)
    (u, i, r), val_data = _on(train, device), _on(val, device)
    global_mean, k = float(r.mean()), n_factors
    alpha = noise_precision or DEFAULT_PRECISION_SCALE / _variance(r)
    centred = r - global_mean  # (n_ratings,)
    sides = {"user": _Side(u, i, centred, train.n_users, train.n_items, k + 1),
             "item": _Side(i, u, centred, train.n_items, train.n_users, k + 1)}
    centred_ss = float((centred.double() ** 2).sum())
    X = {"user": torch.zeros(train.n_users, k + 1, device=device),
         "item": torch.cat([0.1 * torch.randn(train.n_items, k, generator=generator),
                            torch.zeros(train.n_items, 1)], 1).to(device)}  # rows (p, b): (n, k + 1)
    model = BiasedMF(train.n_users, train.n_items, k * n_samples, global_mean=global_mean, init_std=0.0,
                     device=device)
    val_sum, history = None, History(method="bpmf")
    for sweep in _epochs(n_burnin + n_samples, progress, "fit_bpmf()"):
        start = time.perf_counter()
        for side, other in (("user", "item"), ("item", "user")):
            prior = ((torch.zeros(k + 1, device=device), _WARM_PRECISION * torch.eye(k + 1, device=device))
                     if sweep == 0 else _sample_hyper(X[side], generator))
            gram, rhs = sides[side].sums_for(X[other])  # (k + 1, k + 1, n), (k + 1, n)
            X[side], item_mean = _draw(gram, rhs, *prior, alpha, generator if sweep else None)
        kept = {"user": X["user"], "item": item_mean}  # Rao-Blackwellised: E[item rows | users]
        scores = [_sample_sse(sides, X, gram, rhs, centred_ss) / len(r)]
        if sweep >= n_burnin:
            _add_sample(model, kept, sweep - n_burnin, n_samples)
        if val_data is not None:
            pred = _predict(kept["user"], kept["item"], val_data[0], val_data[1])  # (n_val,)
            val_sum = pred if sweep <= n_burnin else val_sum + pred  # restarts at the first kept sample
            shown = val_sum / (sweep - n_burnin + 1) if sweep >= n_burnin else val_sum
            scores.append(((shown + global_mean - val_data[2]) ** 2).mean())
        mse = torch.stack([s.to(r.dtype) for s in scores]).tolist()  # one sync (and _draw's finiteness checks)
        history = history.append(train_loss=mse[0], train_rmse=math.sqrt(max(mse[0], 0.0)),
                                 val_rmse=math.sqrt(mse[1]) if val is not None else math.nan,
                                 seconds=time.perf_counter() - start)
        if callback is not None:
            callback(sweep, history)
    return model, history


def _predict(X_u: torch.Tensor, X_i: torch.Tensor, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    r""":math:`b_u + b_i + p_u^\top q_i` from rows ``(p, b)``, shape ``(B,)``."""
    p, q = X_u.index_select(0, u), X_i.index_select(0, i)  # (B, k + 1) each
    return (p[:, :-1] * q[:, :-1]).sum(1) + p[:, -1] + q[:, -1]


@torch.no_grad()
def _add_sample(model: BiasedMF, X: dict[str, torch.Tensor], s: int, n_samples: int) -> None:
    """Write sample ``s`` into the posterior-mean model: factors scaled by 1/sqrt(S), biases averaged."""
    k, scale = X["user"].shape[1] - 1, 1.0 / math.sqrt(n_samples)
    for table, bias, rows in ((model.user_factors, model.user_bias, X["user"]),
                              (model.item_factors, model.item_bias, X["item"])):
        table.weight[:, s * k:(s + 1) * k] = rows[:, :k] * scale
        bias.weight.add_(rows[:, k:], alpha=1.0 / n_samples)


def _posterior_mean(samples: list[tuple[torch.Tensor, torch.Tensor]], global_mean: float,
                    device: torch.device) -> BiasedMF:
    """The posterior-mean :class:`BiasedMF` of a list of ``(X_user, X_item)`` samples (rows ``(p, b)``)."""
    n_users, n_items, k = samples[0][0].shape[0], samples[0][1].shape[0], samples[0][0].shape[1] - 1
    model = BiasedMF(n_users, n_items, k * len(samples), global_mean=global_mean, init_std=0.0, device=device)
    for s, (X_u, X_i) in enumerate(samples):
        _add_sample(model, {"user": X_u.to(device), "item": X_i.to(device)}, s, len(samples))
    return model
