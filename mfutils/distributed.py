r"""Alternating least squares on several processes: :func:`fit_als_distributed`, :func:`launch` and a command line.

**Why ALS spreads well.** In an ALS half-step every user's row is an independent ridge regression against
the item table (see :func:`mfutils.train.fit_als`): user :math:`u` needs only its own ratings and the
current :math:`Q` (and item biases). So :math:`W` processes ("ranks") can each solve a share of the users,
as long as every rank holds all of :math:`Q`, and then swap what they solved. This module does exactly
that, with the block layout of Spark MLlib's ALS:

* **Blocks.** Users are cut into :math:`W` contiguous blocks of ids, items likewise; rank :math:`r` owns
  user block :math:`r` and item block :math:`r`. The cuts are placed at quantiles of the cumulative rating
  counts (:func:`partition`), so every rank solves about :math:`N/W` ratings' worth of work rather than
  :math:`n/W` rows: under a popularity power law, equal rows would leave one rank with the heavy head.
* **Replicas.** Every rank holds a full copy of both factor tables (and biases): :math:`(n_\text{users}
  + n_\text{items})(k+1)` floats, 22 MB for ML-20M at :math:`k=32`, small next to its 20M ratings.
* **Ratings.** Rank :math:`r` keeps the ratings of its users (user half-step) and of its items (item
  half-step, training loss): every rating is stored twice across the group, never :math:`W` times.
* **A sweep.** Each rank solves its user block with the single-process code (:func:`mfutils.train._als_side`
  on a view of the model cut to the block), then one ``all_gather`` hands every rank every block, so all
  replicas hold the same new :math:`P`. Then the same for items. A last ``all_reduce`` sums the ranks'
  squared errors and penalties into the global objective

  .. math:: L = \frac1N\Big[\sum_{(u,i)} (r_{ui}-\hat r_{ui})^2 + \lambda\big(\textstyle\sum_u n_u
            (\lVert p_u\rVert^2 + b_u^2) + \sum_i n_i(\lVert q_i\rVert^2 + b_i^2)\big)\Big],

  the same :math:`L` that :func:`~mfutils.train.fit_als` reports. Since each row's solution depends only
  on the other table and its own ratings, the result equals ``fit_als`` up to float32 rounding (sums taken
  in another order), which the tests check.
* **Communication.** ``all_gather`` needs equal shapes, so a rank sends its block padded to the largest
  block's :math:`B` rows of :math:`c = k+1` floats (:math:`c=k` without biases). Whatever the algorithm, a
  rank must receive the :math:`W-1` blocks it did not solve, so per sweep and rank

  .. math:: \text{bytes} = (W-1)\,(B_\text{users} + B_\text{items})\,c\cdot 4
            \;\approx\; \tfrac{W-1}{W}\,(n_\text{users} + n_\text{items})\,c\cdot 4,

  and a ring all-gather sends as much as it receives (:func:`gather_bytes_per_sweep`; the 12-byte
  loss all-reduce is not counted). The traffic grows with the number of rows, never with the number of
  ratings, while the work per rank shrinks as :math:`(N k^2 + n k^3)/W` (Gram matrices, then solves):
  the more ratings per row, the better the group scales. Each sweep records, per rank, the seconds spent
  solving ("compute") and inside the collectives ("comm", which also holds the time spent waiting for the
  slowest rank).

**Data.** For the book every rank builds (or reads) the whole data set with the same seed and keeps its
slices; :func:`fit_als_distributed` does the slicing. A real cluster would have each process read only
its shard, count ratings per row with an ``all_reduce`` of its bincounts to place the cuts, and send each
rating to its owners with an ``all_to_all``; nothing after that point changes.

**Failures.** The process group is created with a timeout (``--timeout``, default 60 s), so a collective
whose peer died or hangs raises on the survivors instead of waiting forever; each failing rank prints one
``error: rank R of W: ...`` line, and ``torchrun`` stops the rest of the group. :func:`launch` runs the
whole group in a subprocess, bounds its wall-clock time, and turns any failure into a
:class:`DistributedError` that says which rank failed and why.

**Results file.** ``--out`` (rank 0, written atomically) holds one JSON object: ``world_size``, ``backend``,
``device``; ``data`` (``source``, ``n_users``, ``n_items``, ``n_train``, ``n_test``, ``test_frac``, ``seed``);
``model`` (``rank``, ``reg``, ``epochs``, ``biases``, ``global_mean``); ``partition`` (``user_bounds``,
``item_bounds``, ``user_block_ratings``, ``item_block_ratings``); ``sweeps`` (per sweep: ``train_loss``,
``train_rmse``, ``test_rmse``, ``seconds``); ``per_rank`` (``[rank][sweep]``: ``compute_s``, ``comm_s``,
``bytes_sent``, ``bytes_received``; and ``setup_bytes``); ``final`` (``train_rmse``, ``train_loss``,
``test_rmse``); ``fit_seconds``, ``wall_seconds``, ``torch``, ``mfutils``. RMSEs without a test set are null.

**Testing aid.** Two environment variables make one rank fail on purpose, so the tests can watch the
others fail fast: ``MFUTILS_DIST_FAIL_RANK=R`` and ``MFUTILS_DIST_FAIL_SWEEP=S`` (default 0) make rank
``R`` of the command line kill itself with SIGKILL at the start of sweep ``S`` (0-based);
``MFUTILS_DIST_FAIL_MODE=hang`` makes it sleep forever instead, so the survivors hit the collective timeout.

Usage::

    torchrun --nproc_per_node=2 -m mfutils.distributed --synthetic 6040 3706 1000000 --rank 32 --out r.json
    python -m mfutils.distributed --synthetic 600 400 20000 --epochs 5      # one process, world size 1

    >>> from mfutils.distributed import launch
    >>> result = launch(2, ["--synthetic", "600", "400", "20000", "--epochs", "5"])
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from mfutils.data import RatingData
from mfutils.models import BiasedMF
from mfutils.train import (History, _als_side, _by_row, _check_common, _epochs, _side_penalties, _sse,
                           resolve_device)

__all__ = ["DistributedFit", "DistributedError", "fit_als_distributed", "partition", "gather_bytes_per_sweep",
           "launch", "build_parser", "main"]

_FLOAT_BYTES = 4  # the factor tables are float32


# ----------------------------------------------------------------------------------------- the algorithm

def partition(counts: torch.Tensor, n_parts: int) -> torch.Tensor:
    r"""Cut rows ``0..n-1`` into ``n_parts`` contiguous blocks holding about the same number of ratings.

    Cut :math:`r` is placed at the row boundary :math:`j` whose cumulative count
    :math:`C_j = \sum_{v<j} n_v` is nearest to :math:`rN/W`, so every block holds
    :math:`N/W \pm \max_v n_v` ratings. With no ratings at all the rows are cut evenly.

    Args:
        counts: ratings per row, shape ``(n,)``, any integer or float dtype, on any device.
        n_parts: :math:`W \ge 1`.
    Returns:
        int64 CPU tensor ``bounds`` of shape ``(n_parts + 1,)``: block ``r`` is rows
        ``bounds[r]:bounds[r+1]``; ``bounds[0] = 0``, ``bounds[-1] = n``, non-decreasing (a block may be empty).
    """
    if int(n_parts) != n_parts or n_parts < 1:
        raise ValueError(f"partition(): n_parts must be a positive integer; got {n_parts!r}")
    counts = counts.detach().to("cpu", torch.float64)  # (n,)
    n = len(counts)
    cum = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # (n + 1,): ratings before row j
    total = float(cum[-1])
    if total <= 0:
        return torch.div(torch.arange(n_parts + 1) * n, n_parts, rounding_mode="floor")
    targets = total * torch.arange(1, n_parts, dtype=torch.float64) / n_parts  # (W - 1,)
    above = torch.searchsorted(cum, targets).clamp(max=n)  # first boundary with C_j >= target
    below = (above - 1).clamp(min=0)
    cuts = torch.where(targets - cum[below] < cum[above] - targets, below, above)  # the nearer boundary
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([n])])
    return torch.cummax(bounds, 0).values


def gather_bytes_per_sweep(user_bounds: Sequence[int], item_bounds: Sequence[int], n_cols: int) -> int:
    r"""Bytes one rank receives (and, in a ring all-gather, sends) per sweep: :math:`(W-1)(B_u+B_i)\,c\cdot 4`.

    Args:
        user_bounds, item_bounds: block bounds from :func:`partition`, length :math:`W+1` each.
        n_cols: :math:`c`, floats per row: ``n_factors + 1`` with biases, ``n_factors`` without.
    """
    world = len(user_bounds) - 1
    padded = _block_rows(user_bounds) + _block_rows(item_bounds)  # B_u + B_i
    return (world - 1) * padded * n_cols * _FLOAT_BYTES


def _block_rows(bounds: Sequence[int]) -> int:
    """B: rows of the largest block, what every rank's all_gather payload is padded to (at least 1)."""
    return max(1, max(int(b) - int(a) for a, b in zip(bounds[:-1], bounds[1:])))


