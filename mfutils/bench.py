r"""Honest timing (:func:`time_it`, :func:`machine_info`) and the ml-100k fold benchmark.

``python -m mfutils.bench folds [--out book/results/folds.json]`` runs the CLI's default method on the five
official ml-100k folds (``u1.base``/``u1.test`` … ``u5``) and, when ``scikit-surprise`` is installed,
Surprise's ``SVD()`` with its default hyperparameters in the same process, and writes per-fold and mean
RMSE, MAE and fit+predict seconds. Without Surprise the JSON says so instead of dropping it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["time_it", "machine_info", "run_folds", "main"]


def time_it(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5,
            device: str | torch.device = "cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs.

    On CUDA the clock is read only after ``torch.cuda.synchronize()``, so queued kernels are counted;
    on the CPU there is nothing to wait for.
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
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a timing was taken: CPU model and threads, torch/CUDA versions, GPU name, UTC date."""
    cuda = torch.cuda.is_available()
    return {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cuda": torch.version.cuda if cuda else None,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _table(data) -> Any:
    """A fold's RatingData as the CLI's RatingsTable (raw ids as string tokens, like a parsed file)."""
    from mfutils.cli import RatingsTable

    users = data.user_ids[data.user_idx.numpy()].astype(str).astype(object)
    items = data.item_ids[data.item_idx.numpy()].astype(str).astype(object)
    return RatingsTable(users, items, data.rating.numpy().astype(np.float64), data.timestamp.numpy().copy(),
                        np.arange(1, data.n_ratings + 1), data.name)


def _ours(train, test, repeats: int) -> dict[str, Any]:
    from mfutils.cli import dedupe, fit_predict

    runs = [fit_predict(dedupe(train)[0], test) for _ in range(repeats)]
    pred, facts = runs[0]
    return {"pred": pred, "fit_seconds": statistics.median(f["fit_seconds"] for _, f in runs),
            "predict_seconds": statistics.median(f["predict_seconds"] for _, f in runs),
            "settings": {k: facts[k] for k in ("method", "rank", "reg", "epochs", "seed", "device")}}


def _surprise(train, test, repeats: int) -> dict[str, Any]:
    import pandas as pd
    import surprise

    frame = pd.DataFrame({"user": train.user, "item": train.item, "rating": train.rating})
    scale = (float(train.rating.min()), float(train.rating.max()))
    fits, predicts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        trainset = surprise.Dataset.load_from_df(frame, surprise.Reader(rating_scale=scale)).build_full_trainset()
        algo = surprise.SVD(random_state=0).fit(trainset)  # default hyperparameters; seeded for repeatability
        fits.append(time.perf_counter() - start)
        start = time.perf_counter()
        pred = np.array([p.est for p in algo.test(list(zip(test.user, test.item, test.rating)))])
        predicts.append(time.perf_counter() - start)
    return {"pred": pred, "fit_seconds": statistics.median(fits), "predict_seconds": statistics.median(predicts),
            "settings": {"algorithm": "surprise.SVD()", "version": surprise.__version__, "random_state": 0}}


def _score(runs: list[dict[str, Any]], tests: list) -> dict[str, Any]:
    from mfutils.metrics import mae, rmse

    folds = []
    for k, (run, test) in enumerate(zip(runs, tests), start=1):
        pred, target = torch.as_tensor(run["pred"], dtype=torch.float64), torch.as_tensor(test.rating)
        folds.append({"fold": k, "rmse": rmse(pred, target), "mae": mae(pred, target),
                      "fit_seconds": run["fit_seconds"], "predict_seconds": run["predict_seconds"],
                      "seconds": run["fit_seconds"] + run["predict_seconds"]})
    mean = {key: statistics.fmean(f[key] for f in folds) for key in ("rmse", "mae", "seconds")}
    return {"settings": runs[0]["settings"], "folds": folds, "mean": mean}


def run_folds(*, folds: tuple[int, ...] = (1, 2, 3, 4, 5), repeats: int = 5) -> dict[str, Any]:
    """Benchmark the CLI default and Surprise ``SVD()`` on ml-100k ``u<k>.base``/``u<k>.test``.

    Seconds are fit+predict wall-clock (from parsed rows to predictions: numbering ids or building
    Surprise's trainset is included), the median of ``repeats`` runs after one untimed warm-up run.
    """
    from mfutils.movielens import load_ml100k_fold

    pairs = [load_ml100k_fold(k, progress=False) for k in folds]
    trains, tests = [_table(tr) for tr, _ in pairs], [_table(te) for _, te in pairs]
    result: dict[str, Any] = {"machine": machine_info(), "data": "ml-100k u1-u5 folds", "repeats": repeats,
                              "protocol": "fit on u<k>.base, predict u<k>.test; seconds = median fit+predict"}
    try:
        import surprise  # noqa: F401
    except ImportError as exc:
        result["surprise_svd"] = {"available": False,
                                  "reason": f"{type(exc).__name__}: {exc}; pip install -r requirements-bench.txt"}
        methods = {"ours": _ours}
    else:
        methods = {"ours": _ours, "surprise_svd": _surprise}
    for name, run in methods.items():
        run(trains[0], tests[0], 1)  # warm-up: first-call costs (allocator, thread pools) are not timed
        scored = _score([run(tr, te, repeats) for tr, te in zip(trains, tests)], tests)
        result[name] = {"available": True, **scored} if name == "surprise_svd" else scored
    return result


def _write_json(path: str, obj: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m mfutils.bench folds [--out PATH] [--repeats N]``."""
    parser = argparse.ArgumentParser(prog="python -m mfutils.bench", description=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    folds = commands.add_parser("folds", help="ml-100k u1-u5: CLI default vs Surprise SVD()")
    folds.add_argument("--out", help="write the JSON here (e.g. book/results/folds.json); default: stdout")
    folds.add_argument("--repeats", type=int, default=5, help="timed runs per fold (median; default 5)")
    args = parser.parse_args(argv)
    result = run_folds(repeats=max(1, args.repeats))
    for name in ("ours", "surprise_svd"):
        if "mean" in result[name]:
            m = result[name]["mean"]
            print(f"{name:>12}: RMSE {m['rmse']:.4f}  MAE {m['mae']:.4f}  {m['seconds']:.3f} s/fold", file=sys.stderr)
    if args.out:
        _write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
