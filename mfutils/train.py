r"""Trainers for :class:`~mfutils.models.BiasedMF`: minibatch SGD/Adam (:func:`fit_sgd`) and ALS (:func:`fit_als`).

Both minimise the same per-rating objective (see :class:`~mfutils.models.BiasedMF`),

.. math:: L = \frac1N \sum_{(u,i)} \Big[(r_{ui} - \hat r_{ui})^2
          + \lambda\,(\lVert p_u\rVert^2 + \lVert q_i\rVert^2 + b_u^2 + b_i^2)\Big],

take the same keyword names (``reg``, ``n_epochs``, ``device``, ``val``, ``callback`` …) and return the same
:class:`History`, so plots and metrics never care which one ran.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from mfutils.data import RatingData
from mfutils.models import BiasedMF

__all__ = ["History", "resolve_device", "make_generator", "seed_everything", "fit_sgd", "fit_als",
           "als_half_step", "phase_seconds"]

_EVAL_CHUNK = 1 << 18

_PHASES: dict[str, float] | None = None  # the dict of the open phase_seconds() block, if any


@contextlib.contextmanager
def phase_seconds() -> Iterator[dict[str, float]]:
    """Where a CPU epoch's time goes: inside this block, the fused SGD path and ALS add the wall-clock seconds
    of each phase of their epochs to the yielded dict (phase name -> seconds, summed over the block).

    Phases of ``fit_sgd(fused=True)``: ``"permutation"`` (drawing it; the only phase the other SGD paths time),
    ``"gather records"`` (shuffling the packed ratings and unpacking each batch), ``"gather rows"`` (the
    chunk's factor and bias rows), ``"arithmetic"`` (errors, loss, updates) and ``"scatter-add"``
    (adding the updates to the tables).
    Phases of ``fit_als``: ``"targets"`` (each half-step's targets), ``"gather rows"`` (the padded blocks of
    the other side's rows), ``"products"`` (Gram matrices and right-hand sides), ``"factorization"``
    (ridge and Cholesky), ``"solves"`` (the two triangular solves, written back) and ``"loss"``.
    What no phase covers (Python between them, validation) is the rest of ``History.seconds``.

    On the CPU every operation has finished when it returns, so a clock read after it is exact; the trainers
    refuse to run on a GPU inside the block, where the clock would time kernel launches, not their work.
    Blocks do not nest, and a block is process-wide: a trainer running in another thread meanwhile adds to
    the same dict.

    Example:
        >>> with phase_seconds() as phases:  # doctest: +SKIP
        ...     history = fit_als(model, data, n_epochs=1, device="cpu")
        >>> phases["factorization"] / sum(history.seconds)  # doctest: +SKIP
    """
    global _PHASES
    if _PHASES is not None:
        raise RuntimeError("phase_seconds(): a block is already open; blocks do not nest")
    _PHASES = {}
    try:
        yield _PHASES
    finally:
        _PHASES = None


class _Timed:
    """Adds the wall-clock seconds of a ``with`` block to ``_PHASES[name]``."""
    __slots__ = ("name", "start")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if _PHASES is not None:
            _PHASES[self.name] = _PHASES.get(self.name, 0.0) + time.perf_counter() - self.start


_UNTIMED = contextlib.nullcontext()


def _phase(name: str) -> contextlib.AbstractContextManager:
    """``with _phase(name):`` times the block inside a :func:`phase_seconds` block; a no-op otherwise."""
    return _UNTIMED if _PHASES is None else _Timed(name)


def _check_phase_device(who: str, device: torch.device) -> None:
    if _PHASES is not None and device.type != "cpu":
        raise ValueError(f"{who}: phase_seconds() times CPU epochs only; on {device} the clock would read "
                         f"when kernels were queued, not when they finished: train on device='cpu'")


@dataclass(frozen=True)
class History:
    r"""Per-epoch record of a fit; every list has one entry per finished epoch (epoch ``e`` is index ``e``).

    Attributes:
        method: which trainer/optimizer ran, e.g. ``"sgd"``, ``"adam"``, ``"als"``.
        train_loss: the objective :math:`L` (squared error plus λ term, per rating) in each epoch.
        train_rmse: RMSE on the training ratings in each epoch (SGD: accumulated during the epoch).
        val_rmse: RMSE on ``val`` after each epoch (``nan`` when no ``val`` was given).
        seconds: wall-clock seconds of each epoch, evaluation included.
    """

    method: str = ""
    train_loss: list[float] = field(default_factory=list)
    train_rmse: list[float] = field(default_factory=list)
    val_rmse: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, *, train_loss: float, train_rmse: float, val_rmse: float, seconds: float) -> History:
        """A new History with one more epoch (this one is left unchanged)."""
        return replace(self, train_loss=[*self.train_loss, train_loss], train_rmse=[*self.train_rmse, train_rmse],
                       val_rmse=[*self.val_rmse, val_rmse], seconds=[*self.seconds, seconds])

    @property
    def n_epochs(self) -> int:
        return len(self.train_loss)

    @property
    def best_epoch(self) -> int:
        """Index of the lowest ``val_rmse`` (or of the lowest ``train_loss`` when there is no validation)."""
        curve = self.val_rmse if any(math.isfinite(v) for v in self.val_rmse) else self.train_loss
        return int(np.nanargmin(curve)) if curve else -1

    def as_dict(self) -> dict[str, list[float]]:
        """Equal-length columns (``epoch`` first), ready for ``pandas.DataFrame`` or plotting."""
        return {"epoch": list(range(self.n_epochs)), "train_loss": self.train_loss,
                "train_rmse": self.train_rmse, "val_rmse": self.val_rmse, "seconds": self.seconds}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → cuda if available, else cpu; an explicit device always wins (and must exist)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"resolve_device(): unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"resolve_device(): device={str(device)!r} was requested but CUDA is not available "
                           f"(torch {torch.__version__}); use device='auto' or 'cpu'")
    return resolved


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh :class:`torch.Generator` on ``device`` seeded with ``seed`` (the library never uses the global RNG)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (for notebooks' own toy randomness, not the library)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _check_data(who: str, model: BiasedMF, data: RatingData, arg: str) -> None:
    if data.n_ratings == 0:
        raise ValueError(f"{who}: {arg} has no ratings")
    for name, idx, n in (("user_idx", data.user_idx, model.n_users), ("item_idx", data.item_idx, model.n_items)):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = hi if hi >= n else lo
            kind = name.split("_")[0]
            raise ValueError(f"{who}: {arg}.{name} contains {bad} but the model has n_{kind}s={n} "
                             f"(valid 0..{n - 1}); build the model from the same RatingData you train on.")
    if not torch.isfinite(data.rating).all():
        raise ValueError(f"{who}: {arg}.rating contains NaN or inf; drop or fix those ratings first")


def _check_common(who: str, model: BiasedMF, train: RatingData, val: RatingData | None, reg: float,
                  n_epochs: int, patience: int | None) -> None:
    if not isinstance(model, BiasedMF):
        raise TypeError(f"{who}: model must be a BiasedMF; got {type(model).__name__}")
    if not reg >= 0:
        raise ValueError(f"{who}: reg must be >= 0; got {reg!r}")
    if int(n_epochs) != n_epochs or n_epochs < 1:
        raise ValueError(f"{who}: n_epochs must be a positive integer; got {n_epochs!r}")
    if patience is not None and (val is None or patience < 1):
        raise ValueError(f"{who}: early_stopping_patience={patience!r} needs val= and a value >= 1")
    _check_data(who, model, train, "train")
    if val is not None:
        _check_data(who, model, val, "val")


def _on(data: RatingData | None, device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """(user_idx, item_idx, rating) on ``device``: the one host-to-device copy of a fit."""
    if data is None:
        return None
    return tuple(t.to(device) for t in (data.user_idx, data.item_idx, data.rating))


@torch.no_grad()
def _rmse_on(model: BiasedMF, data: tuple[torch.Tensor, ...] | None) -> float:
    if data is None:
        return math.nan
    was_training = model.training
    model.eval()
    sse = torch.zeros((), device=data[0].device)
    for u, i, r in zip(*(t.split(_EVAL_CHUNK) for t in data)):
        sse += ((model(u, i) - r) ** 2).sum()
    model.train(was_training)
    return math.sqrt(sse.item() / len(data[0]))


_SSE_CHUNK = 1 << 14  # ratings per step in _sse: the (chunk, k) gathers stay in cache


@torch.no_grad()
def _sse(model: BiasedMF, u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over all ratings, chunk by chunk (a 0-d tensor on the model's device)."""
    sse = torch.zeros((), device=r.device)
    for uc, ic, rc in zip(u.split(_SSE_CHUNK), i.split(_SSE_CHUNK), r.split(_SSE_CHUNK)):
        sse += ((rc - model(uc, ic)) ** 2).sum()
    return sse


@torch.no_grad()
def _side_penalties(model: BiasedMF, user_counts: torch.Tensor,
                    item_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The per-rating penalty summed over all ratings, from the tables, in two parts (0-d tensors): the
    users' :math:`\sum_u n_u(\lVert p_u\rVert^2 + b_u^2)` and the items' :math:`\sum_i n_i(\lVert q_i\rVert^2
    + b_i^2)`; together, the same as summing ``model.penalty`` rating by rating."""
    users = user_counts @ model.user_factors.weight.pow(2).sum(1)
    items = item_counts @ model.item_factors.weight.pow(2).sum(1)
    if model.user_bias is not None:
        users = users + user_counts @ model.user_bias.weight[:, 0] ** 2
        items = items + item_counts @ model.item_bias.weight[:, 0] ** 2
    return users, items


class _EarlyStopper:
    """Keeps a copy of the best parameters by validation RMSE; says when to stop."""

    def __init__(self, model: BiasedMF, patience: int | None) -> None:
        self.model, self.patience, self.best, self.best_rmse, self.bad = model, patience, None, math.inf, 0

    def should_stop(self, val_rmse: float) -> bool:
        if self.patience is None:
            return False
        if val_rmse < self.best_rmse:
            self.best_rmse, self.bad = val_rmse, 0
            self.best = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.patience

    def restore(self) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best)


def _epochs(n_epochs: int, progress: bool, desc: str):
    """``range(n_epochs)``, wrapped in a tqdm bar when ``progress`` and ``$TQDM_DISABLE`` is not 1/true/yes.

    The variable is read here, at call time: tqdm itself reads it only when it is first imported (and
    then treats any value, even ``0``, as true).
    """
    if not progress or os.environ.get("TQDM_DISABLE", "").lower() in {"1", "true", "yes"}:
        return range(n_epochs)
    from tqdm import tqdm

    return tqdm(range(n_epochs), desc=desc, unit="epoch", disable=False)


_DEFAULT_LR = {"sgd": 2.0, "adam": 0.01}


def _make_optimizer(model: BiasedMF, optimizer: str, lr: float) -> torch.optim.Optimizer:
    sparse = model.user_factors.sparse
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return (torch.optim.SparseAdam if sparse else torch.optim.Adam)(model.parameters(), lr=lr)


def _end_epoch(history: History, epoch: int, *, model: BiasedMF, val_data, train_loss: float, mse: float,
               start: float, callback, stopper: _EarlyStopper) -> tuple[History, bool]:
    """Evaluate, record and report a finished epoch (both trainers); True when early stopping says stop."""
    val_rmse = _rmse_on(model, val_data)
    history = history.append(train_loss=train_loss, train_rmse=math.sqrt(mse), val_rmse=val_rmse,
                             seconds=time.perf_counter() - start)
    if callback is not None:
        callback(epoch, history)
    return history, stopper.should_stop(val_rmse)


def _autograd_sgd_epoch(model: BiasedMF, opt: torch.optim.Optimizer, u: torch.Tensor, i: torch.Tensor,
                        r: torch.Tensor, perm: torch.Tensor, *, reg: float, batch_size: int) -> torch.Tensor:
    """One epoch of minibatch steps through autograd and ``opt``; the epoch's [sum of objective, sum of error²]."""
    totals = torch.zeros(2, device=r.device)
    for batch in perm.split(batch_size):  # (B,) each
        err2 = (r[batch] - model(u[batch], i[batch])) ** 2  # (B,)
        objective = err2 + reg * model.penalty(u[batch], i[batch])  # (B,)
        loss = objective.sum() / batch_size  # the batch mean when the batch is full
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        totals += torch.stack([objective.detach().sum(), err2.detach().sum()])
    return totals


_FUSED_CHUNK = {"cpu": 1 << 13}  # ratings per pass on the CPU: smaller (chunk, k) temporaries than a whole batch


def _pack_ratings(u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """One 16-byte record per rating, ``[user, item, rating's float32 bits, 0]`` as int32: ``(n_ratings, 4)``.

    Shuffling the records takes one random read per rating instead of three (one per array).
    """
    largest = max(int(u.max()), int(i.max()))
    if largest >= 1 << 31:
        raise ValueError(f"fused SGD packs user and item numbers into int32; got numbers up to {largest}, "
                         f"beyond 2**31 - 1: use fused=False")
    records = torch.zeros(len(r), 4, dtype=torch.int32, device=r.device)  # (n_ratings, 4)
    records[:, 0], records[:, 1] = u, i
    records[:, 2] = r.to(torch.float32).view(torch.int32)
    return records


@torch.no_grad()
def _fused_sgd_epoch(model: BiasedMF, records: torch.Tensor, perm: torch.Tensor, *, lr: float, reg: float,
                     batch_size: int, shuffled: torch.Tensor | None = None) -> torch.Tensor:
    r"""One epoch of plain minibatch SGD with the gradient written out: no autograd graph, no optimizer.

    Per batch, with :math:`e = r - \hat r` and :math:`c = 2\eta/B`, every rating adds
    :math:`c\,(e\,q_i - \lambda p_u)` to :math:`p_u`, :math:`c\,(e\,p_u - \lambda q_i)` to :math:`q_i` and
    :math:`c\,(e - \lambda b)` to each bias, all computed from the parameters before the step: the step
    ``fit_sgd`` takes through autograd and ``torch.optim.SGD``, up to float rounding.

    ``records`` are the ratings packed by :func:`_pack_ratings`, shuffled here by ``perm`` with one gather
    into ``shuffled`` (a buffer like ``records``, reused from epoch to epoch: a fresh one would have every
    page of its hundreds of megabytes faulted in again).
    A batch's updates are computed in chunks of ``_FUSED_CHUNK`` ratings on the CPU (the whole batch on a
    GPU), with the factor :math:`c` already in them, written into batch-sized buffers, and then added to
    the tables by ``scatter_add_`` with an index expanded along the factors, which sums the contributions
    of a row that appears more than once (on the CPU, ``index_add_`` with ``alpha=c`` instead takes more
    than twice as long). Returns the epoch's ``[sum of objective, sum of squared error]``.
    """
    with _phase("gather records"):
        shuffled = torch.index_select(records, 0, perm, out=shuffled)  # (n_ratings, 4): one random read per rating
    tables = (model.user_factors.weight, model.item_factors.weight)
    biases = (model.user_bias.weight[:, 0], model.item_bias.weight[:, 0]) if model.user_bias is not None else None
    k, step = tables[0].shape[1], 2 * lr / batch_size
    decay = -step * reg
    n_ratings = len(records)
    width = min(batch_size, n_ratings)
    chunk = min(width, _FUSED_CHUNK.get(records.device.type, width))
    updates = [t.new_empty(width, k) for t in tables]  # (B, k) each: the batch's updates to P and Q rows
    bias_updates = [b.new_empty(width) for b in biases] if biases is not None else None  # (B,) each
    totals = torch.zeros(2, device=records.device)
    for start in range(0, n_ratings, batch_size):
        with _phase("gather records"):
            batch = shuffled[start:start + batch_size]  # (B, 4)
            rows = (batch[:, 0].long(), batch[:, 1].long())  # (B,) each: user and item numbers
            target = batch[:, 2].view(torch.float32) - model.global_mean  # (B,): r - mu
        for s in range(0, len(target), chunk):
            at = slice(s, s + chunk)
            with _phase("gather rows"):
                cu, ci = rows[0][at], rows[1][at]  # (C,) each
                p, q = tables[0].index_select(0, cu), tables[1].index_select(0, ci)  # (C, k) each, copies
                if biases is not None:
                    b_u, b_i = biases[0].index_select(0, cu), biases[1].index_select(0, ci)  # (C,) each
            with _phase("arithmetic"):
                err = target[at] - torch.linalg.vecdot(p, q).float()  # (C,), float32
                flat_p, flat_q = p.view(-1).float(), q.view(-1).float()  # float32 sums (no copy when float32)
                penalty = torch.dot(flat_p, flat_p) + torch.dot(flat_q, flat_q)  # summed over the chunk
                if biases is not None:
                    err -= b_u.float() + b_i.float()
                    penalty = penalty + torch.dot(b_u.float(), b_u.float()) + torch.dot(b_i.float(), b_i.float())
                sse = torch.dot(err, err)
                totals += torch.stack([sse + reg * penalty, sse])
                e = (err * step).to(p.dtype)  # (C,): c e
                n = len(e)
                torch.mul(q, decay, out=updates[1][s:s + n]).addcmul_(p, e[:, None])  # c (e p_u - lambda q_i)
                torch.mul(p, decay, out=updates[0][s:s + n]).addcmul_(q, e[:, None])  # c (e q_i - lambda p_u)
                if biases is not None:
                    torch.mul(b_u, decay, out=bias_updates[0][s:s + n]).add_(e)  # c (e - lambda b_u)
                    torch.mul(b_i, decay, out=bias_updates[1][s:s + n]).add_(e)
        m = len(target)
        with _phase("scatter-add"):
            for table, row, update in zip(tables, rows, updates):
                table.scatter_add_(0, row[:, None].expand(-1, k), update[:m])
            if biases is not None:
                for bias, row, update in zip(biases, rows, bias_updates):
                    bias.scatter_add_(0, row, update[:m])
    return totals


def fit_sgd(model: BiasedMF, train: RatingData, *, val: RatingData | None = None,
            optimizer: Literal["sgd", "adam"] = "sgd", lr: float | None = None, reg: float = 0.05,
            n_epochs: int = 20, batch_size: int = 1024, seed: int = 0, device: str | torch.device = "auto",
            early_stopping_patience: int | None = None, progress: bool = False, fused: bool = False,
            callback: Callable[[int, History], None] | None = None) -> History:
    r"""Train ``model`` by minibatch gradient descent on the per-rating objective.

    Each epoch shuffles the ratings with a permutation drawn on ``device`` from a generator seeded with
    ``seed`` (so a GPU never waits for the host to shuffle; a GPU run takes its steps in another order than
    a CPU run with the same seed) and, per batch :math:`\mathcal B`, takes one
    optimizer step on :math:`\frac{1}{B}\sum_{\mathcal B} [e_{ui}^2 + \lambda\,\mathrm{pen}_{ui}]` with
    :math:`B` = ``batch_size`` (:meth:`~mfutils.models.BiasedMF.penalty`): the batch mean for full batches,
    and the same per-rating weight for a short last batch (or data smaller than one batch), so a tiny data
    set cannot take giant steps. For plain SGD a factor row seen once in the batch moves by
    :math:`\Delta p_u = \tfrac{2\eta}{B}(e_{ui} q_i - \lambda p_u)`, which is Surprise's per-rating
    update with :math:`\gamma = 2\eta/B`; hence the large default ``lr`` for ``"sgd"``.

    Args:
        model: a :class:`~mfutils.models.BiasedMF` built with ``train.n_users`` and ``train.n_items``;
            moved to ``device`` in place.
        train: training ratings; ``val``: optional ratings for per-epoch RMSE and early stopping.
        optimizer: ``"sgd"`` or ``"adam"`` (``SparseAdam`` if the model has sparse embeddings).
        lr: step size :math:`\eta`; ``None`` picks 2.0 for ``"sgd"`` and 0.01 for ``"adam"``.
        reg: :math:`\lambda`. n_epochs: passes over ``train``. batch_size: ratings per step.
        seed: seeds the shuffling on ``device`` (the model's own seed set its initial values).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
        early_stopping_patience: stop after this many epochs without a better ``val`` RMSE, and restore
            the parameters of the best epoch (needs ``val``).
        progress: show a tqdm bar over epochs (``TQDM_DISABLE=1`` silences it).
        fused: (``optimizer="sgd"`` only) take the same steps with the gradient written out and applied
            with ``scatter_add_`` (:func:`_fused_sgd_epoch`): no autograd graph, no sparse-gradient
            bookkeeping, several times faster on large data; equal to the autograd path up to float rounding.
        callback: called as ``callback(epoch, history)`` after every epoch.
    Returns:
        The :class:`History` of the run (``method="sgd-fused"`` when ``fused``).
    Raises:
        ValueError: bad hyperparameters, or ids outside the model's ranges (message says which).
        FloatingPointError: the loss diverged to NaN/inf (the step size is too large).
    """
    who = "fit_sgd()"
    if optimizer not in _DEFAULT_LR:
        raise ValueError(f"{who}: optimizer must be one of {sorted(_DEFAULT_LR)}; got {optimizer!r}")
    if fused and optimizer != "sgd":
        raise ValueError(f"{who}: fused=True writes out the plain SGD step; it needs optimizer='sgd', "
                         f"got {optimizer!r}")
    lr = _DEFAULT_LR[optimizer] if lr is None else lr
    if not lr > 0 or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{who}: lr must be > 0 and batch_size a positive integer; got lr={lr!r}, "
                         f"batch_size={batch_size!r}")
    _check_common(who, model, train, val, reg, n_epochs, early_stopping_patience)
    device = resolve_device(device)
    _check_phase_device(who, device)
    model.to(device).train()
    (u, i, r), val_data = _on(train, device), _on(val, device)
    opt = None if fused else _make_optimizer(model, optimizer, lr)
    records = _pack_ratings(u, i, r) if fused else None
    shuffled = torch.empty_like(records) if fused else None  # reused every epoch, as is perm
    perm = torch.empty(len(r), dtype=torch.int64, device=device)
    generator, stopper = make_generator(seed, device), _EarlyStopper(model, early_stopping_patience)
    history = History(method="sgd-fused" if fused else optimizer)
    for epoch in _epochs(n_epochs, progress, who):
        start = time.perf_counter()
        with _phase("permutation"):
            torch.randperm(len(r), generator=generator, device=device, out=perm)  # (n_ratings,)
        if fused:
            totals = _fused_sgd_epoch(model, records, perm, lr=lr, reg=reg, batch_size=batch_size,
                                      shuffled=shuffled)
        else:
            totals = _autograd_sgd_epoch(model, opt, u, i, r, perm, reg=reg, batch_size=batch_size)
        train_loss, mse = (totals / len(r)).tolist()  # the epoch's one CPU-GPU sync
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{who}: the training loss became {train_loss} in epoch {epoch}; "
                                     f"lower lr (now {lr}) or raise reg")
        history, stop = _end_epoch(history, epoch, model=model, val_data=val_data, train_loss=train_loss,
                                   mse=mse, start=start, callback=callback, stopper=stopper)
        if stop:
            break
    stopper.restore()
    return history


def als_half_step(crow: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, other: torch.Tensor,
                  ridge: torch.Tensor, *, ones: bool = False) -> torch.Tensor:
    r"""Solve one small ridge regression per row of a sparse pattern, all rows in one batch.

    Row :math:`u` has columns :math:`I_u` with targets :math:`t_{ui}`; with :math:`Y` = ``other``,

    .. math:: x_u = \arg\min_x \sum_{i\in I_u} (t_{ui} - x^\top y_i)^2 + \sum_j \rho_{uj} x_j^2
              = \big(Y_{I_u}^\top Y_{I_u} + \mathrm{diag}(\rho_u)\big)^{-1} Y_{I_u}^\top t_{I_u}.

    The Gram matrices :math:`Y_{I_u}^\top Y_{I_u}` are built by batched dense matrix products over chunks
    of rows of similar length (:func:`_row_gram_chunks`), and each chunk is solved by one batched Cholesky
    factorisation and two batched triangular solves: no Python loop over rows, and memory bounded by the
    chunk, not by all rows' Gram matrices.

    Args:
        crow: int64 CSR row pointers, shape ``(n_rows + 1,)``: row ``u`` owns entries ``crow[u]:crow[u+1]``.
        cols: int64 column numbers, shape ``(nnz,)``, sorted within each row, no duplicates.
        target: float32 :math:`t`, shape ``(nnz,)``, aligned with ``cols``.
        other: float32 :math:`Y`, shape ``(n_cols, k)``.
        ridge: float32 :math:`\rho > 0`, shape ``(n_rows, k)``. All on one device.
        ones: solve against :math:`[Y, 1]` instead (a column of ones appended: the bias of a biased model)
            without building it; ``ridge`` and the result then have ``k + 1`` columns.
    Returns:
        float32 :math:`X`, shape ``(n_rows, k)`` (``k + 1`` with ``ones``).
    """
    return _solve_rows(crow, cols, target, other, ridge, ones=ones)[0]


def _solve_rows(crow: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, other: torch.Tensor,
                ridge: torch.Tensor, *, ones: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`als_half_step`'s solution :math:`X`, and the minimum it attains, summed over the rows.

    At the solution, :math:`(G_u + \mathrm{diag}\,\rho_u)\,x_u = h_u` with :math:`h_u = Y_{I_u}^\top t_{I_u}`, so
    row :math:`u`'s objective :math:`\lVert t_{I_u} - Y_{I_u}x_u\rVert^2 + \sum_j\rho_{uj}x_{uj}^2` equals
    :math:`t_{I_u}^\top t_{I_u} - x_u^\top h_u`: two dot products per chunk instead of another pass over the
    ratings. Each chunk's difference is taken in float32 and the chunks are summed in float64.

    Returns:
        ``(X, objective)``: float32 ``(n_rows, k)`` (``k + 1`` with ``ones``) and a float64 0-d tensor.
    """
    solved = other.new_zeros(ridge.shape)  # (n_rows, k): a row without entries solves to zero
    objective = torch.zeros((), dtype=torch.float64, device=other.device)
    for rows, gram, rhs, sumsq in _row_gram_chunks(crow, cols, target, other, ones=ones):  # (m,), (m, k, k), (m, k)
        with _phase("factorization"):
            gram.diagonal(dim1=1, dim2=2).add_(ridge[rows])
            chol = _cholesky(gram)  # (m, k, k): L with L L^T = gram
        with _phase("solves"):
            half = torch.linalg.solve_triangular(chol, rhs.unsqueeze(2), upper=False)  # (m, k, 1): L^-1 rhs
            x = torch.linalg.solve_triangular(chol.mT, half, upper=True).squeeze(2)  # (m, k): L^-T L^-1 rhs
            solved[rows] = x
            objective += sumsq - torch.dot(x.reshape(-1), rhs.reshape(-1))  # t^T t - x^T h, over the chunk
    return solved, objective


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky factor of SPD ``A`` (``(n, k, k)``), redone in float64 if float32 rounding broke it.

    Raises:
        FloatingPointError: a matrix is not positive definite even in float64 (a ridge too small for its
            Gram matrix, which has rank below ``k`` when a row has fewer entries than ``k``).
    """
    chol, info = torch.linalg.cholesky_ex(A)
    if bool((info != 0).any()):  # rare: badly scaled ratings; costs one sync per call
        chol, info = torch.linalg.cholesky_ex(A.double())
        if bool((info != 0).any()):
            raise FloatingPointError("a least-squares system of ALS is singular to working precision even in "
                                     "float64: its ridge is too small for its Gram matrix (ratings of large "
                                     "magnitude, or more factors than a row has ratings, do that)")
        chol = chol.to(A.dtype)
    return chol


_GRAM_CHUNK_FLOATS = {"cpu": 1 << 20, "cuda": 1 << 26}  # floats per chunk: 4 MB stays in a CPU's cache


def _row_gram_chunks(crow: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, other: torch.Tensor, *,
                     ones: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""Per row with entries: the Gram matrix of its columns' ``other`` rows, and their ``target``-weighted sum.

    Rows are taken in order of decreasing length, in chunks of similar length: a chunk of ``m`` rows of
    at most ``w`` entries gathers its columns' rows of :math:`Y` into a zero-padded ``(m, w, k)`` block
    :math:`B` (padding slots gather a row of zeros appended to :math:`Y`) and forms every
    :math:`B_u^\top B_u` with one batched matrix product, and every :math:`t_u^\top B_u` with another,
    written as a row vector times the block (a column-vector product :math:`B_u^\top t_u` runs several
    times slower on the CPU). The arithmetic runs as dense matrix products; a chunk's block and Gram
    matrices (about ``_GRAM_CHUNK_FLOATS`` floats each) stay in cache and bound the memory; padding costs
    at most the length difference within a chunk. Rows without entries are never yielded.

    With ``ones``, :math:`Y` is ``other`` with a column of ones appended, which is never built: the block
    gathers rows of ``other`` alone (at rank 64, rows of 64 floats copy much faster than rows of 65), and
    the ones column's entries of the Gram matrix and ``rhs`` are the block's column sums, the row's count
    and the sum of its targets.

    Yields:
        ``(rows, gram, rhs, sumsq)``: int64 row numbers ``(m,)``, float32 ``(m, k, k)`` and ``(m, k)``
        (``k + 1`` for ``k`` with ``ones``), and the chunk's :math:`\sum_u t_u^\top t_u` (a float32 0-d tensor).
    """
    n_other, k = other.shape
    other = torch.cat([other, other.new_zeros(1, k)])  # (n_other + 1, k): row n_other is the padding
    size = k + 1 if ones else k  # the order of each Gram matrix
    counts = crow[1:] - crow[:-1]  # (n_rows,)
    order = torch.argsort(counts, descending=True, stable=True)  # longest rows first
    widths = counts[order].tolist()  # one host copy per half-step
    floats = _GRAM_CHUNK_FLOATS.get(other.device.type, 1 << 20)
    start, n_filled = 0, len(widths) - widths.count(0)  # rows with entries come first
    while start < n_filled:
        width = widths[start]
        stop = min(n_filled, start + max(1, min(floats // (width * k), floats // (size * size))))
        with _phase("gather rows"):
            rows = order[start:stop]  # (m,)
            slots = torch.arange(width, device=crow.device)  # (w,)
            valid = slots < counts[rows, None]  # (m, w)
            pos = torch.where(valid, crow[rows, None] + slots, 0)  # (m, w): entry numbers, 0 where padded
            picked = torch.where(valid, cols[pos], n_other)  # (m, w): rows of other, the zero row where padded
            block = other.index_select(0, picked.reshape(-1)).reshape(len(rows), width, k)  # (m, w, k)
            weights = torch.where(valid, target[pos], 0.0)  # (m, w)
        with _phase("products"):
            rhs = torch.bmm(weights.unsqueeze(1), block).squeeze(1)  # (m, k): t_u^T B_u
            gram = torch.bmm(block.transpose(1, 2), block)  # (m, k, k)
            if ones:  # border the Gram matrix and rhs with the ones column's entries
                full = gram.new_empty(len(rows), size, size)  # (m, k + 1, k + 1)
                full[:, :k, :k] = gram
                sums = block.sum(1)  # (m, k): 1^T B_u
                full[:, :k, k], full[:, k, :k] = sums, sums
                full[:, k, k] = counts[rows].to(gram.dtype)  # 1^T 1
                gram, rhs = full, torch.cat([rhs, weights.sum(1, keepdim=True)], 1)  # rhs: (m, k + 1)
        yield rows, gram, rhs, torch.dot(weights.reshape(-1), weights.reshape(-1))
        start = stop


def _by_row(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, ...]:
    """CSR layout: the ``order`` that sorts ratings by (row, col), row pointers ``crow``, sorted ``cols``."""
    order = torch.argsort(rows * (int(cols.max()) + 1) + cols)  # (nnz,)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)  # (n_rows + 1,)
    return order, crow, cols[order]


@torch.no_grad()
def _als_side(model: BiasedMF, side: str, layout: tuple[torch.Tensor, ...], rating: torch.Tensor,
              ridge: torch.Tensor) -> torch.Tensor:
    """Re-solve every user (``side="user"``) or item row given the other side; writes into ``model``.

    Returns the objective those rows reach, summed (a float64 0-d tensor, :func:`_solve_rows`): their
    ratings' squared errors plus their own rows' weighted penalty, at the new values.
    """
    own_f, own_b, other_f, other_b = (
        (model.user_factors, model.user_bias, model.item_factors, model.item_bias) if side == "user"
        else (model.item_factors, model.item_bias, model.user_factors, model.user_bias))
    order, crow, cols = layout
    with _phase("targets"):
        target, other = rating[order] - model.global_mean, other_f.weight  # (nnz,), (n_other, k)
        biased = own_b is not None
        if biased:  # solve [p_u, b_u] against [q_i, 1] on r - mu - b_i
            target = target - other_b.weight[:, 0].index_select(0, cols)
    solved, objective = _solve_rows(crow, cols, target, other,
                                    ridge[:, None].expand(-1, other.shape[1] + biased), ones=biased)
    with _phase("solves"):
        own_f.weight.copy_(solved[:, :model.n_factors])
        if biased:
            own_b.weight.copy_(solved[:, model.n_factors:])
    return objective


def fit_als(model: BiasedMF, train: RatingData, *, val: RatingData | None = None, reg: float = 0.15,
            n_epochs: int = 15, device: str | torch.device = "auto",
            early_stopping_patience: int | None = None, progress: bool = False,
            callback: Callable[[int, History], None] | None = None) -> History:
    r"""Train ``model`` by alternating least squares on the per-rating objective.

    An epoch solves all users given the items, then all items given the users. With biases, user
    :math:`u` solves for :math:`(p_u, b_u)` against :math:`(q_i, 1)` on targets :math:`r_{ui}-\mu-b_i`:

    .. math:: \begin{pmatrix}p_u\\ b_u\end{pmatrix} = \Big(\sum_{i\in I_u}\tilde q_i\tilde q_i^\top
              + \lambda\, n_u I\Big)^{-1} \sum_{i\in I_u} \tilde q_i\,(r_{ui}-\mu-b_i),
              \qquad \tilde q_i = (q_i, 1),

    the exact minimiser of :math:`L` over that row; :math:`\lambda n_u` is the weighted-λ of
    Zhou et al. (2008), which is what the per-rating penalty amounts to. A user with no training
    ratings is solved with :math:`n_u = 1` and gets zero factors and bias. The first half-step
    starts from the model's item factors (its seed). See :func:`als_half_step` for the batched solve.
    The training loss of a sweep is the minimum its item half-step reaches (:func:`_solve_rows`) plus the
    users' penalty: no pass over the ratings beyond the solves.

    Args:
        model, train, val, device, early_stopping_patience, progress, callback: as in :func:`fit_sgd`.
        reg: :math:`\lambda > 0`.
        n_epochs: number of (user, item) sweeps.
    Returns:
        The :class:`History` of the run (``method="als"``).
    """
    who = "fit_als()"
    _check_common(who, model, train, val, reg, n_epochs, early_stopping_patience)
    if not reg > 0:
        raise ValueError(f"{who}: reg must be > 0 (each row's system is singular without it); got {reg!r}")
    device = resolve_device(device)
    _check_phase_device(who, device)
    model.to(device).train()
    (u, i, r), val_data = _on(train, device), _on(val, device)
    layouts = {"user": _by_row(u, i, model.n_users), "item": _by_row(i, u, model.n_items)}
    counts = {s: torch.bincount(x, minlength=n).to(r.dtype)  # (n,): ratings per user, per item
              for s, x, n in (("user", u, model.n_users), ("item", i, model.n_items))}
    ridges = {s: reg * c.clamp(min=1) for s, c in counts.items()}
    stopper, history = _EarlyStopper(model, early_stopping_patience), History(method="als")
    for epoch in _epochs(n_epochs, progress, who):
        start = time.perf_counter()
        for side in ("user", "item"):
            try:
                reached = _als_side(model, side, layouts[side], r, ridges[side])  # the item side's is the sweep's
            except FloatingPointError as exc:
                raise FloatingPointError(f"{who}: in sweep {epoch}'s {side} half-step, {exc}; raise reg (now "
                                         f"{reg}) or lower the rank (now {model.n_factors})") from None
        with _phase("loss"):
            user_penalty, item_penalty = _side_penalties(model, counts["user"], counts["item"])
            objective = reached + reg * user_penalty  # the items' errors and penalty, and the users' penalty
            train_loss, mse = (torch.stack([objective, reached - reg * item_penalty]) / len(r)).tolist()  # one sync
            mse = max(mse, 0.0)  # a perfect fit can round to a hair below zero
        history, stop = _end_epoch(history, epoch, model=model, val_data=val_data, train_loss=train_loss,
                                   mse=mse, start=start, callback=callback, stopper=stopper)
        if stop:
            break
    stopper.restore()
    return history