@dataclass(frozen=True)
class DistributedFit:
    r"""What :func:`fit_als_distributed` returns: the usual :class:`~mfutils.train.History` plus the group's
    layout and per-rank, per-sweep costs (identical on every rank: they are gathered at the end).

    Attributes:
        history: objective, train and validation RMSE and seconds per sweep, as ``fit_als`` records them.
        world_size, rank: :math:`W` and this process's rank. backend: ``"gloo"``, ``"nccl"`` or ``"none"``
            (no process group: one process, no collectives). device: where this rank computed.
        user_bounds, item_bounds: the blocks (:func:`partition`), length :math:`W+1`.
        user_block_ratings, item_block_ratings: ratings held by each rank for its user and item half-steps.
        compute_s, comm_s: ``[rank][sweep]`` seconds solving (plus the local loss terms and copying blocks
            in and out) and seconds inside collectives (waiting for slower ranks included).
        bytes_sent, bytes_received: ``[rank][sweep]`` all-gather payload (:func:`gather_bytes_per_sweep`).
        setup_bytes: bytes each rank other than 0 received before the first sweep (the broadcast of the
            item tables and the global mean that makes every replica start from rank 0's).
    """

    history: History
    world_size: int
    rank: int
    backend: str
    device: str
    user_bounds: list[int]
    item_bounds: list[int]
    user_block_ratings: list[int]
    item_block_ratings: list[int]
    compute_s: list[list[float]] = field(default_factory=list)
    comm_s: list[list[float]] = field(default_factory=list)
    bytes_sent: list[list[int]] = field(default_factory=list)
    bytes_received: list[list[int]] = field(default_factory=list)
    setup_bytes: int = 0

    def as_dict(self) -> dict:
        """JSON-ready: the history's columns under ``"history"``, everything else as is."""
        out = asdict(self)
        out["history"] = {"method": self.history.method, **self.history.as_dict()}
        return out


class _Clock:
    """Per-sweep seconds by kind (``"compute"``, ``"comm"``); waits for the GPU so its work lands where it ran."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {"compute": 0.0, "comm": 0.0}
        self.kind, self.start = "compute", 0.0

    def switch(self, kind: str) -> None:
        """Close the running interval (charging it to its kind) and open one of ``kind``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[self.kind] += now - self.start
        self.kind, self.start = kind, now

    def reset(self) -> None:
        self.seconds = {"compute": 0.0, "comm": 0.0}
        self.kind, self.start = "compute", time.perf_counter()


