r"""Honest timing (:func:`time_it`, :func:`machine_info`, :func:`copy_bandwidth`) and the ml-100k fold benchmark.

``python -m mfutils.bench folds [--out book/results/folds.json]`` fits and scores, in one run, on the five
official ml-100k folds (``u1.base``/``u1.test`` … ``u5``): the CLI's default method, the article's
regularized snippet as written (:func:`fit_article`), and the peers that are installed: Surprise ``SVD()``
and ``SVDpp()`` and LensKit's biased MF (ALS), all with default hyperparameters. It writes per-fold and
mean RMSE, MAE and fit+predict seconds, the machine, a memory-bandwidth yardstick for the default method,
and the default's accuracy on ml-latest-small and synthetic ratings. A peer that cannot be imported stays in
the JSON with ``"available": false`` and the reason.

LensKit needs pandas 2 while this project pins pandas 3, so it runs in its own virtual environment
(``make bench`` builds it from ``requirements-bench-lenskit.txt``); ``--lenskit-python`` names its
interpreter, and this file is its worker (``python -I bench.py lenskit-worker FOLDER``).

``python -m mfutils.bench devices --device cpu|cuda [--out book/results/devices_cpu.json]`` times one epoch of
the SGD-type paths and one ALS sweep on synthetic ratings of MovieLens sizes (ml-100k … ml-20m) and ranks,
in child processes (``_many``: on the CPU one per configuration, so that its peak memory is its own; on CUDA
one per data set), and sets each time against the bound that :func:`bytes_per_epoch` and the copy bandwidth
measured in the same run give. ``--out`` is rewritten after every configuration (``"complete": false`` until
the end), and ``--resume`` continues such an unfinished file on the same machine.

``python -m mfutils.bench phases [--out book/results/phases_cpu.json] [--size ml-20m] [--rank 64]`` times the
phases of the fused SGD epoch and of the ALS sweep on the CPU (:func:`run_phases`, through
:func:`mfutils.train.phase_seconds`): where the time that the ``devices`` sweep measures goes.

``python -m mfutils.bench spark [--out book/results/spark_als.json] [--size N_USERS N_ITEMS N_RATINGS] ...`` fits
Spark MLlib's ALS in local mode (:func:`run_spark`, in a child interpreter: ``_spark-worker``), ``fit_als`` in this
process and ``mfutils.distributed`` on the same synthetic ratings and split, to the same objective, and scores
them with one function. pyspark is optional (``make bench-spark`` installs it); without it or without Java the
JSON says why Spark was skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["time_it", "machine_info", "copy_bandwidth", "matmul_rate", "fit_article", "run_folds",
           "bytes_per_epoch", "transfer_costs", "timing_demo", "run_devices", "run_spark", "main"]

SLOW_SECONDS = 5.0  # a method whose warm-up fit+predict takes longer is timed once per fold, not `repeats` times


def time_it(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            device: str | torch.device = "cpu", best: bool = False) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    With ``best``, the shortest run instead: what the machine can do, for a roof such as a bandwidth (as
    STREAM reports), where the median would let a busy moment lower the roof. On CUDA the clock is read
    only after ``torch.cuda.synchronize()``, so queued kernels are counted; on the CPU there is nothing
    to wait for.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_it(): need repeats >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    """The machine's physical memory in bytes, or None where the system does not say (e.g. Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """Where a timing was taken: CPU model, threads and memory, torch/CUDA versions, GPU name, UTC date."""
    cuda = torch.cuda.is_available()
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def copy_bandwidth(n_bytes: int = 256 << 20, repeats: int = 10,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Memory bandwidth yardstick: ``dst.copy_(src)`` of ``n_bytes`` of float32 (fastest of ``repeats``).

    Returns ``{"bytes": n_bytes, "seconds": t, "gb_per_s": 2 * n_bytes / t / 1e9}``: like STREAM's Copy,
    the bytes read and the bytes written both count. On ``device="cuda"`` it measures the GPU's memory.
    """
    src = torch.ones(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), warmup=2, repeats=repeats, device=device, best=True)
    return {"bytes": n_bytes, "seconds": seconds, "gb_per_s": 2 * n_bytes / seconds / 1e9}


def matmul_rate(n: int = 2048, repeats: int = 5, device: str | torch.device = "cpu") -> dict[str, float]:
    """Arithmetic yardstick: a float32 ``n x n`` matrix product (fastest of ``repeats``), ``2 n^3`` flops."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)
    seconds = time_it(lambda: torch.mm(a, a), warmup=2, repeats=repeats, device=device, best=True)
    return {"n": n, "seconds": seconds, "gflop_per_s": 2 * n ** 3 / seconds / 1e9}


def fit_article(train, *, rank: int = 2, lr: float = 0.01, n_epochs: int = 100, reg: float = 0.1,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The article's regularized snippet as written, re-implemented: full-batch SGD on a dense matrix.

    :math:`P` (``n_users × rank``) and :math:`Q` (``n_items × rank``) start as standard normal draws (seeded
    CPU generator, :math:`P` first), and each of the ``n_epochs`` steps minimises the mean squared error over
    the observed (nonzero) cells plus :math:`\lambda(\sum P^2 + \sum Q^2)`, a penalty that is not divided by
    the number of ratings. No biases, no clipping.

    Args:
        train: a :class:`~mfutils.data.RatingData`; the dense float32 matrix is ``n_users × n_items``.
    Returns:
        ``(P, Q)``, float32, shapes ``(n_users, rank)`` and ``(n_items, rank)``, detached.
    """
    generator = torch.Generator().manual_seed(seed)
    P = torch.randn(train.n_users, rank, generator=generator).requires_grad_()
    Q = torch.randn(train.n_items, rank, generator=generator).requires_grad_()
    R = torch.zeros(train.n_users, train.n_items)
    R[train.user_idx, train.item_idx] = train.rating  # (n_users, n_items), 0 = not rated
    observed = R != 0
    opt = torch.optim.SGD([P, Q], lr=lr)
    for _ in range(n_epochs):
        mse = ((P @ Q.T)[observed] - R[observed]).pow(2).mean()  # (n_users, n_items) -> scalar
        loss = mse + reg * (P.pow(2).sum() + Q.pow(2).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return P.detach(), Q.detach()


# ---------------------------------------------------------------- methods: (train, test) in, predictions out

def _table(data) -> Any:
    """A fold's RatingData as the CLI's RatingsTable (raw ids as string tokens, like a parsed file)."""
    from mfutils.cli import RatingsTable

    users = data.user_ids[data.user_idx.numpy()].astype(str).astype(object)
    items = data.item_ids[data.item_idx.numpy()].astype(str).astype(object)
    return RatingsTable(users, items, data.rating.numpy().astype(np.float64), data.timestamp.numpy().copy(),
                        np.arange(1, data.n_ratings + 1), data.name)


def _ours(fold: dict[str, Any]) -> tuple[np.ndarray, float, float, dict[str, Any]]:
    from mfutils.cli import dedupe, fit_predict

    pred, facts = fit_predict(dedupe(fold["train_table"])[0], fold["test_table"])
    settings = {k: facts[k] for k in ("method", "rank", "reg", "epochs", "seed", "device")}
    return pred, facts["fit_seconds"], facts["predict_seconds"], settings


def _article(fold: dict[str, Any]) -> tuple[np.ndarray, float, float, dict[str, Any]]:
    train, test = fold["train"], fold["test"]
    start = time.perf_counter()
    P, Q = fit_article(train)
    fit_seconds, start = time.perf_counter() - start, time.perf_counter()
    pred = (P[test.user_idx] * Q[test.item_idx]).sum(1).numpy()  # (n_test,)
    settings = {"rank": 2, "init": "torch.randn", "optimizer": "SGD", "lr": 0.01, "reg": 0.1,
                "penalty": "reg * (sum P^2 + sum Q^2) added to the mean masked MSE", "epochs": 100,
                "batch": "full (dense n_users x n_items matrix)", "seed": 0,
                "ids": "numbered over all of ml-100k, as in chapter 4"}
    return pred, fit_seconds, time.perf_counter() - start, settings


def _surprise(name: str) -> Callable[[dict[str, Any]], tuple[np.ndarray, float, float, dict[str, Any]]]:
    def run(fold: dict[str, Any]):
        import pandas as pd
        import surprise

        train, test = fold["train_table"], fold["test_table"]
        start = time.perf_counter()
        frame = pd.DataFrame({"user": train.user, "item": train.item, "rating": train.rating})
        reader = surprise.Reader(rating_scale=(float(train.rating.min()), float(train.rating.max())))
        trainset = surprise.Dataset.load_from_df(frame, reader).build_full_trainset()
        algo = getattr(surprise, name)(random_state=0).fit(trainset)  # defaults; seeded for repeatability
        fit_seconds, start = time.perf_counter() - start, time.perf_counter()
        pred = np.array([p.est for p in algo.test(list(zip(test.user, test.item, test.rating)))])
        settings = {"algorithm": f"surprise.{name}()", "version": surprise.__version__, "random_state": 0,
                    "n_factors": algo.n_factors, "n_epochs": algo.n_epochs}
        return pred, fit_seconds, time.perf_counter() - start, settings
    return run


def _lenskit_worker(folder: str) -> None:
    """Runs inside LensKit's own interpreter: fit and predict every fold in ``folder``, write ``out.json``."""
    import pandas as pd
    import lenskit
    from lenskit.als import BiasedMFScorer
    from lenskit.batch import predict
    from lenskit.data import ItemListCollection, from_interactions_df
    from lenskit.pipeline import predict_pipeline
    from lenskit.training import TrainingOptions

    with open(os.path.join(folder, "spec.json"), encoding="utf-8") as f:
        spec = json.load(f)

    def read(name: str) -> pd.DataFrame:
        return pd.read_csv(os.path.join(folder, name), sep="\t", dtype={"user_id": str, "item_id": str})

    def run(train: pd.DataFrame, test: pd.DataFrame) -> tuple[np.ndarray, float, float]:
        start = time.perf_counter()
        pipe = predict_pipeline(BiasedMFScorer())  # defaults: 50 features, 10 epochs, reg 0.1, damping 5
        pipe.train(from_interactions_df(train.copy()), TrainingOptions(rng=0))
        fit_seconds, start = time.perf_counter() - start, time.perf_counter()
        scores = predict(pipe, ItemListCollection.from_df(test, ["user_id"]), n_jobs=1).to_df()
        pred = test.merge(scores, on=["user_id", "item_id"], how="left")["score"].to_numpy(np.float64)
        return pred, fit_seconds, time.perf_counter() - start

    folds, out = [read(f"{k}.train.tsv") for k in spec["folds"]], []
    warm = run(folds[0], read(f"{spec['folds'][0]}.test.tsv"))  # warm-up: imports, thread pools
    repeats = spec["repeats"] if warm[1] + warm[2] < SLOW_SECONDS else 1
    for k, train in zip(spec["folds"], folds):
        test = read(f"{k}.test.tsv")
        runs = [run(train, test) for _ in range(repeats)]
        out.append({"pred": runs[0][0].tolist(), "fit": [r[1] for r in runs], "predict": [r[2] for r in runs]})
    with open(os.path.join(folder, "out.json"), "w", encoding="utf-8") as f:
        json.dump({"version": lenskit.__version__, "config": BiasedMFScorer().config.model_dump(mode="json"),
                   "repeats": repeats, "folds": out}, f)


def _lenskit(python: str, folds: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """LensKit's ``BiasedMFScorer`` (ALS, defaults) on every fold, in its own interpreter ``python``."""
    with tempfile.TemporaryDirectory(prefix="mfutils-lenskit-") as folder:
        for k, fold in enumerate(folds, start=1):
            for part in ("train", "test"):
                t = fold[f"{part}_table"]
                with open(os.path.join(folder, f"{k}.{part}.tsv"), "w", encoding="utf-8") as f:
                    f.write("user_id\titem_id\trating\n")
                    f.writelines(f"{u}\t{i}\t{float(r)!r}\n" for u, i, r in zip(t.user, t.item, t.rating))
        with open(os.path.join(folder, "spec.json"), "w", encoding="utf-8") as f:
            json.dump({"folds": list(range(1, len(folds) + 1)), "repeats": repeats}, f)
        threads = str(torch.get_num_threads())  # the same thread budget as the in-process methods
        env = {**os.environ, **{v: threads for v in ("LK_NUM_THREADS", "LK_NUM_BACKEND_THREADS", "OMP_NUM_THREADS",
                                                      "MKL_NUM_THREADS", "RAYON_NUM_THREADS")}, "LK_NUM_PROCS": "1"}
        proc = subprocess.run([python, "-I", os.path.abspath(__file__), "lenskit-worker", folder],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the LensKit worker ({python}) exited {proc.returncode}: "
                               f"{(proc.stderr.strip().splitlines() or ['no message'])[-1]}")
        with open(os.path.join(folder, "out.json"), encoding="utf-8") as f:
            result = json.load(f)
    runs = []
    for fold, out in zip(folds, result["folds"]):
        low, high = float(fold["train_table"].rating.min()), float(fold["train_table"].rating.max())
        mean = float(np.mean(fold["train_table"].rating))
        pred = np.clip(np.nan_to_num(np.array(out["pred"]), nan=mean), low, high)
        runs.append(_timed_run(pred, out["fit"], out["predict"]))
    settings = {"algorithm": "lenskit.als.BiasedMFScorer() in predict_pipeline (bias fallback)",
                "version": result["version"], "config": result["config"], "rng": 0, "batch_predict_n_jobs": 1,
                "clipped": "to the training rating range"}
    return {"settings": settings, "repeats": result["repeats"], "runs": runs}


def _timed_run(pred: np.ndarray, fits: list[float], predicts: list[float]) -> dict[str, Any]:
    """A fold's predictions and the medians of its timed runs (``seconds`` is the median of fit+predict)."""
    return {"pred": pred, "fit_seconds": statistics.median(fits), "predict_seconds": statistics.median(predicts),
            "seconds": statistics.median(f + p for f, p in zip(fits, predicts))}


def _in_process(run: Callable, folds: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """One untimed warm-up on the first fold, then ``repeats`` timed runs per fold (1 for a slow method)."""
    start = time.perf_counter()
    run(folds[0])  # warm-up: first-call costs (allocator, thread pools, imports) are not timed
    repeats = repeats if time.perf_counter() - start < SLOW_SECONDS else 1
    runs, settings = [], {}
    for fold in folds:
        results = [run(fold) for _ in range(repeats)]
        settings = results[0][3]
        runs.append(_timed_run(results[0][0], [r[1] for r in results], [r[2] for r in results]))
    return {"settings": settings, "repeats": repeats, "runs": runs}


def _score(measured: dict[str, Any], folds: list[dict[str, Any]]) -> dict[str, Any]:
    from mfutils.metrics import mae, rmse

    rows = []
    for k, (run, fold) in enumerate(zip(measured["runs"], folds), start=1):
        pred, target = torch.as_tensor(run["pred"], dtype=torch.float64), fold["test"].rating
        rows.append({"fold": k, "rmse": rmse(pred, target), "mae": mae(pred, target),
                     **{key: run[key] for key in ("fit_seconds", "predict_seconds", "seconds")}})
    mean = {key: statistics.fmean(r[key] for r in rows)
            for key in ("rmse", "mae", "fit_seconds", "predict_seconds", "seconds")}
    return {"available": True, "settings": measured["settings"], "repeats": measured["repeats"],
            "folds": rows, "mean": mean}


_BYTES_MODEL = ("per rating and half-step (two per sweep): each of the two sparse products streams the rating's "
                "CSR column number (int32) and value (float32), 8 B, and reads a row of its dense operand: the "
                "other side's (k+1)(k+2)/2 Gram products and k+1 bias terms, or its k+1 design entries, 4 B "
                "each; per-row sums are written once per row, not per rating, and are not counted")


def _roofline(train, copy: dict[str, float], repeats: int = 3) -> dict[str, Any]:
    """Ratings per second per sweep of the CLI default (BPMF) and the bytes that implies (``_BYTES_MODEL``)."""
    from mfutils.bpmf import fit_bpmf
    from mfutils.cli import DEFAULTS

    rank, sweeps = DEFAULTS["bpmf"]["rank"], DEFAULTS["bpmf"]["epochs"]
    seconds = [s for _ in range(repeats) for s in fit_bpmf(train, n_factors=rank, n_samples=sweeps - sweeps // 5,
                                                               n_burnin=sweeps // 5, device="cpu")[1].seconds]
    k1 = rank + 1
    streamed, gathered = 2 * (4 + 4), 4 * (k1 * (k1 + 1) // 2 + 2 * k1)
    per_rating = 2 * (streamed + gathered)  # bytes per rating per sweep
    rate = train.n_ratings / statistics.median(seconds)  # ratings per second per sweep
    return {"method": "ours", "rank": rank, "sweeps": sweeps, "n_ratings": train.n_ratings,
            "sweep_seconds": statistics.median(seconds), "ratings_per_second": rate,
            "bytes_per_rating_per_sweep": per_rating, "streamed_bytes_per_rating_per_sweep": 2 * streamed,
            "achieved_gb_per_s": rate * per_rating / 1e9, "streamed_gb_per_s": rate * 2 * streamed / 1e9,
            "copy_gb_per_s": copy["gb_per_s"], "fraction_of_copy": rate * per_rating / 1e9 / copy["gb_per_s"],
            "bytes_model": _BYTES_MODEL}


def _bias_only(train) -> Any:
    """Baseline :math:`\\mu + b_u + b_i`: ALS with zero factors, λ 0.03 (chapter 4's validated choice)."""
    from mfutils.models import BiasedMF
    from mfutils.train import fit_als

    model = BiasedMF(train.n_users, train.n_items, 1, global_mean=float(train.rating.mean()), init_std=0.0)
    fit_als(model, train, reg=0.03, n_epochs=10, device="cpu")
    return model


def _other_data() -> list[dict[str, Any]]:
    """The untuned CLI default vs the bias-only baseline on ml-latest-small (half stars) and synthetic data."""
    from mfutils.cli import DEFAULTS, fit_predict
    from mfutils.data import random_split
    from mfutils.metrics import rmse
    from mfutils.movielens import load_movielens
    from mfutils.synthetic import SIZES, synthetic

    rows = []
    for name, load in (("ml-latest-small", lambda: (load_movielens("ml-latest-small", progress=False), None)),
                       ("synthetic ml-100k size", lambda: synthetic(*SIZES["ml-100k"], seed=0))):
        data, truth = load()
        train, test = random_split(data, 0.2, seed=0)
        clip = (float(train.rating.min()), float(train.rating.max()))
        pred = torch.from_numpy(fit_predict(_table(train), _table(test))[0])
        row = {"data": name, "n_ratings": data.n_ratings, "split": "random 80/20, seed 0", "method": "bpmf",
               "settings": DEFAULTS["bpmf"], "rmse": rmse(pred, test.rating),
               "bias_only_rmse": rmse(_bias_only(train).predict(test.user_idx, test.item_idx, clip=clip),
                                      test.rating),
               "global_mean_rmse": rmse(torch.full_like(test.rating, float(train.rating.mean())), test.rating)}
        if truth is not None:  # the generating model itself: the floor that noise and rounding leave
            u, i = test.user_idx, test.item_idx
            exact = (truth.global_mean + truth.user_bias[u] + truth.item_bias[i]
                     + (truth.user_factors[u] * truth.item_factors[i]).sum(1)).clamp(*clip)
            row["truth_rmse"] = rmse(exact, test.rating)
        rows.append(row)
    return rows


METHODS = {"ours": "mfutils BPMF (CLI default)", "article": "article's snippet, as written",
           "surprise_svd": "Surprise SVD()", "surprise_svdpp": "Surprise SVDpp()",
           "lenskit_biased_mf": "LensKit biased MF (ALS)"}


def _measure(name: str, folds: list[dict[str, Any]], repeats: int, lenskit_python: str | None) -> dict[str, Any]:
    """Fit and score one method on every fold, or say why it is not available."""
    if name.startswith("surprise"):
        try:
            import surprise  # noqa: F401
        except ImportError as exc:
            return {"available": False, "reason": f"{type(exc).__name__}: {exc}; "
                                                  f"pip install -r requirements-bench.txt"}
    if name == "lenskit_biased_mf":
        python = lenskit_python
        if python is None:
            return {"available": False, "reason": "no LensKit interpreter given (--lenskit-python): LensKit "
                    "2025.x needs pandas 2 and this project pins pandas 3.1.1, and LensKit 2026.x needs Python "
                    ">= 3.12.5; `make bench` installs it into .venv/peers/lenskit"}
        if not (os.path.isfile(python) and os.access(python, os.X_OK)):
            return {"available": False, "reason": f"--lenskit-python {python} is not an executable file; "
                                                  f"`make bench` creates it"}
        try:
            return _score(_lenskit(python, folds, repeats), folds)
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            return {"available": False, "reason": str(exc)}
    run = {"ours": _ours, "article": _article, "surprise_svd": _surprise("SVD"),
           "surprise_svdpp": _surprise("SVDpp")}[name]
    return _score(_in_process(run, folds, repeats), folds)


def run_folds(*, folds: tuple[int, ...] = (1, 2, 3, 4, 5), repeats: int = 5, threads: int = 1,
              lenskit_python: str | None = None, methods: tuple[str, ...] = tuple(METHODS),
              extras: bool = True) -> dict[str, Any]:
    """Benchmark every method on ml-100k ``u<k>.base``/``u<k>.test`` in this one process (LensKit: a child).

    Seconds are fit+predict wall-clock from parsed rows to predictions (numbering ids or building a
    library's data set is included), the median of ``repeats`` runs after one untimed warm-up run; a method
    whose warm-up takes over ``SLOW_SECONDS`` is timed once per fold. Every method gets ``threads`` threads
    (default 1, like Surprise's single-threaded loops; it also keeps timings steady on a shared machine,
    where a second thread that waits for a busy core can stall every parallel region).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_folds(folds, repeats, lenskit_python, methods, extras)
    finally:
        torch.set_num_threads(before)


def _run_folds(folds: tuple[int, ...], repeats: int, lenskit_python: str | None, methods: tuple[str, ...],
               extras: bool) -> dict[str, Any]:
    from mfutils.movielens import load_ml100k_fold

    pairs = [load_ml100k_fold(k, progress=False) for k in folds]
    data = [{"train": tr, "test": te, "train_table": _table(tr), "test_table": _table(te)} for tr, te in pairs]
    result: dict[str, Any] = {
        "machine": machine_info(), "data": f"ml-100k folds u{folds[0]}-u{folds[-1]}", "folds": list(folds),
        "repeats": repeats, "slow_seconds": SLOW_SECONDS,
        "protocol": "fit on u<k>.base, predict u<k>.test; seconds = median of fit+predict "
        "wall-clock over the repeats, after one untimed warm-up run; predictions clipped to the training range "
        "(except the article's, as written)", "methods": {}}
    for name in methods:
        result["methods"][name] = {"label": METHODS[name], **_measure(name, data, repeats, lenskit_python)}
    measured = {k: v for k, v in result["methods"].items() if v["available"]}
    reference = measured.get("surprise_svd", {}).get("mean", {}).get("seconds")
    for entry in measured.values():
        entry["speedup_vs_surprise_svd"] = reference / entry["mean"]["seconds"] if reference else None
    result["fastest"] = min(measured, key=lambda k: measured[k]["mean"]["seconds"]) if measured else None
    if extras:
        result["copy"] = copy_bandwidth()
        result["roofline"] = _roofline(pairs[0][0], result["copy"])
        result["other_data"] = _other_data()
    return result


# ---------------------------------------------------------------- devices: one epoch per path, size and rank

DEVICE_GRID: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("ml-100k", (32, 64, 128)), ("ml-1m", (32, 64, 128)), ("ml-10m", (64,)), ("ml-20m", (64,)))
"""The CPU sweep: every rank at the small sizes, rank 64 at the large ones (2 cores, 24 GB)."""
DEVICE_GRID_CUDA: tuple[tuple[str, tuple[int, ...]], ...] = tuple((size, (32, 64, 128)) for size, _ in DEVICE_GRID)
"""The GPU sweep: every rank at every size."""
DEVICE_PATHS = {"sgd": "fit_sgd(optimizer='sgd') on sparse embeddings: plain minibatch SGD through autograd",
                "fused": "fit_sgd(optimizer='sgd', fused=True): the same steps, gradient written out, no autograd",
                "adam": "fit_sgd(optimizer='adam') on sparse embeddings: SparseAdam",
                "als": "fit_als: one sweep solves every user, then every item"}
DEVICE_BATCH = 1 << 15
TARGET_RATIO, TARGET_PEAK_BYTES = 3.0, 6e9  # the CPU goals at ml-20m, rank 64 (chapter 6)
TARGET_GPU_EPOCH_SECONDS = 0.05  # the GPU goal there: the fastest SGD-type epoch

_SGD_BYTES = ("per rating: the shuffled permutation entry and the user and item numbers (int64) and the rating "
              "(float32) are streamed, 28 B; the user and item rows (k factors and 1 bias each, float32) are "
              "gathered by the forward pass and read and written again by the sparse update, 3 x 4(2k+2) B. "
              "The optimizer state of Adam (2 more read-write copies of each row) is not counted, so the same "
              "bound serves both SGD-type paths")
_ALS_BYTES = ("per sweep (two half-steps): per rating and half-step, the column number (int64) and the target "
              "(float32) are each touched twice (building the targets, building the blocks), 24 B, and building "
              "the targets gathers and writes 24 B more; per solved "
              "row, its k+1 numbers are written and read once more, 2 x 4(k+1) B. The gathered blocks of the "
              "other side's rows and the chunk's Gram matrices and factors stay in cache by design "
              "(mfutils.train._row_gram_chunks), so this is a lower bound")


def bytes_per_epoch(path: str, *, n_ratings: int, n_users: int, n_items: int, rank: int) -> dict[str, Any]:
    r"""Bytes one epoch (SGD-type paths) or one sweep (ALS) must move to and from memory, at rank ``rank``.

    SGD and Adam: :math:`N\,(28 + 12(2k+2))` (:data:`_SGD_BYTES`). ALS, with :math:`k_1 = k+1`:
    :math:`96N + 8k_1(n_\text{users}+n_\text{items})` (:data:`_ALS_BYTES`), and its arithmetic,
    :math:`4Nk_1^2` flops for the Gram matrices plus :math:`k_1^3/3` per Cholesky factorisation.

    Returns:
        ``{"bytes", "bytes_per_rating", "flops", "model"}`` (``flops`` is ``None`` for the SGD-type paths).
    """
    if path in ("sgd", "fused", "adam"):
        total, flops, model = n_ratings * (28 + 12 * (2 * rank + 2)), None, _SGD_BYTES
    elif path == "als":
        k1 = rank + 1
        total = 2 * 48 * n_ratings + 8 * k1 * (n_users + n_items)
        flops, model = 4 * n_ratings * k1 * k1 + (n_users + n_items) * k1 ** 3 // 3, _ALS_BYTES
    else:
        raise ValueError(f"bytes_per_epoch(): path must be one of {sorted(DEVICE_PATHS)}; got {path!r}")
    return {"bytes": total, "bytes_per_rating": total / n_ratings, "flops": flops, "model": model}


def _require_device(device: str) -> torch.device:
    """``device`` as a torch.device; a RuntimeError with a one-line reason when it cannot be used here."""
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise RuntimeError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}); "
                           f"run this command on a machine with an NVIDIA GPU and a CUDA build of torch")
    return resolved


def _all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _max_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which an exec resets (``ru_maxrss`` keeps the parent's)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


PRECISIONS = {"fp32": "float32 tables, float32 matrix products (TF32 off)",
              "tf32": "float32 tables; matrix products may round their inputs to TF32 (CUDA only)",
              "bf16": "bfloat16 factor and bias tables (SGD-type paths only; ALS factorises in float32)"}


def _set_precision(precision: str, path: str, device: torch.device) -> torch.dtype:
    """Apply ``precision`` for this process; the dtype of the model's tables. ValueError when it cannot apply."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError("precision 'tf32' exists on NVIDIA GPUs only; use fp32 on the CPU")
    if precision == "bf16" and path == "als":
        raise ValueError("precision 'bf16' applies to the SGD-type paths: ALS's Cholesky factorisation needs float32")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


_LOADED: dict[tuple[str, float], tuple[Any, Any, int, int]] = {}  # (file, val_frac) -> data, val, RSS before/after


def _load_ratings(file: str, val_frac: float) -> tuple[Any, Any, int, int]:
    """(child process) The ratings in ``file`` (and a seeded held-out part), loaded once per process."""
    from mfutils.data import RatingData, random_split

    if (file, val_frac) not in _LOADED:
        _LOADED.clear()  # one data set at a time: a child's configurations come grouped by file
        baseline_rss = _max_rss_bytes()  # the interpreter, torch and mfutils
        saved = torch.load(file)
        data = RatingData(user_idx=saved["user_idx"], item_idx=saved["item_idx"], rating=saved["rating"],
                          timestamp=torch.zeros(1, dtype=torch.int64).expand(len(saved["rating"])),
                          user_ids=np.arange(saved["n_users"]), item_ids=np.arange(saved["n_items"]),
                          name=saved["name"])
        val = None
        if val_frac > 0:
            data, val = random_split(data, val_frac, seed=0)
        _LOADED[file, val_frac] = data, val, baseline_rss, _max_rss_bytes()
    return _LOADED[file, val_frac]


def _one(file: str, path: str, rank: int, device: str, batch_size: int, warmup: int, repeats: int,
         precision: str = "fp32", val_frac: float = 0.0) -> dict:
    """(child process) Train ``warmup + repeats`` epochs on the ratings in ``file``; time and peak memory.

    With ``val_frac > 0`` a seeded random fraction of the ratings is held out and its RMSE reported. The
    ratings are loaded once per process (:func:`_load_ratings`); ``peak_rss_bytes`` is the process's peak
    since :func:`_reset_peak_rss` last succeeded.
    """
    from mfutils.models import BiasedMF
    from mfutils.train import fit_als, fit_sgd

    resolved = torch.device(device)
    dtype = _set_precision(precision, path, resolved)
    data, val, baseline_rss, data_rss = _load_ratings(file, val_frac)
    model = BiasedMF(data.n_users, data.n_items, rank, global_mean=float(data.rating.mean()),
                     sparse=path != "als", seed=0)
    for table in (model.user_factors, model.item_factors, model.user_bias, model.item_bias):
        table.to(dtype)  # the tables only: the global mean stays float32
    n_epochs = warmup + repeats
    if path == "als":
        history = fit_als(model, data, val=val, reg=0.05, n_epochs=n_epochs, device=resolved)
    else:
        history = fit_sgd(model, data, val=val, optimizer="sgd" if path == "fused" else path, n_epochs=n_epochs,
                          batch_size=batch_size, device=resolved, fused=path == "fused")
    out = {"epoch_seconds": statistics.median(history.seconds[warmup:]), "all_epoch_seconds": history.seconds,
           "train_rmse": history.train_rmse[-1], "torch_threads": torch.get_num_threads(),
           "baseline_rss_bytes": baseline_rss, "data_rss_bytes": data_rss, "peak_rss_bytes": _max_rss_bytes()}
    if val is not None:
        out["val_rmse"] = history.val_rmse[-1]
    if resolved.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(resolved)
    return out


def _reset_peak_rss() -> bool:
    """Lower this process's recorded peak (VmHWM) to its present resident memory; False where Linux cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _many(file: str, configs: list[dict[str, Any]], device: str) -> None:
    """(child process) Run each configuration on ``file`` in turn and print its result as one JSON line.

    A configuration that raises prints ``{"error": ...}`` and the next one runs. Before each configuration
    after the first, the CUDA caches and peak counters and the peak resident memory are reset, so each
    reports its own peaks (the host peak includes what earlier configurations left resident;
    ``peak_rss_note: "cumulative"`` where it could not be reset at all).
    """
    import gc

    resolved = torch.device(device)
    cumulative = False
    for n, config in enumerate(configs):
        if n:
            gc.collect()
            if resolved.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(resolved)
            cumulative = cumulative or not _reset_peak_rss()
        try:
            row = _one(file, device=device, **config)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the sweep goes on
            row = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        if cumulative:
            row["peak_rss_note"] = "cumulative"
        print(json.dumps(row), flush=True)


CHILD_TIMEOUT = {"cpu": 1800.0, "cuda": 300.0}  # seconds a child may go without finishing a configuration


def _hold_sigterm() -> set | None:
    """Block SIGTERM in this thread (where the system can) and return the previous mask for
    :func:`_release_sigterm`; a SIGTERM that arrives meanwhile waits instead of being lost mid-way."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _release_sigterm(held: set | None) -> None:
    """Restore the mask :func:`_hold_sigterm` saved (again harmless); a pending SIGTERM is delivered now."""
    if held is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _watchdog(seconds: float, action: Callable[[], None]) -> threading.Timer:
    """A started timer that calls ``action`` after ``seconds`` unless cancelled; a daemon thread, so a timer
    left running by an interruption never holds the interpreter's exit."""
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()
    return timer


def _children(file: str, configs: list[dict[str, Any]], device: torch.device, threads: int,
              timeout: float | None = None, shared: bool | None = None):
    """Run ``configs`` on ``file`` in fresh interpreters; yield each one's result as soon as it is printed.

    On the CPU each configuration gets its own process, so its peak resident memory is its own; on CUDA
    (or with ``shared=True``) one process runs them all (:func:`_many`), so the interpreter, CUDA's start-up
    and the data load are paid once per file instead of once per configuration. A child that goes
    ``timeout`` seconds (default :data:`CHILD_TIMEOUT`) without finishing a configuration is killed; that
    configuration and those it did not reach are reported as ``{"error": ...}``.
    """
    timeout = CHILD_TIMEOUT.get(device.type, 1800.0) if timeout is None else timeout
    shared = device.type == "cuda" if shared is None else shared
    groups = [configs] if shared else [[c] for c in configs]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for group in groups:
        cmd = [sys.executable, "-m", "mfutils.bench", "_many", file, "--device", str(device),
               "--threads", str(threads), "--configs", json.dumps(group)]
        stderr: list[str] = []
        killed = threading.Event()
        proc = timer = drain = None
        done = 0
        held = _hold_sigterm()  # until proc exists: a SIGTERM in between would orphan the child
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            _release_sigterm(held)  # a SIGTERM that came meanwhile raises here, where finally stops the child
            drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
            drain.start()

            def kill():
                killed.set()
                proc.kill()

            timer = _watchdog(timeout, kill)
            for line in proc.stdout:
                if not line.startswith("{"):
                    continue
                timer.cancel()
                done += 1
                yield json.loads(line)
                timer = _watchdog(timeout, kill)
        finally:
            _release_sigterm(held)
            if timer is not None:
                timer.cancel()
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            if drain is not None:
                drain.join(5)
        if done < len(group):
            why = (f"no result within {timeout:g} s" if killed.is_set() else
                   ([line.strip() for line in stderr if line.strip()] or [f"exit status {proc.returncode}"])[-1])
            for _ in group[done:]:
                yield {"error": why}


BATCH_SERIES = ("ml-1m", 64, (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18))  # size, rank, batch sizes
PRECISION_SERIES = (("fused", "fp32"), ("fused", "tf32"), ("fused", "bf16"), ("als", "fp32"), ("als", "tf32"))


def _measured(row: dict[str, Any], copy: dict[str, float], matmul: dict[str, float]) -> dict[str, Any]:
    """``row`` (a finished child's timing) with its bytes model, its bounds and achieved rates added.

    The bound is the roofline's: the larger of the bytes over the copy bandwidth and the flops (ALS) over
    the rate of a large matrix product, both measured in the same run.
    """
    model = bytes_per_epoch(row["path"], n_ratings=row["n_ratings"], n_users=row["n_users"],
                            n_items=row["n_items"], rank=row["rank"])
    row.update({k: model[k] for k in ("bytes", "bytes_per_rating", "flops")})
    row["memory_bound_seconds"] = model["bytes"] / (copy["gb_per_s"] * 1e9)
    row["compute_bound_seconds"] = model["flops"] / (matmul["gflop_per_s"] * 1e9) if model["flops"] else 0.0
    row["bound_seconds"] = max(row["memory_bound_seconds"], row["compute_bound_seconds"])
    if "epoch_seconds" in row:
        row["ratio"] = row["epoch_seconds"] / row["bound_seconds"]
        row["achieved_gb_per_s"] = model["bytes"] / row["epoch_seconds"] / 1e9
        row["ratings_per_second"] = row["n_ratings"] / row["epoch_seconds"]
        if model["flops"]:
            row["achieved_gflop_per_s"] = model["flops"] / row["epoch_seconds"] / 1e9
    return row


def transfer_costs(user_idx: torch.Tensor, item_idx: torch.Tensor, rating: torch.Tensor, device: torch.device,
                   batch_size: int = DEVICE_BATCH, repeats: int = 3) -> dict[str, Any]:
    """Host-to-device copies of the rating arrays: all at once (pageable, pinned) and batch by batch.

    ``epoch_*`` copies every shuffled batch separately, as a training loop that keeps the ratings on the
    host must: pageable memory with a synchronous copy, or pinned memory with ``non_blocking=True``.
    """
    arrays = (user_idx, item_idx, rating)
    n_bytes = sum(t.numel() * t.element_size() for t in arrays)
    pinned = tuple(t.pin_memory() for t in arrays)
    perm = torch.randperm(len(rating), generator=torch.Generator().manual_seed(0))

    def whole(src, non_blocking):
        return lambda: [t.to(device, non_blocking=non_blocking) for t in src]

    def by_batch(src, pin):
        def run():
            for batch in perm.split(batch_size):
                parts = [t[batch] for t in src]
                if pin:
                    parts = [t.pin_memory() for t in parts]
                [t.to(device, non_blocking=pin) for t in parts]
        return run

    seconds = {"whole_pageable_seconds": time_it(whole(arrays, False), repeats=repeats, device=device),
               "whole_pinned_seconds": time_it(whole(pinned, True), repeats=repeats, device=device),
               "epoch_pageable_seconds": time_it(by_batch(arrays, False), repeats=repeats, device=device),
               "epoch_pinned_seconds": time_it(by_batch(arrays, True), repeats=repeats, device=device)}
    return {"bytes": n_bytes, "batch_size": batch_size, **seconds,
            "whole_pageable_gb_per_s": n_bytes / seconds["whole_pageable_seconds"] / 1e9,
            "whole_pinned_gb_per_s": n_bytes / seconds["whole_pinned_seconds"] / 1e9}


def timing_demo(device: torch.device, n: int = 4096, calls: int = 20) -> dict[str, Any]:
    """``calls`` float32 ``n x n`` matrix products timed three ways: first call, without and with synchronising.

    Without ``torch.cuda.synchronize()`` the clock stops when the kernels are queued, not when they finish.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device)

    def work():
        for _ in range(calls):
            torch.mm(a, a)

    start = time.perf_counter()
    work()
    sync()
    cold = time.perf_counter() - start
    no_sync = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        work()
        no_sync.append(time.perf_counter() - start)  # stops while the queue still runs
        sync()
    synced = time_it(work, warmup=1, repeats=5, device=device)
    return {"n": n, "calls": calls, "flops": 2 * n ** 3 * calls, "cold_seconds": cold,
            "no_sync_seconds": statistics.median(no_sync), "synced_seconds": synced}


_RESUME_KEYS = ("device", "torch_threads", "batch_size", "warmup_epochs", "timed_epochs")
_RESUME_MACHINE_KEYS = ("cpu", "gpu", "torch", "cuda")


def _row_key(kind: str, row: dict[str, Any]) -> tuple:
    return kind, row["size"], row["rank"], row["path"], row["batch_size"], row["precision"]


def _resumable(previous: dict[str, Any], result: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    """The finished rows of an unfinished earlier sweep, by configuration; ValueError if it ran elsewhere."""
    if previous.get("complete", True):
        raise ValueError("resume: that results file is a finished sweep; start a new one without --resume")
    mismatch = [k for k in _RESUME_KEYS if previous.get(k) != result[k]] + [
        f"machine.{k}" for k in _RESUME_MACHINE_KEYS if previous.get("machine", {}).get(k) != result["machine"][k]]
    if mismatch:
        raise ValueError(f"resume: that sweep differs in {', '.join(mismatch)}; resume it with the same settings on "
                         f"the same machine, or start a new one without --resume")
    return {_row_key(kind, row): row for kind in ("runs", "batch_runs", "precision_runs")
            for row in previous.get(kind, []) if "epoch_seconds" in row}


def run_devices(device: str = "cpu", *, grid: tuple[tuple[str, tuple[int, ...]], ...] | None = None,
                shapes: dict[str, tuple[int, int, int]] | None = None, paths: tuple[str, ...] = tuple(DEVICE_PATHS),
                batch_size: int = DEVICE_BATCH, warmup: int = 1, repeats: int = 1,
                threads: int | None = None, batch_series: tuple | None = BATCH_SERIES,
                precision_series: tuple | None = None, resume: dict[str, Any] | None = None,
                checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Seconds per epoch (per sweep for ALS), its memory-bandwidth bound and peak host memory, per configuration.

    Each (size, rank, path) of ``grid`` (default :data:`DEVICE_GRID`, on CUDA :data:`DEVICE_GRID_CUDA`) runs
    ``warmup + repeats`` epochs in a child process (:func:`_children`: one per configuration on the CPU,
    one per data set on CUDA) on synthetic
    MovieLens-like ratings (seed 0) of the sizes in ``shapes`` (default :data:`~mfutils.synthetic.SIZES`);
    the time is the median of the epochs after the warm-up (``History.seconds``, which on CUDA is read after
    the epoch's synchronising ``.item()``). The bound is :func:`bytes_per_epoch` over the copy bandwidth
    measured on ``device`` in the same run (and the flops over the matrix-product rate): each roof is the
    faster of two measurements, one before the first configuration and one after the last, each the
    fastest of its repeats, so a busy moment of the machine cannot lower the roof and flatter the ratios.

    Also: ``batch_series`` (size, rank, batch sizes) times the SGD-type paths at each batch size; on CUDA,
    ``precision_series`` (default :data:`PRECISION_SERIES`, at the largest size of ``grid``, rank 64, with a
    10% held-out RMSE), :func:`transfer_costs` and :func:`timing_demo`.

    ``checkpoint`` is called with the results so far (``"complete": False``) after every configuration;
    ``resume``, such an unfinished result of the same settings on the same machine, supplies its finished
    configurations and its first roof measurement instead of running them again.
    """
    from mfutils.synthetic import SIZES, synthetic

    resolved = _require_device(device)
    shapes = SIZES if shapes is None else shapes
    threads = threads or _all_cores()
    torch.set_num_threads(threads)
    cuda = resolved.type == "cuda"
    grid = grid or (DEVICE_GRID_CUDA if cuda else DEVICE_GRID)
    if precision_series is None and cuda:
        precision_series = PRECISION_SERIES
    result: dict[str, Any] = {
        "machine": machine_info(), "device": str(resolved), "torch_threads": threads, "batch_size": batch_size,
        "warmup_epochs": warmup, "timed_epochs": repeats,
        "paths": {p: DEVICE_PATHS[p] for p in paths},
        "bytes_models": {"sgd": _SGD_BYTES, "fused": _SGD_BYTES, "adam": _SGD_BYTES, "als": _ALS_BYTES},
        "precisions": PRECISIONS,
        "protocol": "synthetic ratings (mfutils.synthetic, seed 0, rank-16 truth); child processes (on the CPU one "
        "per configuration, on CUDA one per data set, its peaks reset between configurations); "
        "epoch_seconds = median over the timed epochs after the warm-up epochs; bound_seconds = "
        "max(bytes_per_epoch / copy bandwidth, flops / matrix-product rate), each roof the faster of two "
        "measurements (before the first configuration and after the last), each the fastest of its repeats; "
        "ratio = epoch_seconds / bound_seconds; peak_rss_bytes = the child's "
        "peak resident set (VmHWM), the interpreter and data included", "runs": [], "batch_runs": [],
        "precision_runs": [], "complete": False}
    done = _resumable(resume, result) if resume is not None else {}
    if cuda:  # first, so that its first call pays CUDA's and cuBLAS's start-up, as a reader's first call does
        result["timing_demo"] = resume["timing_demo"] if resume and "timing_demo" in resume else timing_demo(resolved)
    matmul_n = 8192 if cuda else 2048  # a GPU finishes order 2048 too fast to show its peak
    roofs = ([(m["copy"], m["matmul"]) for m in resume["roof_measurements"][:1]] if resume is not None else
             [(copy_bandwidth(device=resolved), matmul_rate(n=matmul_n, device=resolved))])  # before; after, below
    result["roof_measurements"] = [{"copy": c, "matmul": m} for c, m in roofs]
    if resume is not None and "transfer" in resume:
        result["transfer"] = resume["transfer"]
    largest = grid[-1][0]
    todo: list[tuple[str, str, dict[str, Any]]] = []  # (kind, size, configuration), in the order of the results
    for size, ranks in grid:
        todo += [("runs", size, {"rank": rank, "path": path, "batch_size": batch_size})
                 for rank in ranks for path in paths]
    if batch_series:
        size, rank, batches = batch_series
        todo += [("batch_runs", size, {"rank": rank, "path": path, "batch_size": batch})
                 for path in paths if path != "als" for batch in batches]
    todo += [("precision_runs", largest, {"rank": 64, "path": path, "batch_size": batch_size, "precision": precision,
                                          "val_frac": 0.1, "repeats": 3})
             for path, precision in precision_series or ()]
    def key(kind: str, size: str, config: dict[str, Any]) -> tuple:
        return _row_key(kind, {"size": size, "precision": "fp32", **config})

    with tempfile.TemporaryDirectory(prefix="mfutils-devices-") as folder:
        files, shape_of = {}, {}

        def prepare(size: str) -> None:
            """Generate ``size``'s ratings once, when a configuration first needs them, into a file."""
            if size in files:
                return
            data, _ = synthetic(*shapes[size], seed=0)
            shape_of[size] = {"n_users": data.n_users, "n_items": data.n_items, "n_ratings": data.n_ratings}
            if cuda and size == largest and "transfer" not in result:
                result["transfer"] = {"size": size, **transfer_costs(data.user_idx, data.item_idx, data.rating,
                                                                     resolved, batch_size)}
            files[size] = os.path.join(folder, f"{size}.pt")
            torch.save({"user_idx": data.user_idx, "item_idx": data.item_idx, "rating": data.rating,
                        "n_users": data.n_users, "n_items": data.n_items, "name": size}, files[size])

        def finish(kind: str, size: str, config: dict[str, Any], outcome: dict[str, Any]) -> None:
            if size not in shape_of:  # a finished configuration of the resumed sweep
                shape_of[size] = {name: outcome[name] for name in ("n_users", "n_items", "n_ratings")}
            row = {"size": size, **shape_of[size], "rank": config["rank"], "path": config["path"],
                   "batch_size": config["batch_size"], "precision": config.get("precision", "fp32")}
            row.update({k: v for k, v in outcome.items() if k not in row})
            _print_device_row(row)
            result[kind].append(row)
            if checkpoint is not None:
                checkpoint(result)

        # consecutive configurations of one kind on one data set that still have to run share a child on CUDA
        for (kind, size, finished), group in itertools.groupby(todo, lambda t: (t[0], t[1], key(*t) in done)):
            group = [config for _, _, config in group]
            if finished:
                for config in group:
                    finish(kind, size, config, done[key(kind, size, config)])
                continue
            prepare(size)
            configs = [{"warmup": warmup, "repeats": repeats, "precision": "fp32", "val_frac": 0.0, **c}
                       for c in group]
            for config, outcome in zip(group, _children(files[size], configs, resolved, threads)):
                finish(kind, size, config, outcome)
        if cuda and "transfer" not in result:  # every configuration of the largest size came from --resume
            prepare(largest)
    roofs.append((copy_bandwidth(device=resolved), matmul_rate(n=matmul_n, device=resolved)))
    copy, matmul = max((c for c, _ in roofs), key=lambda c: c["gb_per_s"]), max(
        (m for _, m in roofs), key=lambda m: m["gflop_per_s"])
    result.update({"copy": copy, "matmul": matmul, "roof_measurements": [{"copy": c, "matmul": m} for c, m in roofs]})
    for key in ("runs", "batch_runs", "precision_runs"):
        result[key] = [_measured(row, copy, matmul) for row in result[key]]
    print(f"roofs: copy {copy['gb_per_s']:.1f} GB/s, matrix product {matmul['gflop_per_s']:.0f} GFLOP/s",
          file=sys.stderr)
    for row in result["runs"]:
        _print_device_row(row)
    result["targets"] = _device_targets(result["runs"], cuda=cuda)
    result["complete"] = True
    return result


def _device_targets(runs: list[dict[str, Any]], *, cuda: bool = False) -> dict[str, Any]:
    """The book's goals at ml-20m, rank 64.

    CPU: the fastest SGD-type epoch and one ALS sweep within 3x their bounds, peak host memory <= 6 GB.
    CUDA: the fastest SGD-type epoch within :data:`TARGET_GPU_EPOCH_SECONDS`.
    """
    rows = [r for r in runs if r["size"] == "ml-20m" and r["rank"] == 64 and "epoch_seconds" in r]
    sgd = [r for r in rows if r["path"] in ("sgd", "fused", "adam")]
    als = [r for r in rows if r["path"] == "als"]
    if cuda:
        out: dict[str, Any] = {"at": "ml-20m, rank 64", "max_epoch_seconds": TARGET_GPU_EPOCH_SECONDS}
        if sgd:
            best = min(sgd, key=lambda r: r["epoch_seconds"])
            out["fastest_sgd_path"], out["sgd_epoch_seconds"] = best["path"], best["epoch_seconds"]
            out["sgd_met"] = best["epoch_seconds"] <= TARGET_GPU_EPOCH_SECONDS
        if rows:
            out["peak_device_bytes"] = {r["path"]: r.get("peak_device_bytes") for r in rows}
        return out
    out = {"at": "ml-20m, rank 64", "max_ratio": TARGET_RATIO, "max_peak_rss_bytes": TARGET_PEAK_BYTES}
    if sgd:
        best = min(sgd, key=lambda r: r["epoch_seconds"])
        out["fastest_sgd_path"] = best["path"]
        out["sgd_ratio"], out["sgd_met"] = best["ratio"], best["ratio"] <= TARGET_RATIO
    if als:
        out["als_ratio"], out["als_met"] = als[0]["ratio"], als[0]["ratio"] <= TARGET_RATIO
    if rows:
        out["peak_rss_bytes"] = {r["path"]: r["peak_rss_bytes"] for r in rows}
        out["memory_met"] = all(r["peak_rss_bytes"] <= TARGET_PEAK_BYTES for r in rows)
    return out


def _print_device_row(row: dict[str, Any]) -> None:
    """One line per configuration on stderr: as it finishes, and with its bound once the roofs are known."""
    head = f"{row['size']:>8} k={row['rank']:<3} {row['path']:>5} b={row['batch_size']:<6} {row['precision']}:"
    if "error" in row:
        print(f"{head} failed: {row['error']}", file=sys.stderr)
        return
    bound = (f", bound {row['bound_seconds']:.3f} s, ratio {row['ratio']:.2f}" if "ratio" in row else "")
    print(f"{head} {row['epoch_seconds']:.3f} s/epoch{bound}, peak {row['peak_rss_bytes'] / 1e9:.2f} GB",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------- phases: where a CPU epoch's time goes

PHASE_PATHS = ("fused", "als")


def _phase_epochs(data, path: str, rank: int, batch_size: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Train ``path`` for ``warmup + repeats`` epochs in one call inside ``phase_seconds()``; the timed epochs'
    seconds and phases (the differences of the running sums), their means and the last training RMSE."""
    from mfutils.models import BiasedMF
    from mfutils.train import fit_als, fit_sgd, phase_seconds

    model = BiasedMF(data.n_users, data.n_items, rank, global_mean=float(data.rating.mean()),
                     sparse=path != "als", seed=0)
    sums: list[dict[str, float]] = []
    with phase_seconds() as phases:
        record = lambda epoch, history: sums.append(dict(phases))  # noqa: E731 - running sums after each epoch
        if path == "als":
            history = fit_als(model, data, reg=0.05, n_epochs=warmup + repeats, device="cpu", callback=record)
        else:
            history = fit_sgd(model, data, optimizer="sgd", fused=True, n_epochs=warmup + repeats,
                              batch_size=batch_size, device="cpu", callback=record)
    epochs = []
    for n in range(warmup, warmup + repeats):
        last = sums[n - 1] if n > 0 else {}
        spent = {name: total - last.get(name, 0.0) for name, total in sums[n].items()}
        spent["rest"] = history.seconds[n] - sum(spent.values())
        epochs.append({"seconds": history.seconds[n], "phases": spent})
    return {"path": path, "description": DEVICE_PATHS[path], "batch_size": batch_size, "epochs": epochs,
            "mean_seconds": statistics.fmean(e["seconds"] for e in epochs),
            "mean_phases": {name: statistics.fmean(e["phases"].get(name, 0.0) for e in epochs)
                            for name in epochs[0]["phases"]},
            "train_rmse": history.train_rmse[-1]}


def run_phases(*, size: str = "ml-20m", rank: int = 64, paths: tuple[str, ...] = PHASE_PATHS,
               batch_size: int = DEVICE_BATCH, warmup: int = 1, repeats: int = 3, threads: int | None = None,
               batch_series: tuple | None = BATCH_SERIES,
               shapes: dict[str, tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """The wall-clock seconds of each phase of a fused SGD epoch and an ALS sweep on the CPU.

    Trains each path of ``paths`` (``"fused"``, ``"als"``) for ``warmup + repeats`` epochs in one call, as the
    ``devices`` sweep does, on synthetic ratings (seed 0) of ``size`` (a key of ``shapes``, default
    :data:`~mfutils.synthetic.SIZES`) at ``rank``, with ``threads`` torch threads (default: all cores),
    inside :func:`mfutils.train.phase_seconds`; per timed epoch it keeps the epoch's ``History.seconds`` and
    the seconds of each phase (the difference of the running sums before and after it), and ``"rest"``,
    what no phase covers. ``batch_series`` (size, rank, batch sizes; default the ``devices`` sweep's
    :data:`BATCH_SERIES`) times the fused path's phases at each batch size. The copy bandwidth and
    matrix-product rate are measured in the same run, before the first path, so the phases' rates can be
    set against them.

    Returns:
        ``{"machine", "size", "n_users", "n_items", "n_ratings", "rank", ..., "copy", "matmul",
        "paths": [{"path", "epochs": [{"seconds", "phases"}, ...], "mean_seconds", "mean_phases"}, ...],
        "batch_series": {"size", "rank", "n_ratings", "runs": [same as "paths", one per batch size]}}``.
    """
    from mfutils.synthetic import SIZES, synthetic

    shapes = SIZES if shapes is None else shapes
    for name in (size, *(batch_series[:1] if batch_series else ())):
        if name not in shapes:
            raise ValueError(f"--size {name}: not a known size; use one of {', '.join(shapes)}")
    unknown = [p for p in paths if p not in PHASE_PATHS]
    if unknown:
        raise ValueError(f"run_phases(): paths must be among {list(PHASE_PATHS)}; got {unknown}")
    threads = threads or _all_cores()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = synthetic(*shapes[size], seed=0)[0]
        result: dict[str, Any] = {
            "machine": machine_info(), "device": "cpu", "torch_threads": threads, "size": size,
            "n_users": data.n_users, "n_items": data.n_items, "n_ratings": data.n_ratings, "rank": rank,
            "batch_size": batch_size, "warmup_epochs": warmup, "timed_epochs": repeats,
            "protocol": "synthetic ratings (mfutils.synthetic, seed 0); per path and batch size one call of the "
            "trainer, as in the devices sweep, inside mfutils.train.phase_seconds(); the warm-up epochs are "
            "dropped; a phase's seconds are wall-clock seconds summed over its blocks within the epoch; rest = "
            "the epoch's History.seconds minus its phases",
            "copy": copy_bandwidth(), "matmul": matmul_rate(), "paths": []}
        for path in paths:
            result["paths"].append(_phase_epochs(data, path, rank, batch_size, warmup, repeats))
            print(f"{size} k={rank} {path}: {result['paths'][-1]['mean_seconds']:.2f} s per epoch", file=sys.stderr,
                  flush=True)
        if batch_series:
            series_size, series_rank, batches = batch_series
            del data
            data = synthetic(*shapes[series_size], seed=0)[0]
            runs = []
            for batch in batches:
                runs.append(_phase_epochs(data, "fused", series_rank, batch, warmup, repeats))
                print(f"{series_size} k={series_rank} fused b={batch}: {runs[-1]['mean_seconds']:.3f} s per epoch",
                      file=sys.stderr, flush=True)
            result["batch_series"] = {"size": series_size, "rank": series_rank, "n_ratings": data.n_ratings,
                                      "runs": runs}
        return result
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- spark: MLlib's ALS beside mfutils's, same data

SPARK_INSTALL = "make bench-spark (pip install -r requirements-bench-spark.txt; Spark 4 needs Java 17 or 21)"
SPARK_DRIVER_MEMORY = "2g"  # ML-1M's ratings and factor blocks need a few hundred MB
SPARK_TIMEOUT = 1800.0  # seconds for the Spark worker, JVM start included
DISTRIBUTED_TIMEOUT = 900.0  # seconds for the torchrun group of mfutils.distributed
_EVAL_CHUNK = 1 << 18  # ratings per step when scoring: bounds the (chunk, rank) temporaries

SPARK_OBJECTIVE = (
    "L = (1/N) [ sum_(u,i) (r_ui - p_u.q_i)^2 + reg (sum_u n_u |p_u|^2 + sum_i n_i |q_i|^2) ]: Spark MLlib's "
    "explicit ALS (no biases, ratings not centred, regParam times each row's rating count, ALS-WR) and "
    "mfutils.train.fit_als on BiasedMF(biases=False, global_mean=0.0) minimise this same L, with the same "
    "exact per-row ridge solves; only the starting factors differ")
SPARK_PROTOCOL = (
    "one synthetic data set and one random split for every system; Spark and fit_als fit twice from the same "
    "start (fit_seconds_first includes first-call costs: Spark's JIT and task set-up, torch's thread pools; "
    "fit_seconds_warm is the second fit), mfutils.distributed once (a fresh process group per launch); RMSEs "
    "are computed here, by one function, from each system's trained factors, unclipped; test RMSE is over "
    "the test ratings whose user and item both have training ratings, the rows Spark's "
    "coldStartStrategy='drop' keeps (n_test_dropped: the rest); train_loss is L")


def _java_version() -> tuple[str | None, str | None]:
    """(first line of ``java -version``, None), or (None, why Java cannot be used); JAVA_HOME first, as pyspark."""
    home = os.environ.get("JAVA_HOME")
    java = os.path.join(home, "bin", "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={home} has no bin/java" if home else "no `java` on PATH and JAVA_HOME is unset"
        return None, f"Java was not found ({where}); install a JDK 17 or 21 (e.g. apt-get install openjdk-17-jre)"
    try:
        proc = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`{java} -version` failed: {type(exc).__name__}: {exc}"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None, f"`{java} -version` exited {proc.returncode}: {lines[-1] if lines else 'no output'}"
    return lines[0].strip(), None


def _spark_unavailable() -> tuple[str | None, str | None]:
    """(reason Spark cannot run here or None, Java version string or None). Imports pyspark; starts no Spark."""
    try:
        import pyspark  # noqa: F401  (optional: only requirements-bench-spark.txt installs it)
    except ImportError as exc:
        return f"pyspark is not installed ({type(exc).__name__}: {exc}); install it with {SPARK_INSTALL}", None
    java, why = _java_version()
    if java is None:
        return f"{why}; pyspark needs it to start Spark ({SPARK_INSTALL})", None
    return None, java


_LOG4J = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %p %c{1}: %m%n
"""


def _spark_worker(folder: str) -> None:
    """(child process) Run Spark MLlib's ALS on ``folder``'s train/test CSV files; write ``out.json``.

    The JVM's console output stays in this process's captured stderr, and only errors are logged. Writes
    the timings, Spark's own RMSEs (``RegressionEvaluator``), the parameters and versions to ``out.json``,
    and the trained factors (ids and rows, sorted by id) to ``{user,item}_{ids,factors}.npy``; a failure
    becomes ``{"error": ...}`` in ``out.json``.
    """
    with open(os.path.join(folder, "spec.json"), encoding="utf-8") as f:
        spec = json.load(f)
    out: dict[str, Any] = {}
    try:
        _spark_fit(spec, folder, out)
    except Exception as exc:  # noqa: BLE001 - the parent reports it as the system's error, in one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        out["error"] = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    with open(os.path.join(folder, "out.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)


def _spark_fit(spec: dict[str, Any], folder: str, out: dict[str, Any]) -> None:
    start = time.perf_counter()
    import py4j
    import pyspark
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    out["import_seconds"] = time.perf_counter() - start
    log4j = os.path.join(folder, "log4j2.properties")
    with open(log4j, "w", encoding="utf-8") as f:
        f.write(_LOG4J)
    conf = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
            "spark.driver.memory": spec["driver_memory"], "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1", "spark.local.dir": os.path.join(folder, "spark-local"),
            # the joins of predicting and scoring: 200 partitions (the default) is mostly task overhead on a few
            # cores; ALS itself partitions by its numUserBlocks/numItemBlocks (left at their defaults)
            "spark.sql.shuffle.partitions": str(2 * spec["cores"]),
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}"}
    start = time.perf_counter()
    builder = SparkSession.builder.master(f"local[{spec['cores']}]").appName("mfutils-bench-spark")
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()  # launches the JVM (spark-submit) and the SparkContext
    spark.sparkContext.setLogLevel("ERROR")
    out["session_start_seconds"] = time.perf_counter() - start
    out["master"] = f"local[{spec['cores']}]"
    out["conf"] = {k: v for k, v in conf.items() if k not in ("spark.local.dir", "spark.driver.extraJavaOptions")}
    out["versions"] = {"pyspark": pyspark.__version__, "spark": spark.version, "py4j": py4j.__version__}
    try:
        start = time.perf_counter()
        schema = "user INT, item INT, rating FLOAT"
        train = spark.read.csv(spec["train"], schema=schema).cache()
        test = spark.read.csv(spec["test"], schema=schema).cache()
        out["n_train_read"], out["n_test_read"] = train.count(), test.count()  # materialise the caches
        out["load_seconds"] = time.perf_counter() - start
        als = ALS(rank=spec["rank"], maxIter=spec["epochs"], regParam=spec["reg"], implicitPrefs=False,
                  nonnegative=False, coldStartStrategy="drop", seed=spec["seed"], userCol="user",
                  itemCol="item", ratingCol="rating")
        fits = []
        for _ in range(2):  # the first fit pays for JIT compilation and first-task costs; the second does not
            start = time.perf_counter()
            model = als.fit(train)  # eager: ALS materialises the final factor RDDs before returning
            fits.append(time.perf_counter() - start)
        out["fit_seconds_first"], out["fit_seconds_warm"] = fits
        start = time.perf_counter()
        evaluator = RegressionEvaluator(metricName="rmse", labelCol="rating", predictionCol="prediction")
        predicted = model.transform(test).cache()
        out["evaluator_n_test_predicted"] = predicted.count()  # the rows coldStartStrategy="drop" kept
        out["evaluator_test_rmse"] = evaluator.evaluate(predicted)
        out["evaluator_train_rmse"] = evaluator.evaluate(model.transform(train))
        out["predict_seconds"] = time.perf_counter() - start
        for side, frame in (("user", model.userFactors), ("item", model.itemFactors)):
            rows = frame.orderBy("id").collect()
            np.save(os.path.join(folder, f"{side}_ids.npy"), np.array([r["id"] for r in rows], dtype=np.int64))
            np.save(os.path.join(folder, f"{side}_factors.npy"),
                    np.array([r["features"] for r in rows], dtype=np.float32).reshape(len(rows), spec["rank"]))
        out["params"] = {param.name: value for param, value in als.extractParamMap().items()
                         if isinstance(value, (bool, int, float, str))}
    finally:
        spark.stop()


def _spark_side(train, test, *, rank: int, reg: float, epochs: int, seed: int, cores: int,
                timeout: float = SPARK_TIMEOUT) -> dict[str, Any]:
    """Spark MLlib's ALS on ``train`` in a child interpreter (:func:`_spark_worker`), scored like mfutils's.

    The ratings travel as CSV (user and item numbers, rating), which Spark reads itself: no pandas or Arrow
    conversion. Spark keeps factors only for users and items that have training ratings; the others stay
    zero here, and the test rows that need them are the ones its ``coldStartStrategy="drop"`` drops.
    """
    reason, java = _spark_unavailable()
    if reason is not None:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="mfutils-spark-") as folder:
        start = time.perf_counter()
        for name, part in (("train", train), ("test", test)):
            table = np.column_stack([part.user_idx.numpy(), part.item_idx.numpy(), part.rating.numpy()])
            np.savetxt(os.path.join(folder, f"{name}.csv"), table, fmt=("%d", "%d", "%.9g"), delimiter=",")
        write_seconds = time.perf_counter() - start
        with open(os.path.join(folder, "spec.json"), "w", encoding="utf-8") as f:
            json.dump({"rank": rank, "reg": reg, "epochs": epochs, "seed": seed, "cores": cores,
                       "driver_memory": SPARK_DRIVER_MEMORY, "train": os.path.join(folder, "train.csv"),
                       "test": os.path.join(folder, "test.csv")}, f)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
               "SPARK_LOCAL_IP": "127.0.0.1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "mfutils.bench", "_spark-worker", folder],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)  # its own process group: the JVM goes with it
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"the Spark worker was stopped after {timeout:g} s", "java": java}
        except BaseException:  # interrupted: its own process group does not get the terminal's Ctrl-C
            with contextlib.suppress(ProcessLookupError):  # the group may have ended already
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        worker_seconds = time.perf_counter() - start
        try:
            with open(os.path.join(folder, "out.json"), encoding="utf-8") as f:
                out = json.load(f)
        except (OSError, ValueError):
            last = (stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            return {"error": f"the Spark worker exited {proc.returncode} without results: {last}", "java": java}
        if "error" in out:
            return {"error": out["error"], "java": java}
        factors = {side: _spark_factors(folder, side, n, rank)
                   for side, n in (("user", train.n_users), ("item", train.n_items))}
    scores = _als_scores(factors["user"], factors["item"], 0.0, train, test, reg)
    versions = {**out.pop("versions"), "java": java}
    return {"system": "pyspark.ml.recommendation.ALS, local mode", "versions": versions,
            **{k: out.pop(k) for k in ("master", "conf", "params")},
            "init": "Spark draws each factor row from a seeded normal and scales it to unit length; its first "
                    "half-step solves the items from these user factors (fit_als: the users from its items)",
            "csv_write_seconds": write_seconds, "worker_seconds": worker_seconds, **out, **scores,
            "test_rmse_matches_evaluator": abs(scores["test_rmse"] - out["evaluator_test_rmse"]) < 1e-4}


def _spark_factors(folder: str, side: str, n_rows: int, rank: int) -> torch.Tensor:
    """Spark's factor table as an ``(n_rows, rank)`` float32 tensor, zero for the rows Spark has no factors for."""
    ids = np.load(os.path.join(folder, f"{side}_ids.npy"))
    table = torch.zeros(n_rows, rank)
    table[torch.from_numpy(ids)] = torch.from_numpy(np.load(os.path.join(folder, f"{side}_factors.npy")))
    return table


def _als_scores(P: torch.Tensor, Q: torch.Tensor, mu: float, train, test, reg: float) -> dict[str, Any]:
    r"""Train and test RMSE and the objective :math:`L` of ``SPARK_OBJECTIVE`` for :math:`\hat r = \mu + p_u^\top q_i`.

    The same function scores every system, in float64, without clipping. Test rows whose user or item has
    no training rating are left out and counted (``n_test_dropped``), as Spark's ``coldStartStrategy="drop"``
    does. ``P``: ``(n_users, k)``, ``Q``: ``(n_items, k)``.
    """
    P, Q = P.detach().to("cpu", torch.float64), Q.detach().to("cpu", torch.float64)

    def sse(u: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> float:
        total = 0.0
        for uc, ic, rc in zip(u.split(_EVAL_CHUNK), i.split(_EVAL_CHUNK), r.split(_EVAL_CHUNK)):
            total += float(((P[uc] * Q[ic]).sum(1) + mu - rc.double()).pow(2).sum())  # (chunk, k) -> scalar
        return total

    n_u = torch.bincount(train.user_idx, minlength=len(P)).double()  # (n_users,): training ratings per user
    n_i = torch.bincount(train.item_idx, minlength=len(Q)).double()  # (n_items,)
    train_sse = sse(train.user_idx, train.item_idx, train.rating)
    penalty = float((n_u * P.pow(2).sum(1)).sum() + (n_i * Q.pow(2).sum(1)).sum())
    keep = (n_u[test.user_idx] > 0) & (n_i[test.item_idx] > 0)  # (n_test,): both seen in training
    n_kept = int(keep.sum())
    test_sse = sse(test.user_idx[keep], test.item_idx[keep], test.rating[keep])
    return {"train_rmse": math.sqrt(train_sse / train.n_ratings),
            "test_rmse": math.sqrt(test_sse / n_kept) if n_kept else None,
            "train_loss": (train_sse + reg * penalty) / train.n_ratings,
            "n_test_predicted": n_kept, "n_test_dropped": test.n_ratings - n_kept}


def _mfutils_side(train, test, *, rank: int, reg: float, epochs: int, seed: int, threads: int) -> dict[str, Any]:
    """``fit_als`` in this process at ``threads`` torch threads, twice from the same start (first, warm)."""
    from mfutils.models import BiasedMF
    from mfutils.train import fit_als

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fits = []
        for _ in range(2):
            model = BiasedMF(train.n_users, train.n_items, rank, biases=False, global_mean=0.0, seed=seed)
            start = time.perf_counter()
            fit_als(model, train, reg=reg, n_epochs=epochs, device="cpu")
            fits.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    scores = _als_scores(model.user_factors.weight, model.item_factors.weight, 0.0, train, test, reg)
    return {"system": "mfutils.train.fit_als, in process", "threads": threads,
            "model": f"BiasedMF(n_users, n_items, {rank}, biases=False, global_mean=0.0, seed={seed})",
            "fit_seconds_first": fits[0], "fit_seconds_warm": fits[1], **scores}


def _distributed_side(train, test, size: tuple[int, int, int], *, rank: int, reg: float, epochs: int, seed: int,
                      test_frac: float, workers: int, timeout: float = DISTRIBUTED_TIMEOUT) -> dict[str, Any]:
    """``mfutils.distributed.launch(workers, ...)`` on the same synthetic data and split, scored like the rest.

    Its command line rebuilds ``synthetic(*size, seed=seed)`` and ``random_split(..., test_frac, seed=seed)``
    in every worker, so the data are these; ``--no-biases --no-mean`` make its model Spark's (no biases,
    ratings not centred), which ``same_objective_as_spark`` confirms from the saved factors.
    """
    try:
        from mfutils.distributed import DistributedError, launch
    except ImportError as exc:
        return {"error": f"mfutils.distributed cannot be imported: {type(exc).__name__}: {exc}"}
    with tempfile.TemporaryDirectory(prefix="mfutils-spark-dist-") as folder:
        factors = os.path.join(folder, "factors.pt")
        args = ["--synthetic", *map(str, size), "--rank", str(rank), "--reg", repr(reg), "--epochs", str(epochs),
                "--seed", str(seed), "--test-frac", repr(test_frac), "--no-biases", "--no-mean", "--device", "cpu"]
        start = time.perf_counter()
        try:
            result = launch(workers, [*args, "--save-factors", factors], timeout=timeout, omp_threads=1)
        except (DistributedError, ValueError, OSError) as exc:
            return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())}", "args": args}
        launch_seconds = time.perf_counter() - start
        state = torch.load(factors)
    model, data = result["model"], result["data"]
    mu = float(state["global_mean"])
    same_data = (data["n_train"], data["n_test"]) == (train.n_ratings, test.n_ratings)
    scores = _als_scores(state["user_factors.weight"], state["item_factors.weight"], mu, train, test, reg)
    per_rank = result.get("per_rank", {})
    mean = lambda rows: statistics.fmean(x for row in rows for x in row) if rows else None  # noqa: E731
    return {"system": "mfutils.distributed.launch (torchrun, gloo)", "workers": workers, "omp_threads": 1,
            "args": args, "model": model,
            "same_objective_as_spark": model.get("biases") is False and mu == 0.0,
            "note": None if mu == 0.0 else f"the ratings were centred (global_mean = {mu:.4f}): not Spark's model",
            "same_split": same_data, "fit_seconds_first": result["fit_seconds"], "fit_seconds_warm": None,
            "fit_seconds_note": "one fit per launch: every launch is a fresh process group",
            "sweep_seconds": result["sweeps"]["seconds"], "launch_seconds": launch_seconds,
            "wall_seconds": result["wall_seconds"], "mean_compute_seconds_per_sweep": mean(per_rank.get("compute_s")),
            "mean_comm_seconds_per_sweep": mean(per_rank.get("comm_s")), "reported_final": result["final"],
            **scores}


def run_spark(*, size: tuple[int, int, int] | None = None, rank: int = 32, reg: float = 0.1, epochs: int = 10,
              seed: int = 0, test_frac: float = 0.1, cores: int = 2, spark: bool = True,
              distributed: bool = True) -> dict[str, Any]:
    r"""Spark MLlib's ALS (local mode) beside ``fit_als`` and ``mfutils.distributed`` on the same ratings.

    The data are ``synthetic(*size, seed=seed)`` (default :data:`~mfutils.synthetic.SIZES` ``["ml-1m"]``),
    split by ``random_split(data, test_frac, seed=seed)``. **Same objective** (``SPARK_OBJECTIVE``): Spark's
    explicit ALS has no biases, does not centre the ratings, and multiplies ``regParam`` by each row's number
    of ratings (ALS-WR); ``fit_als(reg=reg)`` on ``BiasedMF(..., biases=False, global_mean=0.0)`` minimises
    exactly that :math:`L` with the same per-row ridge solves. Their starting factors differ (Spark draws its
    own), so their RMSEs come out close, not equal.

    Measured, per system: fit seconds, first and warm (``SPARK_PROTOCOL``); train and test RMSE, the
    objective and the test rows scored, all by :func:`_als_scores` from the trained factors. Spark also
    reports its JVM/session start, reading the CSV files, predicting, and its own evaluator's RMSEs;
    ``fit_als`` runs at ``cores`` threads and at 1; ``mfutils.distributed`` on ``cores`` single-threaded
    workers. Spark runs with ``local[cores]``: the same cores for every system. When pyspark or Java is
    missing, ``"spark"`` is ``{"skipped": reason}`` and the rest still runs.
    """
    from mfutils import __version__
    from mfutils.data import random_split
    from mfutils.synthetic import SIZES, synthetic

    size = tuple(SIZES["ml-1m"]) if size is None else tuple(size)
    started, load_before = time.perf_counter(), os.getloadavg()
    start = time.perf_counter()
    data, _ = synthetic(*size, seed=seed)
    train, test = random_split(data, test_frac, seed=seed)
    data_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "machine": machine_info(), "mfutils_version": __version__, "load_average_before": list(load_before),
        "data": {"source": f"mfutils.synthetic.synthetic({size[0]}, {size[1]}, {size[2]}, seed={seed})",
                 "split": f"mfutils.data.random_split(data, {test_frac}, seed={seed})",
                 "n_users": data.n_users, "n_items": data.n_items, "n_ratings": data.n_ratings,
                 "n_train": train.n_ratings, "n_test": test.n_ratings, "seconds": data_seconds},
        "settings": {"rank": rank, "reg": reg, "epochs": epochs, "seed": seed, "test_frac": test_frac,
                     "cores": cores},
        "objective": SPARK_OBJECTIVE, "protocol": SPARK_PROTOCOL}
    del data
    common = {"rank": rank, "reg": reg, "epochs": epochs, "seed": seed}
    result["spark"] = (_spark_side(train, test, cores=cores, **common) if spark
                       else {"skipped": "not requested (run_spark(spark=False))"})
    _print_spark_row("spark", result["spark"])
    result["mfutils"] = []
    for threads in dict.fromkeys((cores, 1)):
        result["mfutils"].append(_mfutils_side(train, test, threads=threads, **common))
        _print_spark_row(f"mfutils {threads} thread(s)", result["mfutils"][-1])
    result["distributed"] = (_distributed_side(train, test, size, test_frac=test_frac, workers=cores, **common)
                             if distributed else {"skipped": "not requested (run_spark(distributed=False))"})
    _print_spark_row(f"distributed {cores} workers", result["distributed"])
    result["load_average_after"] = list(os.getloadavg())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _print_spark_row(name: str, entry: dict[str, Any]) -> None:
    for key, word in (("skipped", "skipped"), ("error", "failed")):
        if key in entry:
            print(f"{name:>24}: {word}: {entry[key]}", file=sys.stderr, flush=True)
            return
    warm = entry["fit_seconds_warm"]
    session = f"session start {entry['session_start_seconds']:.1f} s, " if "session_start_seconds" in entry else ""
    test = "n/a" if entry["test_rmse"] is None else f"{entry['test_rmse']:.4f}"
    print(f"{name:>24}: {session}fit {entry['fit_seconds_first']:.2f} s first"
          + ("" if warm is None else f", {warm:.2f} s warm") + f"; RMSE train {entry['train_rmse']:.4f}, test "
          f"{test} ({entry['n_test_dropped']} test rows dropped); L {entry['train_loss']:.4f}",
          file=sys.stderr, flush=True)


def _spark_args(parser: argparse.ArgumentParser) -> None:
    """The ``spark`` subcommand's options (their ranges are checked by :func:`_check_spark_args`)."""
    from mfutils.synthetic import SIZES

    parser.add_argument("--out", help="write the JSON here (e.g. book/results/spark_als.json); default: stdout")
    parser.add_argument("--size", nargs=3, type=int, metavar=("N_USERS", "N_ITEMS", "N_RATINGS"),
                        default=list(SIZES["ml-1m"]), help="synthetic data size (default: ML-1M's, %(default)s)")
    parser.add_argument("--rank", type=int, default=32, help="latent factors (default 32)")
    parser.add_argument("--reg", type=float, default=0.1, help="λ, Spark's regParam (default 0.1)")
    parser.add_argument("--epochs", type=int, default=10, help="ALS sweeps, Spark's maxIter (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data, the split and both inits (default 0)")
    parser.add_argument("--test-frac", type=float, default=0.1, help="held-out fraction (default 0.1)")
    parser.add_argument("--cores", type=int, default=2,
                        help="Spark's local[N], fit_als's threads and distributed workers (default 2)")


def _check_spark_args(args: argparse.Namespace) -> str | None:
    """The first problem with the ``spark`` options, as one sentence; ``None`` when they are usable."""
    n_users, n_items, n_ratings = args.size
    if min(n_users, n_items) < 1 or n_ratings < 2:
        return f"--size {n_users} {n_items} {n_ratings}: need at least 1 user, 1 item and 2 ratings"
    if n_ratings > n_users * n_items // 2:
        return (f"--size {n_users} {n_items} {n_ratings}: at most {n_users * n_items // 2:,} ratings fit (half of "
                f"all user-item pairs); ask for fewer ratings or more users/items")
    if n_users >= 2 ** 31 or n_items >= 2 ** 31:
        return f"--size {n_users} {n_items} {n_ratings}: Spark's ALS needs user and item numbers below 2^31"
    for name, value in (("--rank", args.rank), ("--epochs", args.epochs), ("--cores", args.cores)):
        if value < 1:
            return f"{name} must be >= 1, got {value}"
    if not (math.isfinite(args.reg) and args.reg > 0):
        return f"--reg must be > 0 (each row's system is singular without it), got {args.reg}"
    if not 0 < args.test_frac < 1:
        return f"--test-frac must be strictly between 0 and 1, got {args.test_frac}"
    if not 0 <= args.seed < 2 ** 63:  # numpy's and torch's generators, and Spark's Java long
        return f"--seed must be >= 0 and < 2**63, got {args.seed}"
    return None


class _OneLineError(Exception):
    """A usage error of the ``spark`` subcommand: printed as one ``error:`` line, exit status 2."""


def _raise_one_line(message: str) -> None:
    raise _OneLineError(message)


def _spark_command(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """``python -m mfutils.bench spark ...``: parse, check, run, write; 2 on bad arguments, 1 if a system failed."""
    parser.error = _raise_one_line  # type: ignore[method-assign]  # one line, no usage block
    try:
        args = parser.parse_args(argv)
        problem = _check_spark_args(args)
    except _OneLineError as exc:
        problem = str(exc)
    if problem is not None:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return 2
    result = run_spark(size=tuple(args.size), rank=args.rank, reg=args.reg, epochs=args.epochs, seed=args.seed,
                       test_frac=args.test_frac, cores=args.cores)
    if args.out:
        _write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))
    failed = [k for k in ("spark", "distributed") if "error" in result[k]]
    if failed:
        print(f"{parser.prog}: error: {', '.join(failed)} failed (see the JSON)", file=sys.stderr)
    return 1 if failed else 0


def _check_out(path: str, example: str) -> None:
    """A ValueError now, before a long run, if ``path`` cannot become the results file (``example``: a good one)."""
    if not path or os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise ValueError(f"--out {path!r} does not name a file; name one, e.g. --out {example}")
    from mfutils.cli import cannot_write

    folder = os.path.dirname(os.path.abspath(path))
    try:  # make the folders now, as the write at the end would
        os.makedirs(folder, exist_ok=True)
        why = cannot_write(path)
    except OSError as exc:
        why = exc.strerror or str(exc)
    if why is not None:
        raise ValueError(f"--out {path}: cannot write in {folder} ({why}); name a file in a folder you can write to")


def _write_json(path: str, obj: dict[str, Any]) -> None:
    """Write ``obj`` as indented JSON whole or not at all (:func:`mfutils.cli.write_file`), folders made."""
    from mfutils.cli import write_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(obj, indent=2) + "\n"
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), prefix=".bench-")


def _print_summary(result: dict[str, Any]) -> None:
    for name, entry in result["methods"].items():
        if entry["available"]:
            m, x = entry["mean"], entry.get("speedup_vs_surprise_svd")
            speed = f"  {x:.2f}x Surprise SVD" if x else ""
            print(f"{name:>18}: RMSE {m['rmse']:.4f}  MAE {m['mae']:.4f}  {m['seconds']:.3f} s/fold{speed}",
                  file=sys.stderr)
        else:
            print(f"{name:>18}: not available: {entry['reason']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m mfutils.bench folds [--out PATH] ...``, ``devices --device cpu|cuda [--out PATH] ...`` or
    ``spark [--out PATH] ...``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lenskit-worker"] and len(argv) == 2:  # LensKit's interpreter: mfutils is not importable there
        _lenskit_worker(argv[1])
        return 0
    from mfutils.cli import _number_type

    positive_int = _number_type(int, 1)
    parser = argparse.ArgumentParser(prog="python -m mfutils.bench", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    folds = commands.add_parser("folds", help="ml-100k u1-u5: the CLI default, the article's snippet and peers")
    folds.add_argument("--out", help="write the JSON here (e.g. book/results/folds.json); default: stdout")
    folds.add_argument("--repeats", type=int, default=5, help="timed runs per fold (median; default 5)")
    folds.add_argument("--threads", type=int, default=1, help="torch (and LensKit) threads (default 1)")
    folds.add_argument("--lenskit-python", help="interpreter of a virtual environment with LensKit installed")
    devices = commands.add_parser("devices", help="seconds per epoch vs the bandwidth bound, and peak memory, "
                                                  "on synthetic ml-100k..ml-20m sizes")
    devices.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    devices.add_argument("--out", help="write the JSON here (e.g. book/results/devices_cpu.json); default: stdout")
    devices.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    devices.add_argument("--resume", metavar="PATH", help="an unfinished --out file of the same command on this "
                         "machine: keep its finished configurations and run the rest")
    devices.add_argument("--repeats", type=positive_int, default=3,
                         help="timed epochs after the warm-up (median; default 3)")
    phases = commands.add_parser("phases", help="where the time of a fused SGD epoch and an ALS sweep goes, "
                                                "on the CPU")
    phases.add_argument("--out", help="write the JSON here (e.g. book/results/phases_cpu.json); default: stdout")
    phases.add_argument("--size", default="ml-20m", help="a synthetic size of mfutils.synthetic.SIZES, e.g. "
                        "ml-1m (default ml-20m)")
    phases.add_argument("--rank", type=positive_int, default=64, help="latent factors (default 64)")
    phases.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    phases.add_argument("--repeats", type=positive_int, default=3, help="timed epochs after the warm-up (default 3)")
    many = commands.add_parser("_many", help="(internal) configurations of `devices` on one file, in a child")
    many.add_argument("file")
    many.add_argument("--device", required=True)
    many.add_argument("--threads", type=int, required=True)
    many.add_argument("--configs", type=json.loads, required=True, help="a JSON list of keyword arguments of _one")
    worker = commands.add_parser("lenskit-worker", help="(internal) run LensKit on the folds in FOLDER")
    worker.add_argument("folder")
    spark = commands.add_parser("spark", help="Spark MLlib's ALS (local mode) beside fit_als and "
                                              "mfutils.distributed on the same synthetic ratings")
    _spark_args(spark)
    spark_worker = commands.add_parser("_spark-worker", help="(internal) run Spark's ALS on the files in FOLDER")
    spark_worker.add_argument("folder")
    if argv[:1] == ["spark"]:
        return _spark_command(spark, argv[1:])
    args = parser.parse_args(argv)
    if args.command == "_spark-worker":
        _spark_worker(args.folder)
        return 0
    if args.command == "_many":
        torch.set_num_threads(args.threads)
        _many(args.file, args.configs, args.device)
        return 0
    if args.out is not None:  # folds, devices, phases: checked now, not after the run
        try:
            _check_out(args.out, f"book/results/{args.command}.json" if args.command == "folds" else
                       f"book/results/{args.command}_{getattr(args, 'device', 'cpu')}.json")
        except ValueError as exc:
            print(f"python -m mfutils.bench {args.command}: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "devices":
        try:
            _require_device(args.device)
        except (RuntimeError, ValueError) as exc:
            print(f"python -m mfutils.bench devices: error: {exc}", file=sys.stderr)
            return 2
        extra: dict[str, Any] = {}
        if args.resume is not None:
            try:
                with open(args.resume, encoding="utf-8") as f:
                    extra["resume"] = json.load(f)
            except (OSError, ValueError) as exc:
                print(f"python -m mfutils.bench devices: error: --resume {args.resume}: "
                      f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
                return 2
        if args.out:  # after every configuration: a sweep cut short keeps what it measured, and can resume
            extra["checkpoint"] = lambda partial: _write_json(args.out, partial)
        try:
            result = run_devices(args.device, threads=args.threads, repeats=max(1, args.repeats), **extra)
        except ValueError as exc:  # a --resume file from other settings or another machine
            print(f"python -m mfutils.bench devices: error: {exc}", file=sys.stderr)
            return 2
    elif args.command == "phases":
        try:
            result = run_phases(size=args.size, rank=args.rank, threads=args.threads, repeats=args.repeats)
        except ValueError as exc:
            print(f"python -m mfutils.bench phases: error: {exc}", file=sys.stderr)
            return 2
    else:
        result = run_folds(repeats=max(1, args.repeats), threads=max(1, args.threads),
                           lenskit_python=args.lenskit_python)
        _print_summary(result)
    if args.out:
        _write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))
    return 0


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, ``timeout``) as Ctrl-C: ``finally`` blocks then stop the child processes and remove
    the temporary folders, where Python's default would exit at once and leave both behind."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if hasattr(signal, "pthread_sigmask"):  # a child inherits the mask _hold_sigterm set around its start
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("python -m mfutils.bench: interrupted (a devices --out file keeps the configurations finished so far; "
              "--resume continues from it)", file=sys.stderr)
        sys.exit(130)
