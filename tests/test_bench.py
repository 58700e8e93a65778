"""bench: time_it's warm-up and median, machine_info, the article's baseline, and the fold benchmark's JSON."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from mfutils import bench, movielens
from mfutils.data import RatingData, random_split
from mfutils.synthetic import synthetic


def test_time_it_warms_up_then_returns_the_median(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # measured runs take 1, 3 and 2 seconds
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []
    assert bench.time_it(lambda: calls.append(1), warmup=2, repeats=3) == 2.0
    assert len(calls) == 5


def test_time_it_best_returns_the_fastest_run(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # runs of 1, 3 and 2 seconds; no warm-up
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    assert bench.time_it(lambda: None, warmup=0, repeats=3, best=True) == 1.0


def test_time_it_rejects_zero_repeats():
    with pytest.raises(ValueError, match=r"time_it\(\): need repeats >= 1 and warmup >= 0; got repeats=0"):
        bench.time_it(lambda: None, repeats=0)


def test_machine_info_names_the_machine():
    info = bench.machine_info()
    assert {"cpu", "memory_bytes", "torch_threads", "torch", "cuda", "date"} <= info.keys()
    assert info["memory_bytes"] is None or info["memory_bytes"] > 1 << 28  # more than 256 MiB where it is known
    assert info["torch"] == torch.__version__ and (info["cuda"] is None) == (not torch.cuda.is_available())
    json.dumps(info)


def test_copy_bandwidth_counts_the_bytes_read_and_written():
    copy = bench.copy_bandwidth(n_bytes=1 << 20, repeats=2)
    assert copy["bytes"] == 1 << 20 and copy["gb_per_s"] == pytest.approx(2 * (1 << 20) / copy["seconds"] / 1e9)


# ---------------------------------------------------------------- the article's regularized snippet

def _toy() -> RatingData:
    R = torch.tensor([[5, 3, 0, 1], [4, 0, 0, 1], [1, 1, 0, 5], [1, 0, 0, 4], [0, 1, 5, 4]], dtype=torch.float32)
    u, i = torch.nonzero(R, as_tuple=True)
    return RatingData(user_idx=u, item_idx=i, rating=R[u, i], timestamp=torch.zeros(len(u), dtype=torch.int64),
                      user_ids=np.arange(5), item_ids=np.arange(4), name="toy")


def test_article_baseline_reproduces_the_snippet_on_the_toy_matrix():
    toy = _toy()
    P, Q = bench.fit_article(toy)
    # The snippet's own steps on its 5x4 matrix: items as columns, nn.MSELoss over the nonzero cells,
    # lambda * (sum U^2 + sum V^2), plain SGD at lr 0.01 for 100 full-batch epochs (same starting draws).
    gen = torch.Generator().manual_seed(0)
    R = torch.zeros(5, 4)
    R[toy.user_idx, toy.item_idx] = toy.rating
    U = torch.randn(5, 2, generator=gen).requires_grad_()
    V = torch.randn(4, 2, generator=gen).T.contiguous().requires_grad_()  # (rank, n_items), as in the article
    opt = torch.optim.SGD([U, V], lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.MSELoss()((U @ V)[R != 0], R[R != 0]) + 0.1 * (torch.sum(U ** 2) + torch.sum(V ** 2))
        loss.backward()
        opt.step()
    assert_close(P, U.detach())
    assert_close(Q, V.detach().T)
    start = bench.fit_article(toy, n_epochs=0)
    observed = R != 0
    before, after = (((p @ q.T - R)[observed] ** 2).mean() for p, q in (start, (P, Q)))
    assert after < before and (P @ Q.T)[observed].mean() < R[observed].mean()  # 100 small steps: still far off


# ---------------------------------------------------------------- the fold benchmark, on tiny folds

@pytest.fixture
def tiny_folds(monkeypatch):
    """load_ml100k_fold returns 480/120-rating splits of a small synthetic set: the benchmark runs in ms."""
    data, _ = synthetic(50, 40, 600, n_factors=2, seed=0)
    monkeypatch.setattr(movielens, "load_ml100k_fold", lambda k, progress=False: random_split(data, 0.2, seed=k))
    monkeypatch.setitem(sys.modules, "surprise", None)  # import surprise -> ImportError


def test_folds_json_keeps_unavailable_peers_with_their_reasons(tiny_folds):
    result = bench.run_folds(folds=(1, 2), repeats=1, lenskit_python=None, extras=False)
    methods = result["methods"]
    assert list(methods) == list(bench.METHODS) and result["machine"]["torch_threads"] == 1
    for name in ("surprise_svd", "surprise_svdpp"):
        assert methods[name]["available"] is False and "surprise" in methods[name]["reason"]
    assert methods["lenskit_biased_mf"]["available"] is False
    reason = methods["lenskit_biased_mf"]["reason"]
    assert "pandas" in reason and "--lenskit-python" in reason
    for name in ("ours", "article"):
        entry = methods[name]
        assert entry["available"] and entry["speedup_vs_surprise_svd"] is None and entry["repeats"] == 1
        assert [f["fold"] for f in entry["folds"]] == [1, 2]
        for fold in entry["folds"]:
            assert fold["seconds"] == pytest.approx(fold["fit_seconds"] + fold["predict_seconds"])
        assert entry["mean"]["rmse"] == pytest.approx(statistics.fmean(f["rmse"] for f in entry["folds"]))
    assert methods["ours"]["settings"]["method"] == "bpmf" and methods["ours"]["mean"]["rmse"] < 1.0
    assert result["fastest"] in ("ours", "article") and methods["article"]["mean"]["rmse"] > 2.0
    json.dumps(result)


def test_folds_json_says_when_the_lenskit_interpreter_is_missing(tiny_folds, tmp_path):
    result = bench.run_folds(folds=(1,), repeats=1, lenskit_python=str(tmp_path / "python"),
                             methods=("lenskit_biased_mf",), extras=False)
    entry = result["methods"]["lenskit_biased_mf"]
    assert entry == {"label": "LensKit biased MF (ALS)", "available": False,
                     "reason": f"--lenskit-python {tmp_path / 'python'} is not an executable file; "
                               f"`make bench` creates it"}
    assert result["fastest"] is None


def test_roofline_turns_sweep_time_into_bytes_per_second():
    data, _ = synthetic(50, 40, 600, n_factors=2, seed=0)
    roof = bench._roofline(data, {"gb_per_s": 10.0}, repeats=1)
    k1 = roof["rank"] + 1
    assert roof["bytes_per_rating_per_sweep"] == 2 * (2 * (4 + 4) + 4 * (k1 * (k1 + 1) // 2 + 2 * k1))
    assert roof["ratings_per_second"] == pytest.approx(600 / roof["sweep_seconds"])
    rate, per_rating = roof["ratings_per_second"], roof["bytes_per_rating_per_sweep"]
    assert roof["achieved_gb_per_s"] == pytest.approx(rate * per_rating / 1e9)
    assert roof["fraction_of_copy"] == pytest.approx(roof["achieved_gb_per_s"] / 10.0)


def test_folds_command_writes_the_json_atomically(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_folds", lambda **kwargs: {"methods": {
        "ours": {"available": True, "mean": {"rmse": 0.9, "mae": 0.7, "seconds": 0.05},
                 "speedup_vs_surprise_svd": 8.0},
        "surprise_svd": {"available": True, "mean": {"rmse": 0.94, "mae": 0.74, "seconds": 0.4},
                         "speedup_vs_surprise_svd": 1.0},
        "lenskit_biased_mf": {"available": False, "reason": "not installed"}}, "kwargs": kwargs})
    out = tmp_path / "results" / "folds.json"
    assert bench.main(["folds", "--repeats", "1", "--threads", "2", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["methods"]["surprise_svd"]["mean"]["rmse"] == 0.94
    assert written["kwargs"] == {"repeats": 1, "threads": 2, "lenskit_python": None}
    assert [p.name for p in out.parent.iterdir()] == ["folds.json"]
    err = capsys.readouterr().err
    assert "surprise_svd: RMSE 0.9400" in err and "8.00x Surprise SVD" in err
    assert "lenskit_biased_mf: not available: not installed" in err


# ---------------------------------------------------------------- real data (slow)

@pytest.mark.slow
def test_ml100k_u1_default_beats_surprise_and_the_article_matches_chapter_4():
    result = bench.run_folds(folds=(1,), repeats=1, methods=("ours", "article"), extras=False)
    ours, article = result["methods"]["ours"], result["methods"]["article"]
    assert ours["mean"]["rmse"] < 0.92 and ours["settings"]["method"] == "bpmf"  # Surprise SVD: 0.951 on u1
    assert article["mean"]["rmse"] == pytest.approx(3.8272, abs=1e-4)  # chapter 4's u1 number


@pytest.mark.slow
def test_a_lenskit_worker_that_cannot_import_lenskit_is_recorded(tiny_folds):
    result = bench.run_folds(folds=(1,), repeats=1, lenskit_python=sys.executable,
                             methods=("lenskit_biased_mf",), extras=False)
    entry = result["methods"]["lenskit_biased_mf"]
    assert entry["available"] is False and "ModuleNotFoundError: No module named 'lenskit'" in entry["reason"]


def test_the_lenskit_worker_runs_where_mfutils_cannot_be_imported(tmp_path):
    # LensKit's interpreter runs this file alone (python -I bench.py lenskit-worker FOLDER): the worker must reach
    # its own imports without importing mfutils. Here both are made unimportable, so it stops at LensKit.
    (tmp_path / "spec.json").write_text('{"folds": [1], "repeats": 1}')
    script = ("import runpy, sys; sys.modules['mfutils'] = sys.modules['lenskit'] = None; "
              f"sys.argv = ['bench.py', 'lenskit-worker', {str(tmp_path)!r}]; "
              f"runpy.run_path({bench.__file__!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "ModuleNotFoundError" in last and "lenskit" in last and "mfutils" not in last


@pytest.mark.slow
def test_default_beats_the_bias_only_baseline_on_other_data():
    for row in bench._other_data():
        assert row["rmse"] < row["bias_only_rmse"] < row["global_mean_rmse"]


# ---------------------------------------------------------------- devices: epoch time vs the bandwidth bound

def test_bytes_model_counts_streamed_and_gathered_bytes_per_rating():
    sgd = bench.bytes_per_epoch("sgd", n_ratings=1000, n_users=10, n_items=20, rank=64)
    assert sgd["bytes"] == 1000 * (28 + 3 * 4 * (2 * 64 + 2)) and sgd["bytes_per_rating"] == 1588.0
    assert sgd["flops"] is None and bench.bytes_per_epoch("adam", n_ratings=1000, n_users=10, n_items=20,
                                                          rank=64)["bytes"] == sgd["bytes"]
    als = bench.bytes_per_epoch("als", n_ratings=1000, n_users=10, n_items=20, rank=2)
    assert als["bytes"] == 2 * 48 * 1000 + 2 * 4 * 3 * (10 + 20)
    assert als["flops"] == 4 * 1000 * 9 + 30 * 27 // 3 and als["bytes_per_rating"] == als["bytes"] / 1000
    with pytest.raises(ValueError, match=r"bytes_per_epoch\(\): path must be one of \['adam', 'als', 'fused', 'sgd'\]"):
        bench.bytes_per_epoch("lbfgs", n_ratings=1, n_users=1, n_items=1, rank=1)


def test_devices_json_has_one_row_per_configuration_with_its_bound_and_memory():
    result = bench.run_devices("cpu", grid=(("tiny", (3,)),), shapes={"tiny": (40, 30, 300), "small": (50, 40, 500)},
                               paths=("sgd", "als"), threads=1, batch_series=("small", 2, (64, 1024)))
    assert result["device"] == "cpu" and result["torch_threads"] == 1 and result["machine"]["cuda"] is None
    assert result["copy"]["gb_per_s"] > 0 and set(result["bytes_models"]) == {"sgd", "fused", "adam", "als"}
    roofs = result["roof_measurements"]  # before the first configuration and after the last; the faster counts
    assert len(roofs) == 2 and result["copy"]["gb_per_s"] == max(r["copy"]["gb_per_s"] for r in roofs)
    assert result["matmul"]["gflop_per_s"] == max(r["matmul"]["gflop_per_s"] for r in roofs)
    assert [(r["size"], r["rank"], r["path"]) for r in result["runs"]] == [("tiny", 3, "sgd"), ("tiny", 3, "als")]
    for row in result["runs"]:
        assert "error" not in row and row["torch_threads"] == 1 and row["n_ratings"] == 300
        assert len(row["all_epoch_seconds"]) == 2 and row["epoch_seconds"] == row["all_epoch_seconds"][1]
        assert row["memory_bound_seconds"] == pytest.approx(row["bytes"] / (result["copy"]["gb_per_s"] * 1e9))
        assert row["compute_bound_seconds"] == (pytest.approx(row["flops"] / (result["matmul"]["gflop_per_s"] * 1e9))
                                                if row["path"] == "als" else 0.0)
        assert row["bound_seconds"] == max(row["memory_bound_seconds"], row["compute_bound_seconds"])
        assert row["ratio"] == pytest.approx(row["epoch_seconds"] / row["bound_seconds"])
        assert 0 < row["baseline_rss_bytes"] <= row["data_rss_bytes"] <= row["peak_rss_bytes"] < 4e9
    assert [(r["size"], r["path"], r["batch_size"]) for r in result["batch_runs"]] == [
        ("small", "sgd", 64), ("small", "sgd", 1024)]
    assert all(r["n_ratings"] == 500 and r["rank"] == 2 and "epoch_seconds" in r for r in result["batch_runs"])
    assert result["precision_runs"] == [] and "transfer" not in result and "timing_demo" not in result
    assert result["targets"] == {"at": "ml-20m, rank 64", "max_ratio": 3.0, "max_peak_rss_bytes": 6e9}
    json.dumps(result)


def test_one_configuration_runs_in_bfloat16_and_reports_held_out_rmse(tmp_path):
    data, _ = synthetic(60, 40, 600, seed=1)
    file = tmp_path / "tiny.pt"
    torch.save({"user_idx": data.user_idx, "item_idx": data.item_idx, "rating": data.rating,
                "n_users": data.n_users, "n_items": data.n_items, "name": "tiny"}, file)
    fp32 = bench._one(str(file), "sgd", 4, "cpu", 128, 1, 2, "fp32", 0.1)
    bf16 = bench._one(str(file), "sgd", 4, "cpu", 128, 1, 2, "bf16", 0.1)
    for row in (fp32, bf16):
        assert len(row["all_epoch_seconds"]) == 3 and 0.5 < row["val_rmse"] < 2.0
    assert bf16["val_rmse"] != fp32["val_rmse"]  # the tables really were rounded to bfloat16
    assert abs(bf16["val_rmse"] - fp32["val_rmse"]) < 0.05


@pytest.mark.parametrize("path, precision, message", [
    ("als", "bf16", "ALS's Cholesky factorisation needs float32"),
    ("sgd", "tf32", "NVIDIA GPUs only"),
    ("sgd", "fp16", "precision must be one of"),
])
def test_precisions_that_cannot_apply_are_refused_with_the_reason(path, precision, message):
    with pytest.raises(ValueError, match=message):
        bench._set_precision(precision, path, torch.device("cpu"))


def test_timing_demo_reports_first_unsynchronised_and_synchronised_times():
    demo = bench.timing_demo(torch.device("cpu"), n=64, calls=3)
    assert demo["flops"] == 2 * 64 ** 3 * 3
    assert all(demo[k] > 0 for k in ("cold_seconds", "no_sync_seconds", "synced_seconds"))


def test_device_targets_take_the_fastest_sgd_type_path_at_ml20m_rank_64():
    rows = [{"size": "ml-20m", "rank": 64, "path": p, "epoch_seconds": s, "ratio": q, "peak_rss_bytes": m}
            for p, s, q, m in (("sgd", 10.0, 2.5, 3e9), ("adam", 20.0, 5.0, 4e9), ("als", 60.0, 4.0, 7e9))]
    targets = bench._device_targets(rows + [{"size": "ml-1m", "rank": 64, "path": "als", "epoch_seconds": 1.0,
                                             "ratio": 1.0, "peak_rss_bytes": 1e9}])
    assert targets["fastest_sgd_path"] == "sgd" and targets["sgd_ratio"] == 2.5 and targets["sgd_met"] is True
    assert targets["als_ratio"] == 4.0 and targets["als_met"] is False and targets["memory_met"] is False
    gpu = bench._device_targets([{**r, "epoch_seconds": r["epoch_seconds"] / 400, "peak_device_bytes": 1e9}
                                 for r in rows], cuda=True)
    assert gpu == {"at": "ml-20m, rank 64", "max_epoch_seconds": 0.05, "fastest_sgd_path": "sgd",
                   "sgd_epoch_seconds": 0.025, "sgd_met": True,
                   "peak_device_bytes": {"sgd": 1e9, "adam": 1e9, "als": 1e9}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_devices_command_says_in_one_line_that_cuda_is_missing(tmp_path, capsys):
    out = tmp_path / "devices_cuda.json"
    assert bench.main(["devices", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err and "NVIDIA GPU" in err
    assert not out.exists()


def test_devices_command_rejects_bad_arguments_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_devices", lambda *a, **k: pytest.fail("the sweep must not start"))
    for argv, message in ((["--threads", "0"], "argument --threads: must be >= 1, got '0'"),
                          (["--repeats", "-1"], "argument --repeats: must be >= 1, got '-1'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["devices", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert bench.main(["devices", "--device", "gpu"]) == 2
    assert "--device gpu: not a device name; use cpu or cuda" in capsys.readouterr().err


def test_devices_command_writes_the_json_atomically_after_every_configuration(tmp_path, monkeypatch):
    seen = []

    def fake(device, checkpoint, **kwargs):
        checkpoint({"runs": [1], "complete": False})
        seen.append(json.loads(out.read_text()))  # the partial results are on disk while the sweep goes on
        return {"device": device, "kwargs": kwargs, "complete": True}

    monkeypatch.setattr(bench, "run_devices", fake)
    out = tmp_path / "results" / "devices_cpu.json"
    assert bench.main(["devices", "--device", "cpu", "--threads", "2", "--out", str(out)]) == 0
    assert seen == [{"runs": [1], "complete": False}]
    assert json.loads(out.read_text()) == {"device": "cpu", "kwargs": {"threads": 2, "repeats": 3},  # 3: the default
                                           "complete": True}
    assert [p.name for p in out.parent.iterdir()] == ["devices_cpu.json"]


TINY_SWEEP = {"grid": (("tiny", (3,)),), "shapes": {"tiny": (40, 30, 300)}, "paths": ("sgd", "als"), "threads": 1,
              "batch_series": None}


def test_an_unfinished_sweep_resumes_without_running_its_finished_configurations():
    partials = []
    first = bench.run_devices("cpu", **TINY_SWEEP, checkpoint=lambda r: partials.append(json.loads(json.dumps(r))))
    assert [len(p["runs"]) for p in partials] == [1, 2] and not any(p["complete"] for p in partials)
    assert first["complete"] is True
    resumed = bench.run_devices("cpu", **TINY_SWEEP, resume=partials[0])
    assert resumed["complete"] is True and [r["path"] for r in resumed["runs"]] == ["sgd", "als"]
    assert resumed["runs"][0]["all_epoch_seconds"] == partials[0]["runs"][0]["all_epoch_seconds"]  # not run again
    assert resumed["runs"][1]["all_epoch_seconds"] != first["runs"][1]["all_epoch_seconds"]  # run now
    assert resumed["roof_measurements"][0] == partials[0]["roof_measurements"][0]  # the first run's "before"
    assert "ratio" in resumed["runs"][0] and "ratio" in resumed["runs"][1]
    with pytest.raises(ValueError, match="resume: that results file is a finished sweep"):
        bench.run_devices("cpu", **TINY_SWEEP, resume=first)
    with pytest.raises(ValueError, match="resume: that sweep differs in torch_threads, machine.cpu"):
        other = {**partials[0], "torch_threads": 7, "machine": {**partials[0]["machine"], "cpu": "another"}}
        bench.run_devices("cpu", **TINY_SWEEP, resume=other)


def test_configurations_reach_the_children_grouped_by_kind_and_data_set(monkeypatch):
    calls = []

    def fake_children(file, configs, device, threads):
        calls.append((os.path.basename(file), [(c["path"], c["batch_size"], c["precision"]) for c in configs]))
        return [{"epoch_seconds": 1.0, "all_epoch_seconds": [1.0], "peak_rss_bytes": 1} for _ in configs]

    monkeypatch.setattr(bench, "_children", fake_children)
    shapes = {"a": (30, 20, 100), "b": (40, 30, 300)}
    result = bench.run_devices("cpu", grid=(("a", (2,)), ("b", (2,))), shapes=shapes, paths=("fused", "als"),
                               threads=1, batch_series=("a", 2, (16, 32)), precision_series=(("fused", "fp32"),))
    assert calls == [("a.pt", [("fused", 32768, "fp32"), ("als", 32768, "fp32")]),  # the grid at each size
                     ("b.pt", [("fused", 32768, "fp32"), ("als", 32768, "fp32")]),
                     ("a.pt", [("fused", 16, "fp32"), ("fused", 32, "fp32")]),  # the batch series
                     ("b.pt", [("fused", 32768, "fp32")])]  # the precision series, at the largest size
    assert [len(result[k]) for k in ("runs", "batch_runs", "precision_runs")] == [4, 2, 1]
    partial = {**result, "complete": False, "runs": result["runs"][:3], "batch_runs": [],  # cut short during
               "precision_runs": []}  # the second size's ALS
    calls.clear()
    bench.run_devices("cpu", grid=(("a", (2,)), ("b", (2,))), shapes=shapes, paths=("fused", "als"), threads=1,
                      batch_series=("a", 2, (16, 32)), precision_series=(("fused", "fp32"),), resume=partial)
    assert calls == [("b.pt", [("als", 32768, "fp32")]), ("a.pt", [("fused", 16, "fp32"), ("fused", 32, "fp32")]),
                     ("b.pt", [("fused", 32768, "fp32")])]


def test_a_child_runs_configurations_in_turn_and_records_a_failure_without_stopping(tmp_path, capsys):
    data, _ = synthetic(40, 30, 300, seed=1)
    file = tmp_path / "tiny.pt"
    torch.save({"user_idx": data.user_idx, "item_idx": data.item_idx, "rating": data.rating,
                "n_users": data.n_users, "n_items": data.n_items, "name": "tiny"}, file)
    config = {"path": "fused", "rank": 3, "batch_size": 64, "warmup": 1, "repeats": 1}
    bench._many(str(file), [config, {**config, "precision": "tf32"}, config], "cpu")
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and "epoch_seconds" in rows[0] and "epoch_seconds" in rows[2]
    assert rows[1] == {"error": "ValueError: precision 'tf32' exists on NVIDIA GPUs only; use fp32 on the CPU"}
    assert rows[0]["train_rmse"] == rows[2]["train_rmse"]  # the same data, loaded once, trains alike


def test_configurations_can_share_one_child_and_each_reports_its_own_peak(tmp_path):
    data, _ = synthetic(40, 30, 300, seed=1)
    file = tmp_path / "tiny.pt"
    torch.save({"user_idx": data.user_idx, "item_idx": data.item_idx, "rating": data.rating,
                "n_users": data.n_users, "n_items": data.n_items, "name": "tiny"}, file)
    big = {"path": "adam", "rank": 50000, "batch_size": 64, "warmup": 1, "repeats": 1}
    small = {"path": "als", "rank": 2, "batch_size": 64, "warmup": 1, "repeats": 1}
    rows = list(bench._children(str(file), [big, small], torch.device("cpu"), 1, shared=True))
    assert all("epoch_seconds" in r for r in rows), rows
    assert rows[0]["data_rss_bytes"] == rows[1]["data_rss_bytes"]  # one process, the data loaded once
    if sys.platform == "linux":  # the child reset its recorded peak between the two (test_the_peak_...)
        assert "peak_rss_note" not in rows[1]


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's")
def test_the_peak_resident_memory_can_be_reset_to_the_present():
    big = torch.ones(100_000_000)  # 400 MB, every page touched
    peak = bench._max_rss_bytes()
    del big  # a large block goes back to the system at once
    assert bench._reset_peak_rss() is True
    assert bench._max_rss_bytes() < peak - 300e6


def test_a_child_that_takes_too_long_is_killed_and_its_configurations_say_so(tmp_path):
    config = {"path": "sgd", "rank": 3, "batch_size": 64, "warmup": 1, "repeats": 1, "precision": "fp32",
              "val_frac": 0.0}
    start = time.perf_counter()
    rows = list(bench._children(str(tmp_path / "never-read.pt"), [config, config], torch.device("cpu"), 1,
                                timeout=0.2))  # starting Python and torch alone takes longer
    assert rows == [{"error": "no result within 0.2 s"}] * 2 and time.perf_counter() - start < 30


def test_a_child_that_fails_reports_its_last_error_line(tmp_path):
    config = {"path": "sgd", "rank": 3, "batch_size": 64, "warmup": 1, "repeats": 1}
    rows = list(bench._children(str(tmp_path / "missing.pt"), [config], torch.device("cpu"), 1))
    assert len(rows) == 1 and rows[0]["error"].startswith("FileNotFoundError")


def test_devices_command_refuses_an_unreadable_resume_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_devices", lambda *a, **k: pytest.fail("the sweep must not start"))
    (tmp_path / "bad.json").write_text("{")
    for name in ("missing.json", "bad.json"):
        assert bench.main(["devices", "--resume", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"python -m mfutils.bench devices: error: --resume ")


def test_run_phases_splits_each_timed_epoch_into_its_phases_and_the_rest(monkeypatch):
    threads: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)  # record the thread counts, change nothing
    monkeypatch.setattr(torch, "get_num_threads", lambda: 5)
    result = bench.run_phases(size="tiny", shapes={"tiny": (40, 30, 300), "small": (20, 10, 100)}, rank=3,
                              batch_size=32, warmup=1, repeats=2, threads=1, batch_series=("small", 2, (16, 64)))
    assert threads == [1, 5]  # the run's thread count, then the caller's again
    assert (result["n_users"], result["n_items"], result["n_ratings"], result["torch_threads"]) == (40, 30, 300, 1)
    assert [p["path"] for p in result["paths"]] == ["fused", "als"]
    assert {"gb_per_s", "seconds"} <= set(result["copy"]) and result["matmul"]["gflop_per_s"] > 0
    expected = {"fused": {"permutation", "gather records", "gather rows", "arithmetic", "scatter-add", "rest"},
                "als": {"targets", "gather rows", "products", "factorization", "solves", "loss", "rest"}}
    for path in result["paths"]:
        assert len(path["epochs"]) == 2 and set(path["mean_phases"]) == expected[path["path"]]
        for epoch in path["epochs"]:  # each epoch's phases (the warm-up's excluded) add up to its seconds
            assert set(epoch["phases"]) == expected[path["path"]]
            assert math.isclose(sum(epoch["phases"].values()), epoch["seconds"], rel_tol=1e-9)
            assert epoch["phases"]["rest"] > -1e-9 and all(v > 0 for k, v in epoch["phases"].items() if k != "rest")
        assert math.isclose(path["mean_seconds"], statistics.fmean(e["seconds"] for e in path["epochs"]))
    series = result["batch_series"]
    assert (series["size"], series["rank"], series["n_ratings"]) == ("small", 2, 100)
    assert [(r["path"], r["batch_size"], len(r["epochs"])) for r in series["runs"]] == [("fused", 16, 2),
                                                                                       ("fused", 64, 2)]
    assert all(set(r["mean_phases"]) == expected["fused"] for r in series["runs"])


@pytest.mark.parametrize("command", ["folds", "devices", "phases"])
def test_an_out_path_that_cannot_take_the_results_stops_the_command_before_it_runs(command, tmp_path, capsys,
                                                                                     monkeypatch):
    for runner in ("run_folds", "run_devices", "run_phases"):
        monkeypatch.setattr(bench, runner, lambda *a, **k: pytest.fail("the run must not start"))
    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path, "does not name a file; name one, e.g. --out book/results/"),
                         (tmp_path / "file" / "x.json", f"cannot write in {tmp_path / 'file'} (")):
        assert bench.main([command, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"python -m mfutils.bench {command}: error: --out ") and message in err
        assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_phases_command_rejects_bad_arguments_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mfutils.synthetic.synthetic", lambda *a, **k: pytest.fail("nothing must run"))
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--size", "ml-2m"], "--size ml-2m: not a known size; use one of ml-100k, ml-1m"),
                          (["--out", str(tmp_path)], "does not name a file; name one, e.g. --out book/results/"),
                          (["--out", str(tmp_path / "file" / "x.json")], "cannot write in")):
        assert bench.main(["phases", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["phases", "--rank", "0"])
    assert exit_info.value.code == 2 and "argument --rank: must be >= 1, got '0'" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[1]


def _processes_mentioning(text: str) -> dict[str, str]:
    """Process id -> command line, for this machine's processes whose command line contains ``text`` (/proc)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                line = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found[entry] = line
    return found