@dataclass
class _Side:
    """One rank's share of one half-step: its rows ``lo:hi``, their ratings in CSR order and ridge."""

    name: str  # "user" or "item"
    bounds: list[int]
    lo: int
    hi: int
    layout: tuple[torch.Tensor, ...]  # (order, crow, cols) of _by_row over the block's rows
    rating: torch.Tensor  # (nnz_block,)
    ridge: torch.Tensor  # (hi - lo,): lambda * max(n_row, 1)
    penalty_counts: torch.Tensor  # (n_rows,): n_row inside the block, 0 elsewhere


def _group() -> tuple[int, int, str]:
    """(world size, rank, backend) of the default process group, or (1, 0, "none") without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), str(dist.get_backend())
    return 1, 0, "none"


def _resolve(device: str | torch.device, backend: str, who: str) -> torch.device:
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())  # the launcher set it to LOCAL_RANK
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError(f"{who}: the process group uses nccl, which moves CUDA tensors only; pass device='cuda' "
                         f"(or start the group with backend 'gloo' to train on the CPU)")
    if backend == "gloo" and resolved.type != "cpu":
        raise ValueError(f"{who}: the process group uses gloo, which this module drives with CPU tensors; pass "
                         f"device='cpu', or start the group with backend 'nccl' to train on GPUs")
    return resolved


def _layout(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, ...]:
    """:func:`mfutils.train._by_row`, also for a block without ratings."""
    if len(rows) == 0:
        empty = rows.new_zeros(0)
        return empty, rows.new_zeros(n_rows + 1), empty
    return _by_row(rows, cols, n_rows)


def _side(name: str, rows: torch.Tensor, cols: torch.Tensor, rating: torch.Tensor, n_rows: int,
          bounds: torch.Tensor, rank: int, reg: float, device: torch.device) -> _Side:
    """This rank's block of one side, on ``device``."""
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    mine = (rows >= lo) & (rows < hi)  # (n_ratings,) on the CPU
    rows, cols, rating = (t[mine].to(device) for t in (rows, cols, rating))  # (nnz_block,) each
    local = rows - lo
    counts = torch.bincount(local, minlength=hi - lo).to(rating.dtype)  # (hi - lo,)
    penalty_counts = torch.zeros(n_rows, dtype=rating.dtype, device=device)  # (n_rows,)
    penalty_counts[lo:hi] = counts
    side = _Side(name, bounds.tolist(), lo, hi, _layout(local, cols, hi - lo), rating,
                 reg * counts.clamp(min=1), penalty_counts)
    return side


