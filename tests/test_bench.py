"""bench: time_it's warm-up and median, machine_info, and the fold benchmark's JSON."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from mfutils import bench


def test_time_it_warms_up_then_returns_the_median(monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # measured runs take 1, 3 and 2 seconds
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []
    assert bench.time_it(lambda: calls.append(1), warmup=2, repeats=3) == 2.0
    assert len(calls) == 5


def test_time_it_rejects_zero_repeats():
    with pytest.raises(ValueError, match=r"time_it\(\): need repeats >= 1 and warmup >= 0; got repeats=0"):
        bench.time_it(lambda: None, repeats=0)


def test_machine_info_names_the_machine():
    info = bench.machine_info()
    assert {"cpu", "torch_threads", "torch", "cuda", "date"} <= info.keys()
    assert info["torch"] == torch.__version__ and (info["cuda"] is None) == (not torch.cuda.is_available())
    json.dumps(info)


@pytest.mark.slow
def test_folds_json_records_a_missing_surprise(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "surprise", None)  # import surprise -> ImportError
    result = bench.run_folds(folds=(1,), repeats=1)
    assert result["surprise_svd"]["available"] is False and "surprise" in result["surprise_svd"]["reason"]
    fold = result["ours"]["folds"][0]
    assert fold["rmse"] < 0.938 and fold["seconds"] == pytest.approx(fold["fit_seconds"] + fold["predict_seconds"])
    assert result["ours"]["settings"]["method"] == "bpmf"


def test_folds_command_writes_the_json_atomically(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "run_folds", lambda repeats: {
        "ours": {"mean": {"rmse": 0.9, "mae": 0.7, "seconds": 0.2}},
        "surprise_svd": {"available": True, "mean": {"rmse": 0.94, "mae": 0.74, "seconds": 0.4}}})
    out = tmp_path / "results" / "folds.json"
    assert bench.main(["folds", "--repeats", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["surprise_svd"]["mean"]["rmse"] == 0.94
    assert [p.name for p in out.parent.iterdir()] == ["folds.json"]
    assert "surprise_svd: RMSE 0.9400" in capsys.readouterr().err