def _sigterm_blocked(text: str) -> bool | None:
    """Whether a process whose command line contains ``text`` blocks SIGTERM (None: none found)."""
    for pid in _processes_mentioning(text):
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as f:
                mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
        except (OSError, StopIteration):
            continue
        return bool(mask >> (15 - 1) & 1)  # SIGTERM is signal 15: bit 14
    return None


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process table from /proc (Linux)")
@pytest.mark.parametrize("delay", [0.0, 1.0])  # at once, as the child starts (the racy moment), and later
def test_sigterm_stops_the_devices_children_and_removes_the_temporary_folder(tmp_path, delay):
    """``kill`` or ``timeout`` sends SIGTERM to the parent only: it must stop its child and clean up, like Ctrl-C."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "mfutils.bench", "devices", "--out", str(tmp_path / "d.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _processes_mentioning(f"_many {scratch}") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert _processes_mentioning(f"_many {scratch}"), "no child process started"
        if delay:
            time.sleep(delay)
            # the parent holds SIGTERM while it starts a child; the child itself must not keep it held
            while _sigterm_blocked(f"_many {scratch}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _sigterm_blocked(f"_many {scratch}") in (False, None)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("python -m mfutils.bench: interrupted")
    assert "Traceback" not in err
    assert _processes_mentioning(str(scratch)) == {} and list(scratch.iterdir()) == []


def test_the_child_watchdog_never_holds_the_interpreters_exit():
    """An interruption can leave a watchdog timer running; as a daemon thread it cannot keep a stopped sweep alive."""
    fired = []
    timer = bench._watchdog(0.05, lambda: fired.append(True))
    assert timer.daemon and timer.is_alive()
    timer.join(5)
    assert fired == [True]
    timer = bench._watchdog(60, lambda: fired.append(False))
    timer.cancel()
    timer.join(5)
    assert not timer.is_alive() and fired == [True]