def _tables(model: BiasedMF, side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if side == "user":
        return model.user_factors.weight, None if model.user_bias is None else model.user_bias.weight
    return model.item_factors.weight, None if model.item_bias is None else model.item_bias.weight


def _block_view(model: BiasedMF, side: str, lo: int, hi: int) -> SimpleNamespace:
    """``model`` as :func:`~mfutils.train._als_side` reads it, with ``side``'s tables cut to rows ``lo:hi``.

    The cut tables are views, so the solved rows land in this rank's replica in place.
    """
    view = SimpleNamespace(global_mean=model.global_mean, n_factors=model.n_factors)
    for name in ("user", "item"):
        factors, bias = _tables(model, name)
        if name == side:
            factors, bias = factors[lo:hi], None if bias is None else bias[lo:hi]
        setattr(view, f"{name}_factors", SimpleNamespace(weight=factors))
        setattr(view, f"{name}_bias", None if bias is None else SimpleNamespace(weight=bias))
    return view


def _gather_block(model: BiasedMF, side: _Side, world: int, clock: _Clock) -> int:
    """Give every rank this rank's solved rows of ``side``; returns the bytes this rank received."""
    factors, bias = _tables(model, side.name)
    k = factors.shape[1]
    n_cols = k + (bias is not None)
    rows = _block_rows(side.bounds)
    send = factors.new_zeros(rows, n_cols)  # (B, c): this block, zero-padded to the largest block
    send[:side.hi - side.lo, :k] = factors[side.lo:side.hi]
    if bias is not None:
        send[:side.hi - side.lo, k:] = bias[side.lo:side.hi]
    recv = factors.new_empty(world * rows, n_cols)  # (W * B, c)
    clock.switch("comm")
    _all_gather(recv, send)
    clock.switch("compute")
    for r, (lo, hi) in enumerate(zip(side.bounds[:-1], side.bounds[1:])):
        block = recv[r * rows:r * rows + hi - lo]  # (hi - lo, c)
        factors[lo:hi] = block[:, :k]
        if bias is not None:
            bias[lo:hi] = block[:, k:]
    return (world - 1) * send.numel() * send.element_size()


def _all_gather(recv: torch.Tensor, send: torch.Tensor) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(recv, send)


def _broadcast_start(model: BiasedMF) -> int:
    r"""Make every replica start from rank 0's item tables and global mean; returns the bytes a rank > 0 receives.

    The first half-step reads only :math:`Q`, :math:`b_i` and :math:`\mu`; the user tables are overwritten.
    """
    tensors = [model.item_factors.weight, model.global_mean]
    if model.item_bias is not None:
        tensors.append(model.item_bias.weight)
    for t in tensors:
        dist.broadcast(t.detach(), src=0)
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def fit_als_distributed(model: BiasedMF, train: RatingData, *, val: RatingData | None = None, reg: float = 0.15,
                        n_epochs: int = 15, device: str | torch.device = "auto", progress: bool = False,
                        callback: Callable[[int, History], None] | None = None) -> DistributedFit:
    r"""Train ``model`` by block-partitioned ALS across the ranks of the default process group.

    Call it on every rank, inside an initialised group (``torch.distributed.init_process_group``; gloo for
    ``device="cpu"``, nccl for ``"cuda"``), with the same ``train`` and ``val`` everywhere; each rank keeps
    only the slices it needs (module docstring). Without a process group it runs alone (world size 1, no
    collectives). Every sweep solves the same per-row systems as :func:`~mfutils.train.fit_als` and reports
    the same objective, so the two agree up to float32 rounding.

    Args:
        model: a :class:`~mfutils.models.BiasedMF` with ``train``'s sizes; moved to ``device`` in place, and
            at the end every rank's replica holds the trained tables. Before the first sweep its item tables
            and global mean are broadcast from rank 0, so all replicas start alike whatever their seeds.
        train: training ratings (all of them, on every rank). val: optional ratings for per-sweep RMSE.
        reg: :math:`\lambda > 0`. n_epochs: number of (user, item) sweeps.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda"`` means this rank's current CUDA device).
        progress: a tqdm bar over sweeps on rank 0. callback: ``callback(epoch, history)`` after every sweep.
    Returns:
        A :class:`DistributedFit` (``history.method = "als-distributed"``).
    Raises:
        ValueError: bad hyperparameters or ids (as ``fit_als``), or a device the group's backend cannot use.
        RuntimeError: a collective failed, e.g. timed out because a peer died (``torch.distributed`` errors).
    """
    who = "fit_als_distributed()"
    _check_common(who, model, train, val, reg, n_epochs, None)
    if not reg > 0:
        raise ValueError(f"{who}: reg must be > 0 (each row's system is singular without it); got {reg!r}")
    world, rank, backend = _group()
    device = _resolve(device, backend, who)
    model.to(device).train()
    sides = {}
    for name, rows, cols, n in (("user", train.user_idx, train.item_idx, model.n_users),
                                ("item", train.item_idx, train.user_idx, model.n_items)):
        bounds = partition(torch.bincount(rows, minlength=n), world)  # (W + 1,), the same on every rank
        sides[name] = _side(name, rows, cols, train.rating, n, bounds, rank, reg, device)
    lo, hi = sides["user"].lo, sides["user"].hi
    val_mine = None if val is None else [t[(val.user_idx >= lo) & (val.user_idx < hi)].to(device)
                                         for t in (val.user_idx, val.item_idx, val.rating)]
    n_val = 0 if val is None else val.n_ratings
    setup_bytes = _broadcast_start(model) if backend != "none" else 0

    history, clock = History(method="als-distributed"), _Clock(device)
    costs = []  # per sweep: [compute_s, comm_s, bytes_sent, bytes_received]
    for epoch in _epochs(n_epochs, progress and rank == 0, who):
        start = time.perf_counter()
        clock.reset()
        received = 0
        for name in ("user", "item"):
            side = sides[name]
            reached = _als_side(_block_view(model, name, side.lo, side.hi), name, side.layout, side.rating,
                                side.ridge)  # the item block's: its ratings' errors and its items' penalty
            if backend != "none":
                received += _gather_block(model, side, world, clock)
        user_penalty, item_penalty = _side_penalties(model, sides["user"].penalty_counts,
                                                     sides["item"].penalty_counts)
        objective = reached + reg * user_penalty
        val_sse = _sse(model, *val_mine).double() if val_mine is not None else torch.zeros_like(objective)
        totals = torch.stack([objective, reached - reg * item_penalty, val_sse])  # (3,): this rank's share
        if backend != "none":
            clock.switch("comm")
            dist.all_reduce(totals)
            clock.switch("compute")
        train_loss, mse, val_sse = (totals / totals.new_tensor([train.n_ratings, train.n_ratings, 1])).tolist()
        mse = max(mse, 0.0)  # as in fit_als: a perfect fit can round to a hair below zero
        clock.switch("compute")
        costs.append([clock.seconds["compute"], clock.seconds["comm"], received, received])
        val_rmse = math.sqrt(val_sse / n_val) if n_val else math.nan
        history = history.append(train_loss=train_loss, train_rmse=math.sqrt(mse), val_rmse=val_rmse,
                                 seconds=time.perf_counter() - start)
        if callback is not None:
            callback(epoch, history)

    per_rank = torch.tensor(costs, dtype=torch.float64, device=device).reshape(len(costs), 4).T.contiguous()
    if backend != "none":  # (W * 4, n_sweeps): every rank's costs, on every rank
        everyone = per_rank.new_empty(world * 4, per_rank.shape[1])
        _all_gather(everyone, per_rank)
        per_rank = everyone
    table = per_rank.reshape(world, 4, -1).cpu()  # (W, 4, n_sweeps)
    return DistributedFit(
        history=history, world_size=world, rank=rank, backend=backend, device=str(device),
        user_bounds=sides["user"].bounds, item_bounds=sides["item"].bounds,
        user_block_ratings=_block_counts(train.user_idx, sides["user"].bounds),
        item_block_ratings=_block_counts(train.item_idx, sides["item"].bounds),
        compute_s=table[:, 0].tolist(), comm_s=table[:, 1].tolist(),
        bytes_sent=table[:, 2].long().tolist(), bytes_received=table[:, 3].long().tolist(),
        setup_bytes=setup_bytes)


def _block_counts(rows: torch.Tensor, bounds: list[int]) -> list[int]:
    return torch.bucketize(rows, torch.tensor(bounds[1:-1]), right=True).bincount(
        minlength=len(bounds) - 1).tolist()


# ----------------------------------------------------------------------------------------- the launcher

class DistributedError(RuntimeError):
    """A distributed run failed; the message says which rank and why.

    Attributes:
        returncode: the launcher's exit status (``None`` after a timeout).
        stderr: everything the launcher and its workers wrote to stderr, for debugging.
    """

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.returncode, self.stderr = returncode, stderr


_TAG_VAR = "MFUTILS_DIST_LAUNCH_TAG"  # set on every process of one launch, so cleanup can find strays


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tagged_processes(tag: str, var: str = _TAG_VAR) -> list[int]:
    """Ids of this user's live processes whose environment holds ``var=tag`` (Linux ``/proc``; else psutil)."""
    needle, pids = f"{var}={tag}".encode(), []
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:  # gone, or not ours
                continue
        return pids
    try:
        import psutil
    except ImportError:
        return pids
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(var) == tag:
                pids.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def _kill_all(proc: subprocess.Popen, tag: str, grace: float = 5.0) -> None:
    """Stop the launcher's process group, then any worker that outlived it (workers get their own sessions)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # torchrun stops its workers on SIGTERM
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in _tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_FAILURE = re.compile(r"rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)  # one worker in torchrun's summary
_RANK_ERROR = re.compile(r"\s*error: rank (\d+) of \d+: (.*)")  # a worker's own error line


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _failure_message(n_workers: int, returncode: int, stderr: str) -> str:
    """One line from the workers' ``error:`` lines and torchrun's summary of failed workers.

    The rank that died on its own is named first: a survivor's line says it lost a peer, and torchrun's
    "root cause" may name a survivor when both exits are seen in the same poll.
    """
    said, other = {}, []  # rank -> its error line; error lines without a rank (bad input)
    for line in stderr.splitlines():
        match = _RANK_ERROR.match(line)
        if match:
            said.setdefault(int(match.group(1)), match.group(2).strip())
        elif line.lstrip().startswith("error:") and line.strip()[7:] not in other:
            other.append(line.strip()[7:])
    codes = {}  # rank -> exit code, from the summary torchrun prints when workers fail (root cause first)
    if "Root Cause" in stderr:
        head, root = stderr.split("Root Cause", 1)
        for text in (root, head.split("Failures:", 1)[-1]):
            for match in _FAILURE.finditer(text):
                codes.setdefault(int(match.group(1)), int(match.group(2)))
    parts = ["the rendezvous port was taken by another program (pass another master_port, or None)"] \
        if _port_taken(stderr) else []
    victim = {r: "a peer" in said.get(r, "") for r in {*codes, *said}}
    stopped = 0
    for rank in sorted(victim, key=lambda r: victim[r]):  # stable: torchrun's order within each kind
        code = codes.get(rank)
        if code == -signal.SIGTERM and rank not in said:
            stopped += 1  # torchrun stopped it after another rank failed
            continue
        how = "failed" if code is None else (f"was killed by {_signal_name(-code)}" if code < 0
                                             else f"exited with status {code}")
        parts.append(f"rank {rank} {how}" + (f": {said[rank]}" if rank in said else
                                             " without an error line (killed, out of memory, or a crash)"))
    parts += other[:2]
    if stopped:
        parts.append(f"the launcher then stopped the other {stopped} rank(s)")
    if not parts:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        parts.append(f"last line of its output: {tail[0].strip()}")
    return f"distributed run with {n_workers} worker(s) failed (launcher exit status {returncode}): " + "; ".join(parts)


def launch(n_workers: int, args: Sequence[str], *, timeout: float = 600.0, omp_threads: int = 1,
           master_port: int | None = None, env: Mapping[str, str] | None = None) -> dict:
    r"""Run ``python -m mfutils.distributed args`` on ``n_workers`` local processes and return rank 0's results.

    Starts ``python -m torch.distributed.run --nproc_per_node=n_workers --master_port=PORT -m
    mfutils.distributed args --out TMP.json`` in a new session (its stdout and stderr captured), waits at
    most ``timeout`` seconds, and on a timeout stops the launcher and every worker (the workers run in
    sessions of their own, so they are also found by an environment tag). ``--timeout`` in ``args`` sets the
    collective timeout of the workers; keep it well below ``timeout``.

    Args:
        n_workers: processes (ranks), at least 1.
        args: the command line's arguments (see ``python -m mfutils.distributed --help``); ``--out`` is
            added unless given.
        timeout: wall-clock seconds for the whole run, start-up included.
        omp_threads: ``OMP_NUM_THREADS`` for every worker (torch's intra-op threads).
        master_port: rendezvous port on 127.0.0.1; ``None`` picks a free one.
        env: extra environment variables for the workers.
    Returns:
        The results JSON written by rank 0 (its fields: the module docstring, "Results file").
    Raises:
        ValueError: bad ``args`` (checked here, before anything starts) or bad launch options.
        DistributedError: a worker failed, the run timed out, or the port is taken; the message says which.
    """
    if int(n_workers) != n_workers or n_workers < 1:
        raise ValueError(f"launch(): n_workers must be a positive integer; got {n_workers!r}")
    if not timeout > 0 or int(omp_threads) != omp_threads or omp_threads < 1:
        raise ValueError(f"launch(): timeout must be > 0 and omp_threads a positive integer; got "
                         f"timeout={timeout!r}, omp_threads={omp_threads!r}")
    args = [str(a) for a in args]
    try:
        parsed = _parse_args(args)
    except _usage_error() as exc:
        raise ValueError(f"launch(): bad arguments: {exc}") from None
    if master_port is not None and not _port_is_free(int(master_port)):
        raise DistributedError(f"launch(): master_port {master_port} on 127.0.0.1 is already in use; pass another "
                               f"port, or master_port=None to pick a free one")
    with tempfile.TemporaryDirectory(prefix="mfutils-dist-") as scratch:
        out = parsed.out or os.path.join(scratch, "results.json")
        if not parsed.out:
            args += ["--out", out]
        tag = uuid.uuid4().hex
        package_root = str(Path(__file__).resolve().parents[1])
        child_env = {**os.environ, **(env or {}), _TAG_VAR: tag, "OMP_NUM_THREADS": str(int(omp_threads)),
                     "PYTHONUNBUFFERED": "1", "TORCH_SHOW_CPP_STACKTRACES": "0",
                     "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        deadline = time.monotonic() + timeout
        for _ in range(1 if master_port is not None else 3):  # a free port can be taken before torchrun binds it
            port = int(master_port) if master_port is not None else _free_port()
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={int(n_workers)}",
                   "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "mfutils.distributed",
                   *args]
            returncode, stderr = _run_group(cmd, child_env, tag, deadline - time.monotonic(), n_workers, timeout)
            if returncode == 0 or master_port is not None or not _port_taken(stderr):
                break
        if returncode != 0:
            raise DistributedError(_failure_message(n_workers, returncode, stderr), returncode=returncode,
                                   stderr=stderr)
        try:
            with open(out, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise DistributedError(f"the run ended well but rank 0's results file {out} is unreadable: {exc}",
                                   returncode=returncode, stderr=stderr) from None


def _port_taken(stderr: str) -> bool:
    return "EADDRINUSE" in stderr or "address already in use" in stderr.lower()


def _run_group(cmd: list[str], env: dict[str, str], tag: str, seconds: float, n_workers: int,
               timeout: float) -> tuple[int, str]:
    """Run torchrun in a new session for at most ``seconds``; (exit status, stderr). Leaves no process behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=max(seconds, 0.01))
    except subprocess.TimeoutExpired:
        _kill_all(proc, tag)
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # a stray still holds the pipe: give up on the log, not the error
            stderr = ""
        raise DistributedError(f"distributed run with {n_workers} worker(s) timed out after {timeout:g} s and was "
                               f"stopped (raise launch(timeout=...) if it is just slow; a hung collective fails "
                               f"by itself after the workers' --timeout)", stderr=stderr) from None
    except BaseException:  # KeyboardInterrupt in a notebook: leave nothing running
        _kill_all(proc, tag)
        raise
    finally:
        for pid in _tagged_processes(tag):  # strays: none when torchrun cleaned up, as it should
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode, stderr


# ----------------------------------------------------------------------------------------- the command line

def _usage_error() -> type[Exception]:
    from mfutils.cli import UsageError

    return UsageError


_EPILOG = """\
processes: under torchrun (torchrun --nproc_per_node=N -m mfutils.distributed ...) every process is one rank;
  without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) it runs as a single
  process (world size 1) on an in-memory process group, no port needed. Backend: gloo for --device cpu,
  nccl for --device cuda (rank R of a node uses cuda:LOCAL_RANK).
data: every rank builds the whole data set from the same seed (or reads the whole file) and keeps its blocks.
results (--out, written by rank 0 atomically): world_size, backend, device, data sizes, the per-sweep
  train_loss/train_rmse/test_rmse/seconds, the per-rank per-sweep compute_s/comm_s/bytes_sent, the final
  train and test RMSE, fit and wall seconds, torch version.
failures: a dead or stuck peer makes the others fail, after --timeout seconds at the latest; each failing
  rank prints one 'error: rank R of W: ...' line.
exit status: 0 on success, 2 on bad input (one 'error:' line on stderr), 1 on a failure while running."""


def build_parser() -> argparse.ArgumentParser:
    from mfutils.cli import DEFAULTS, _number_type, _Parser

    als = DEFAULTS["als"]
    parser = _Parser(prog="python -m mfutils.distributed", epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Alternating least squares on several processes (torch.distributed).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", nargs=3, type=_number_type(int, 1, high=2 ** 63),
                        metavar=("N_USERS", "N_ITEMS", "N_RATINGS"),
                        help="MovieLens-like synthetic ratings (mfutils.synthetic.synthetic with --seed)")
    source.add_argument("--ratings", metavar="PATH", help="a ratings file, formats as 'python -m mfutils train'")
    parser.add_argument("--test-frac", type=_number_type(float, 0, high=1), default=0.2, metavar="F",
                        help="hold out this random fraction for the test RMSE; 0 for none (default 0.2)")
    parser.add_argument("--rank", type=_number_type(int, 1), default=als["rank"], metavar="K",
                        help=f"latent factors (default {als['rank']})")
    parser.add_argument("--reg", type=_number_type(float, 0, low_open=True), default=als["reg"], metavar="L",
                        help=f"L2 strength λ > 0 (default {als['reg']})")
    parser.add_argument("--epochs", type=_number_type(int, 1), default=als["epochs"], metavar="E",
                        help=f"ALS sweeps (default {als['epochs']})")
    parser.add_argument("--seed", type=_number_type(int, 0, high=2 ** 63), default=0, metavar="S",
                        help="seed for data, split and init, 0 <= S < 2**63 (default 0)")
    parser.add_argument("--no-biases", action="store_true", help="factors only, no user and item biases")
    parser.add_argument("--no-mean", action="store_true",
                        help="global mean 0: fit the ratings as they are, not centred (as Spark MLlib's ALS does)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="cpu (gloo), cuda (nccl) or auto (default)")
    # below 1e9: torch overflows on larger timeouts (seen from 1e10 s under torchrun, 1e13 s without it)
    parser.add_argument("--timeout", type=_number_type(float, 0, low_open=True, high=1e9), default=60.0,
                        metavar="SECONDS", help="a collective waiting longer fails (a dead peer; default 60)")
    parser.add_argument("--out", metavar="PATH.json", help="rank 0 writes the results here")
    parser.add_argument("--save-factors", metavar="PATH.pt", help="rank 0 saves the trained model's state_dict")
    parser.add_argument("--progress", action="store_true", help="a progress bar over sweeps on rank 0")
    return parser


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    UsageError = _usage_error()
    args = build_parser().parse_args(None if argv is None else list(argv))
    outputs = [(o, p, e) for o, p, e in (("--out", args.out, "results.json"),
                                         ("--save-factors", args.save_factors, "factors.pt")) if p is not None]
    for option, path, example in outputs:  # checked now: after training, a bad path would lose the run
        folder = os.path.dirname(os.path.abspath(path))
        if not path:
            raise UsageError(f"{option} needs a file name, e.g. {option} {example}")
        if os.path.isdir(path) or path.endswith(("/", os.sep)):
            raise UsageError(f"{option} {path} names a folder, not a file; name a file in it, e.g. "
                             f"{option} {os.path.join(path, example)}")
        if not os.path.isdir(folder):
            raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first")
        from mfutils.cli import cannot_write

        why = cannot_write(path)
        if why is not None:
            raise UsageError(f"{option} {path}: cannot write in {folder}: {why}; name a file in a folder you can "
                             f"write to")
        if args.ratings and os.path.exists(path) and os.path.exists(args.ratings) \
                and os.path.samefile(path, args.ratings):
            raise UsageError(f"{option} {path} is the --ratings file; it would be overwritten. Name another file")
    if len(outputs) == 2 and os.path.realpath(args.out) == os.path.realpath(args.save_factors):
        raise UsageError(f"--out and --save-factors both name {args.out}; the results would overwrite the factors. "
                         f"Name two files")
    if args.synthetic is not None:
        n_users, n_items, n_ratings = args.synthetic
        if n_ratings > n_users * n_items // 2:
            raise UsageError(f"--synthetic {n_users} {n_items} {n_ratings}: at most {n_users * n_items // 2:,} "
                             f"ratings fit (half of all user-item pairs); ask for fewer ratings or more users/items")
    return args


def _environment() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, under torchrun) from torchrun's variables; (0, 1, 0, False) without them.

    Raises the CLI's UsageError when only some are set, or when they are not integers with WORLD_SIZE >= 1
    and 0 <= RANK, LOCAL_RANK < WORLD_SIZE.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    present = [n for n in names if n in os.environ]
    if not present:
        return 0, 1, 0, False
    if len(present) < len(names):
        missing = sorted(set(names) - set(present))
        raise _usage_error()(f"torchrun's environment is incomplete ({', '.join(missing)} unset); start under "
                             f"torchrun, or unset {', '.join(present)} to run as one process")
    try:
        rank, world, local = (int(os.environ[n]) for n in names[:3])
    except ValueError:
        raise _usage_error()("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise _usage_error()(f"torchrun's environment is inconsistent (RANK={rank}, WORLD_SIZE={world}, "
                             f"LOCAL_RANK={local}): it needs WORLD_SIZE >= 1 and 0 <= RANK, LOCAL_RANK < WORLD_SIZE; "
                             f"start under torchrun, or unset {', '.join(names)} to run as one process")
    return rank, world, local, True


def _cli_device(name: str, local_rank: int) -> torch.device:
    UsageError = _usage_error()
    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc).replace("resolve_device(): ", "--device: ")) from None
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"--device cuda: this is local rank {local_rank} but only {torch.cuda.device_count()} "
                             f"GPU(s) are visible; start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def _load(args: argparse.Namespace) -> tuple[RatingData, RatingData | None, str]:
    from mfutils.data import random_split

    if args.synthetic is not None:
        from mfutils.synthetic import synthetic

        data, _ = synthetic(*args.synthetic, seed=args.seed)
        source = "synthetic {} {} {}".format(*args.synthetic)
    else:
        from mfutils.cli import dedupe, read_ratings, to_rating_data

        data, source = to_rating_data(dedupe(read_ratings(args.ratings))[0]), args.ratings
    if args.test_frac == 0:
        return data, None, source
    train, test = random_split(data, args.test_frac, seed=args.seed)
    return train, test, source


