"""bench spark: argument checks, the skipped-Spark path, the JSON's schema and the shared scoring of every system.

Everything here runs without pyspark except the one ``slow`` test, which skips (with the reason) when pyspark or
Java is missing: pyspark is only in requirements-bench-spark.txt, never a requirement of ``make test``.
mfutils.distributed is replaced by a stand-in that checks the arguments with the real parser and returns
results of the documented shape, so no torchrun group is started.
"""
from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from mfutils import bench
from mfutils.data import RatingData, random_split
from mfutils.models import BiasedMF
from mfutils.synthetic import synthetic
from mfutils.train import fit_als

TINY = ("--size", "60", "40", "800", "--rank", "3", "--epochs", "2", "--seed", "1")


@pytest.fixture
def no_pyspark(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyspark", None)  # import pyspark -> ImportError, installed or not


@pytest.fixture
def fake_launch(monkeypatch):
    """mfutils.distributed.launch without processes: checks its arguments, saves the factors, returns JSON."""
    from mfutils import distributed

    calls = []

    def launch(n_workers, args, *, timeout, omp_threads):
        parsed = distributed.build_parser().parse_args(list(args))  # the arguments its CLI really accepts
        calls.append({"n_workers": n_workers, "args": list(args), "omp_threads": omp_threads})
        data, _ = synthetic(*parsed.synthetic, seed=parsed.seed)
        train, test = random_split(data, parsed.test_frac, seed=parsed.seed)
        mu = 0.0 if parsed.no_mean else float(train.rating.mean())
        model = BiasedMF(train.n_users, train.n_items, parsed.rank, global_mean=mu, biases=not parsed.no_biases,
                         seed=parsed.seed)
        history = fit_als(model, train, val=test, reg=parsed.reg, n_epochs=parsed.epochs, device="cpu")
        torch.save(model.state_dict(), parsed.save_factors)
        return {"world_size": n_workers, "backend": "gloo", "device": "cpu",
                "data": {"n_users": train.n_users, "n_items": train.n_items, "n_train": train.n_ratings,
                         "n_test": test.n_ratings, "test_frac": parsed.test_frac, "seed": parsed.seed},
                "model": {"rank": parsed.rank, "reg": parsed.reg, "epochs": parsed.epochs,
                          "biases": not parsed.no_biases, "global_mean": mu},
                "sweeps": {"seconds": history.seconds}, "per_rank": {"compute_s": [[0.2, 0.1]] * n_workers,
                                                                     "comm_s": [[0.01, 0.03]] * n_workers},
                "final": {"train_rmse": history.train_rmse[-1], "test_rmse": history.val_rmse[-1]},
                "fit_seconds": sum(history.seconds), "wall_seconds": 3.0}

    monkeypatch.setattr(distributed, "launch", launch)
    return calls


# ---------------------------------------------------------------- bad arguments: one line, exit 2, nothing run

@pytest.mark.parametrize("args, message", [
    (("--rank", "0"), "--rank must be >= 1, got 0"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--cores", "-2"), "--cores must be >= 1"),
    (("--reg", "0"), "--reg must be > 0"),
    (("--reg", "nan"), "--reg must be > 0"),
    (("--test-frac", "1"), "--test-frac must be strictly between 0 and 1"),
    (("--seed", "-1"), "--seed must be >= 0 and < 2**63, got -1"),
    (("--seed", "9" * 20), "--seed must be >= 0 and < 2**63, got 99999999999999999999"),
    (("--size", "10", "10", "51"), "at most 50 ratings fit"),
    (("--size", "0", "10", "5"), "need at least 1 user"),
    (("--size", "10", "10"), "expected 3 arguments"),
    (("--rank", "two"), "invalid int value: 'two'"),
    (("--bogus",), "unrecognized arguments: --bogus"),
])
def test_bad_arguments_give_one_error_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_spark", lambda **kwargs: pytest.fail("ran despite bad arguments"))
    out = tmp_path / "spark_als.json"
    assert bench.main(["spark", *args, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("python -m mfutils.bench spark: error: ") and message in captured.err
    assert not out.exists()


# ---------------------------------------------------------------- Spark or Java missing: skipped, with the reason

def test_without_pyspark_the_json_says_why_and_how_to_install(no_pyspark, fake_launch, tmp_path, capsys):
    out = tmp_path / "results" / "spark_als.json"
    assert bench.main(["spark", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["spark"]) == ["skipped"]
    reason = result["spark"]["skipped"]
    assert "pyspark is not installed" in reason and "make bench-spark" in reason and "Java 17" in reason
    assert [r["threads"] for r in result["mfutils"]] == [2, 1] and "error" not in result["distributed"]
    assert [p.name for p in out.parent.iterdir()] == ["spark_als.json"]  # written atomically, no leftovers
    err = capsys.readouterr().err
    assert "spark: skipped: pyspark is not installed" in err and "mfutils 1 thread(s): fit" in err


def test_without_java_the_reason_names_java(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyspark", types.ModuleType("pyspark"))  # importable, whatever is installed
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))  # no bin/java there
    reason, java = bench._spark_unavailable()
    assert java is None and f"JAVA_HOME={tmp_path} has no bin/java" in reason and "make bench-spark" in reason


# ---------------------------------------------------------------- the JSON on a tiny size (no Spark)

def test_json_schema_on_a_tiny_size(no_pyspark, fake_launch):
    threads_before = torch.get_num_threads()
    result = bench.run_spark(size=(60, 40, 800), rank=3, reg=0.1, epochs=2, seed=1, test_frac=0.2, cores=2)
    assert torch.get_num_threads() == threads_before
    assert {"machine", "mfutils_version", "data", "settings", "objective", "protocol", "spark", "mfutils",
            "distributed", "load_average_before", "load_average_after", "wall_seconds"} <= result.keys()
    data = result["data"]
    assert (data["n_users"], data["n_items"], data["n_ratings"]) == (60, 40, 800)
    assert data["n_train"] + data["n_test"] == 800 and data["n_test"] == 160
    assert result["settings"] == {"rank": 3, "reg": 0.1, "epochs": 2, "seed": 1, "test_frac": 0.2, "cores": 2}
    assert "ALS-WR" in result["objective"] and "global_mean=0.0" in result["objective"]
    runs = result["mfutils"]
    assert [r["threads"] for r in runs] == [2, 1]
    for row in runs:
        assert row["fit_seconds_first"] > 0 and row["fit_seconds_warm"] > 0
        assert row["n_test_predicted"] + row["n_test_dropped"] == 160
        assert 0 < row["train_rmse"] and row["train_loss"] >= row["train_rmse"] ** 2 and row["test_rmse"] > 0
        assert "biases=False, global_mean=0.0" in row["model"]
    assert runs[0]["test_rmse"] == pytest.approx(runs[1]["test_rmse"], abs=1e-4)  # threads change sums' order only
    dist = result["distributed"]
    assert fake_launch == [{"n_workers": 2, "args": fake_launch[0]["args"], "omp_threads": 1}]
    args = fake_launch[0]["args"]
    assert args[:4] == ["--synthetic", "60", "40", "800"] and "--save-factors" in args
    assert "--no-biases" in args and "--no-mean" in args  # Spark's model: no biases, ratings not centred
    assert dist["same_split"] is True and dist["same_objective_as_spark"] is True and dist["note"] is None
    assert dist["fit_seconds_warm"] is None and dist["mean_comm_seconds_per_sweep"] == pytest.approx(0.02)
    # scored here from the saved factors: the same numbers the run itself reported
    assert dist["train_rmse"] == pytest.approx(dist["reported_final"]["train_rmse"], rel=1e-4)
    json.dumps(result)


def test_a_failed_distributed_run_is_recorded_and_the_command_exits_1(no_pyspark, monkeypatch, tmp_path, capsys):
    from mfutils import distributed

    def launch(*args, **kwargs):
        raise distributed.DistributedError("rank 1 of 2 failed: training failed: out of memory")

    monkeypatch.setattr(distributed, "launch", launch)
    out = tmp_path / "spark_als.json"
    assert bench.main(["spark", *TINY, "--out", str(out)]) == 1
    entry = json.loads(out.read_text())["distributed"]
    assert entry["error"] == "DistributedError: rank 1 of 2 failed: training failed: out of memory"
    assert "distributed failed" in capsys.readouterr().err


# ---------------------------------------------------------------- one scoring function for every system

def test_scores_equal_fit_als_own_loss_and_rmse():
    data, _ = synthetic(80, 50, 1200, seed=2)
    train, test = random_split(data, 0.2, seed=2)
    model = BiasedMF(train.n_users, train.n_items, 4, biases=False, global_mean=0.0, seed=2)
    history = fit_als(model, train, val=test, reg=0.1, n_epochs=3, device="cpu")
    scores = bench._als_scores(model.user_factors.weight, model.item_factors.weight, 0.0, train, test, 0.1)
    assert scores["train_loss"] == pytest.approx(history.train_loss[-1], rel=1e-5)  # fit_als minimises this L
    assert scores["train_rmse"] == pytest.approx(history.train_rmse[-1], rel=1e-5)
    if scores["n_test_dropped"] == 0:
        assert scores["test_rmse"] == pytest.approx(history.val_rmse[-1], rel=1e-5)


def test_scores_drop_test_rows_whose_user_or_item_has_no_training_rating():
    def ratings(u, i, r):
        return RatingData(user_idx=torch.tensor(u), item_idx=torch.tensor(i), rating=torch.tensor(r),
                          timestamp=torch.zeros(len(u), dtype=torch.int64), user_ids=np.arange(3),
                          item_ids=np.arange(3), name="toy")

    train = ratings([0, 0, 1], [0, 1, 1], [4.0, 2.0, 3.0])  # user 2 and item 2 have no training ratings
    test = ratings([1, 2, 0, 1], [0, 0, 2, 1], [5.0, 1.0, 3.0, 2.0])
    P, Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0], [7.0, 7.0]])
    scores = bench._als_scores(P, Q, 0.5, train, test, reg=0.1)
    assert (scores["n_test_predicted"], scores["n_test_dropped"]) == (2, 2)
    assert scores["test_rmse"] == pytest.approx(math.sqrt(((0.5 - 5.0) ** 2 + (1.5 - 2.0) ** 2) / 2))
    sse = (2.5 - 4.0) ** 2 + (1.5 - 2.0) ** 2 + (1.5 - 3.0) ** 2
    penalty = 2 * 1.0 + 1 * 1.0 + 1 * 4.0 + 2 * 2.0  # n_u |p_u|^2 and n_i |q_i|^2 over the rated rows only
    assert scores["train_loss"] == pytest.approx((sse + 0.1 * penalty) / 3)


# ---------------------------------------------------------------- Spark itself (slow; only where it is installed)

@pytest.mark.slow
def test_spark_als_reaches_the_objective_fit_als_reaches():
    reason, java = bench._spark_unavailable()  # pyspark is optional: requirements-bench-spark.txt only
    if reason is not None:
        pytest.skip(reason)
    result = bench.run_spark(size=(200, 120, 3000), rank=4, reg=0.1, epochs=5, seed=0, cores=2, distributed=False)
    spark, ours = result["spark"], result["mfutils"][0]
    assert "skipped" not in spark and "error" not in spark, spark
    assert spark["versions"]["pyspark"] == "4.3.0" and spark["versions"]["java"] == java
    assert spark["test_rmse_matches_evaluator"] and spark["evaluator_n_test_predicted"] == spark["n_test_predicted"]
    assert spark["n_test_dropped"] == ours["n_test_dropped"]  # coldStartStrategy="drop" drops the rows we skip
    assert 0 < spark["session_start_seconds"] and 0 < spark["fit_seconds_warm"]
    assert spark["train_loss"] == pytest.approx(ours["train_loss"], rel=0.1)  # the same L, other starting points
    assert 1 / 1.2 < spark["test_rmse"] / ours["test_rmse"] < 1.2