def _fail_point(rank: int, sweep: int) -> None:
    """The testing aid of the module docstring: die (or hang) here if the environment asks this rank to."""
    if os.environ.get("MFUTILS_DIST_FAIL_RANK", "") != str(rank):
        return
    if int(os.environ.get("MFUTILS_DIST_FAIL_SWEEP", "0")) != sweep:
        return
    if os.environ.get("MFUTILS_DIST_FAIL_MODE", "exit") == "hang":
        while True:
            time.sleep(3600)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # abrupt, like the out-of-memory killer: no cleanup, no message


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` whole or not at all (:func:`mfutils.cli.write_file`: beside ``path``, then a rename)."""
    from mfutils.cli import write_file

    write_file(path, write, prefix=".mfutils-dist-")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _results(args, fit: DistributedFit, train: RatingData, test: RatingData | None, model: BiasedMF,
             source: str, fit_seconds: float, wall_seconds: float) -> dict:
    from mfutils import __version__

    h = fit.history
    return {
        "world_size": fit.world_size, "backend": fit.backend, "device": fit.device,
        "data": {"source": source, "n_users": train.n_users, "n_items": train.n_items,
                 "n_train": train.n_ratings, "n_test": 0 if test is None else test.n_ratings,
                 "test_frac": args.test_frac, "seed": args.seed},
        "model": {"rank": args.rank, "reg": args.reg, "epochs": args.epochs, "biases": not args.no_biases,
                  "global_mean": float(model.global_mean)},
        "partition": {"user_bounds": fit.user_bounds, "item_bounds": fit.item_bounds,
                      "user_block_ratings": fit.user_block_ratings, "item_block_ratings": fit.item_block_ratings},
        "sweeps": {"train_loss": h.train_loss, "train_rmse": h.train_rmse,
                   "test_rmse": [_finite(v) for v in h.val_rmse], "seconds": h.seconds},
        "per_rank": {"compute_s": fit.compute_s, "comm_s": fit.comm_s, "bytes_sent": fit.bytes_sent,
                     "bytes_received": fit.bytes_received, "setup_bytes": fit.setup_bytes},
        "final": {"train_rmse": h.train_rmse[-1], "train_loss": h.train_loss[-1],
                  "test_rmse": _finite(h.val_rmse[-1])},
        "fit_seconds": fit_seconds, "wall_seconds": wall_seconds,
        "torch": torch.__version__, "mfutils": __version__,
    }


def _summary(result: dict) -> str:
    per = result["per_rank"]
    mean = lambda rows: sum(map(sum, rows)) / max(1, sum(map(len, rows)))  # noqa: E731
    test = result["final"]["test_rmse"]
    return (f"ALS on {result['world_size']} process(es) ({result['backend']}, {result['device']}): "
            f"{result['model']['epochs']} sweeps of {result['data']['n_train']:,} ratings in "
            f"{result['fit_seconds']:.2f} s; train RMSE {result['final']['train_rmse']:.4f}"
            + ("" if test is None else f", test RMSE {test:.4f}") + "\n"
            f"per sweep and rank: compute {mean(per['compute_s']):.3f} s, communication {mean(per['comm_s']):.3f} s,"
            f" {mean(per['bytes_sent']) / 1e6:.2f} MB sent")


def _describe(exc: BaseException, timeout: float) -> str:
    """One line for a failure: the error's first sentence (without gloo's source location) and a hint."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0] if lines else "")  # gloo's "[path/pair.cc:537] "
    text = text.split(". This is typically")[0] or type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        hint = (f"a collective waited --timeout {timeout:g} s for a peer that is stuck or dead; raise --timeout "
                f"if the ranks are only slow")
    elif re.search(r"connection (reset|closed|refused)|broken pipe|peer", text, re.I):
        hint = "a peer process died; see its own error line"
    elif isinstance(exc, (torch.linalg.LinAlgError, FloatingPointError)):  # FloatingPointError: train._cholesky
        hint = ("rounding broke a least-squares system: ratings of large magnitude do that; rescale them "
                "to a few units (e.g. 1 to 5) or raise --reg")
    else:
        hint = ""
    return f"{type(exc).__name__}: {text}" + (f" ({hint})" if hint else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mfutils.distributed`` (one rank of the group); returns the exit status."""
    from mfutils.cli import _check_memory

    started = time.perf_counter()
    UsageError = _usage_error()
    who = None
    try:
        args = _parse_args(argv)
        rank, world, local_rank, under_torchrun = _environment()
        who, phase = f"rank {rank} of {world}", "choosing the device"
        device = _cli_device(args.device, local_rank)
        phase = "loading the data"
        train, test, source = _load(args)
        _check_memory(train, args.rank, device)  # as 'mfutils train': every rank holds both tables in full
    except (UsageError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - e.g. no memory for the data; MFUTILS_DEBUG=1 shows the traceback
        if os.environ.get("MFUTILS_DEBUG") or who is None:
            raise
        print(f"error: {who}: {phase} failed: {_describe(exc, args.timeout)}", file=sys.stderr)
        return 1

    phase = "joining the process group"
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        timeout = datetime.timedelta(seconds=args.timeout)
        extra = {"device_id": device} if backend == "nccl" else {}
        if under_torchrun:
            dist.init_process_group(backend, timeout=timeout, **extra)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **extra)
        phase = "training"
        model = BiasedMF(train.n_users, train.n_items, args.rank,
                         global_mean=0.0 if args.no_mean else float(train.rating.mean()),
                         biases=not args.no_biases, seed=args.seed)
        _fail_point(rank, 0)
        fit_start = time.perf_counter()
        fit = fit_als_distributed(model, train, val=test, reg=args.reg, n_epochs=args.epochs, device=device,
                                  progress=args.progress and rank == 0,
                                  callback=lambda epoch, _: _fail_point(rank, epoch + 1))
        fit_seconds = time.perf_counter() - fit_start
        if rank == 0:
            phase = "writing results"
            result = _results(args, fit, train, test, model, source, fit_seconds, time.perf_counter() - started)
            if args.save_factors:
                state = {k: v.cpu() for k, v in model.state_dict().items()}
                _write_atomic(args.save_factors, lambda tmp: torch.save(state, tmp))
            if args.out:
                text = json.dumps(result, indent=1)
                _write_atomic(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            print(_summary(result))
        dist.destroy_process_group()
    except KeyboardInterrupt:
        print(f"error: {who}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for users; MFUTILS_DEBUG=1 shows the traceback
        if os.environ.get("MFUTILS_DEBUG"):
            raise
        print(f"error: {who}: {phase} failed: {_describe(exc, args.timeout)}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # A group whose peer is stuck or dead can abort (SIGABRT) while the interpreter tears it down,
            # and the launcher would then report a crash instead of this line: leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        if dist.is_available() and dist.is_initialized():  # one process: leave no group to a caller in-process
            dist.destroy_process_group()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
