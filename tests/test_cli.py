"""``python -m mfutils train``: formats, the JSON contract, predictions, unknown ids, duplicates, bad input."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mfutils import cli

ROOT = Path(__file__).resolve().parents[1]
JSON_KEYS = {"rmse", "mae", "n_train", "n_test", "fit_seconds", "method", "rank"}


def _rows(n_users: int = 12, n_items: int = 9, n: int = 70, seed: int = 0, half_stars: bool = False):
    """Distinct (user, item) rows with string ids, ratings on a star scale and timestamps."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(n_users * n_items, size=n, replace=False)
    step = 0.5 if half_stars else 1.0
    rating = np.clip(np.round((3 + (pairs % n_users) / n_users + rng.normal(0, 0.7, n)) / step) * step, 1, 5)
    return pd.DataFrame({"user": [f"u{p // n_items}" for p in pairs], "item": [f"i{p % n_items}" for p in pairs],
                         "rating": rating, "ts": 1_000_000 + np.arange(n)})


def _write(path: Path, frame: pd.DataFrame, fmt: str) -> Path:
    if fmt == "csv":
        frame.to_csv(path, index=False, header=["userId", "movieId", "rating", "timestamp"])
    elif fmt == "tab":
        frame.to_csv(path, index=False, header=False, sep="\t")
    elif fmt == "colons":
        path.write_text("".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in frame.itertuples(index=False)))
    else:  # spaces, no timestamp
        path.write_text("".join(f"{u} {i} {r:g}\n" for u, i, r, _ in frame.itertuples(index=False)))
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _result(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _subprocess(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mfutils", *argv], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


# ---------------------------------------------------------------- formats and parsing

@pytest.mark.parametrize("fmt", ["csv", "tab", "colons", "spaces"])
def test_each_format_parses_to_the_same_ratings(tmp_path, fmt):
    frame = _rows(half_stars=True)
    table = cli.read_ratings(str(_write(tmp_path / f"r.{fmt}", frame, fmt)))
    assert list(table.user) == list(frame.user) and list(table.item) == list(frame.item)
    np.testing.assert_array_equal(table.rating, frame.rating)
    assert (table.timestamp is None) == (fmt == "spaces")
    assert table.line[0] == (2 if fmt == "csv" else 1) and len(table.line) == len(frame)


@pytest.mark.parametrize("fmt", ["csv", "tab", "colons"])
def test_each_format_trains_and_scores(tmp_path, capsys, fmt):
    path = _write(tmp_path / f"r.{fmt}", _rows(), fmt)
    code, out, err = _run(capsys, "train", str(path), "--json")
    assert code == 0 and err == "" and "RMSE" in out
    assert _result(out)["n_train"] + _result(out)["n_test"] == 70


def test_ids_are_tokens_not_numbers(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("007\tA\t4\n7\tA\t2\n007\tB\t5\n")
    table = cli.read_ratings(str(path))
    data = cli.to_rating_data(table)
    assert list(data.user_ids) == ["007", "7"] and list(data.item_ids) == ["A", "B"]
    assert data.user_idx.tolist() == [0, 1, 0] and data.rating.dtype == torch.float32


def test_extra_columns_are_ignored(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("1\t2\t4\n1\t3\t5\t7\tx\n")
    table = cli.read_ratings(str(path))
    assert table.rating.tolist() == [4.0, 5.0] and table.timestamp is None


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("1\t1\t4\n\n2\t1\t3\n")
    assert cli.read_ratings(str(path)).line.tolist() == [1, 3]


# ---------------------------------------------------------------- the JSON contract and predictions

def test_json_is_the_last_line_with_finite_values(tmp_path, capsys):
    path = _write(tmp_path / "r.csv", _rows(half_stars=True), "csv")
    code, out, _ = _run(capsys, "train", str(path), "--json", "--test-frac", "0.25", "--seed", "3")
    result = _result(out)
    assert code == 0 and JSON_KEYS <= result.keys()
    assert all(math.isfinite(result[k]) for k in ("rmse", "mae", "fit_seconds"))
    assert (result["method"], result["rank"], result["n_test"], result["n_train"]) == (
        "bpmf", cli.DEFAULTS["bpmf"]["rank"], 18, 52)
    assert result["rating_range"][0] >= 1.0 and result["rating_range"][1] <= 5.0


def test_fit_predict_names_the_methods_it_knows():
    table = cli.RatingsTable(np.array(["a", "b"], dtype=object), np.array(["x", "y"], dtype=object),
                             np.array([4.0, 3.0]), None, np.array([1, 2]), "r.csv")
    with pytest.raises(ValueError, match=r"fit_predict\(\): method must be one of \['adam', 'als', 'bpmf', 'sgd'\]; "
                                         r"got 'SGD'"):
        cli.fit_predict(table, table, method="SGD")


@pytest.mark.parametrize("method", ["als", "sgd", "adam"])
def test_other_methods_run_and_report_their_settings(tmp_path, capsys, method):
    path = _write(tmp_path / "r.tsv", _rows(), "tab")
    code, out, _ = _run(capsys, "train", str(path), "--method", method, "--epochs", "3", "--rank", "4", "--json")
    result = _result(out)
    assert code == 0 and (result["method"], result["rank"], result["epochs"]) == (method, 4, 3)
    assert result["reg"] == cli.DEFAULTS[method]["reg"]


def test_predictions_file_has_one_row_per_test_row_and_cold_start_rows_are_finite_and_clipped(tmp_path, capsys):
    train = _rows(half_stars=True)
    test = pd.DataFrame({"user": ["u0", "newbie", "u1", "newbie", "u0"], "item": ["i1", "i2", "unseen", "gone", "i1"],
                         "rating": [4.0, 3.5, 2.0, 1.0, 5.0], "ts": [0] * 5})
    train_path, test_path = _write(tmp_path / "train.csv", train, "csv"), _write(tmp_path / "test.csv", test, "csv")
    out_path = tmp_path / "pred.csv"
    code, out, _ = _run(capsys, "train", str(train_path), "--test", str(test_path), "--predictions",
                        str(out_path), "--json")
    pred = pd.read_csv(out_path, dtype={"user": str, "item": str})
    assert code == 0 and list(pred.columns) == ["user", "item", "prediction"]
    assert pred[["user", "item"]].values.tolist() == test[["user", "item"]].values.tolist()  # duplicates kept
    low, high = train.rating.min(), train.rating.max()
    assert pred.prediction.between(low, high).all() and np.isfinite(pred.prediction).all()
    assert _result(out)["n_test_unknown"] == 3 and _result(out)["n_test"] == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".mfutils-")] == []


def test_a_failed_predictions_write_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    path = _write(tmp_path / "r.tsv", _rows(), "tab")
    monkeypatch.setattr(pd.DataFrame, "to_csv", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    code, _, err = _run(capsys, "train", str(path), "--predictions", str(tmp_path / "pred.csv"))
    assert code == 2 and err.startswith("error: cannot write predictions to") and "No space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.tsv"]


# ---------------------------------------------------------------- duplicates

def test_duplicates_keep_the_latest_rating_by_timestamp(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text("a\tx\t1\t300\na\tx\t5\t100\nb\tx\t3\t1\na\tx\t2\t300\n")
    table, dropped = cli.dedupe(cli.read_ratings(str(path)))
    assert dropped == 2 and table.rating.tolist() == [3.0, 2.0]  # a-x at ts 300, the later line wins the tie


def test_duplicates_without_timestamps_keep_the_last_line(tmp_path, capsys):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n" + "".join(f"u{k % 5},i{k % 7},{1 + k % 5}\n" for k in range(40))
                    + "u0,i0,1\nu0,i0,4\n")
    table, dropped = cli.dedupe(cli.read_ratings(str(path)))
    last = [r for u, i, r in zip(table.user, table.item, table.rating) if (u, i) == ("u0", "i0")]
    assert last == [4.0] and dropped == 42 - 35
    code, out, _ = _run(capsys, "train", str(path), "--json")
    assert code == 0 and _result(out)["n_duplicates_dropped"] == 7


# ---------------------------------------------------------------- bad input: exit 2 and one line

BAD_FILES = {
    "empty": ("", r"r.txt is empty"),
    "blank": ("\n \n", r"r.txt is empty"),
    "header only": ("userId,movieId,rating,timestamp\n", r"r.txt has a header line but no ratings"),
    "three-column header only": ("user,item,rating\n", r"r.txt has a header line but no ratings"),
    "non-numeric": ("1\t2\t4\n1\t3\tgood\n", r"r.txt line 2: rating 'good' is not a number"),
    "nan": ("1,2,4\n1,3,nan\n", r"r.txt line 2: rating 'nan' is not a finite number"),
    "inf": ("u,i,r\n1,2,4\n1,3,inf\n", r"r.txt line 3: rating 'inf' is not a finite number"),
    "two columns": ("1,2\n3,4\n", r"r.txt line 1: found 2 column\(s\) separated by commas \(CSV\), but each"),
    "short row": ("1\t2\t4\t9\n1\t3\n", r"r.txt line 2: rating is missing"),
    "quoted rating": ('u,i,r\n1,2,"4,5"\n', r"r.txt line 2: rating '4,5' is not a number"),
    "bad timestamp": ("1::2::4::x\n", r"r.txt line 1: timestamp 'x' is not a number"),
    "beyond float32": ("1,2,4\n1,3,1e39\n", r"r.txt line 2: rating '1e39' is too large for float32"),
    "timestamp beyond int64": ("1,2,4,7\n1,3,4,-1e20\n", r"r.txt line 2: timestamp '-1e20' is out of range"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_exit_2_with_one_error_line(tmp_path, capsys, name):
    text, message = BAD_FILES[name]
    (tmp_path / "r.txt").write_text(text)
    code, out, err = _run(capsys, "train", str(tmp_path / "r.txt"))
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


BAD_ARGS = {
    "rank 0": (["--rank", "0"], r"argument --rank: must be >= 1, got '0'"),
    "rank text": (["--rank", "ten"], r"argument --rank: expected an integer, got 'ten'"),
    "negative reg": (["--method", "als", "--reg", "-1"], r"argument --reg: must be >= 0, got '-1'"),
    "als reg 0": (["--method", "als", "--reg", "0"], r"--method als needs --reg > 0"),
    "reg with bpmf": (["--reg", "0.1"], r"--reg does not apply to --method bpmf"),
    "epochs 0": (["--epochs", "0"], r"argument --epochs: must be >= 1, got '0'"),
    "test-frac 0": (["--test-frac", "0"], r"argument --test-frac: must be > 0 and < 1, got '0'"),
    "test-frac 1.5": (["--test-frac", "1.5"], r"must be > 0 and < 1, got '1.5'"),
    "test-frac nan": (["--test-frac", "nan"], r"must be > 0 and < 1, got 'nan'"),
    "tiny test-frac": (["--test-frac", "0.001"], r"--test-frac 0.001 of 70 rating\(s\) in .* leaves 0 test"),
    "test and frac": (["--test", "x", "--test-frac", "0.2"], r"not allowed with argument"),
    "missing test": (["--test", "nope.csv"], r"cannot read nope.csv: No such file or directory"),
    "directory": (["--test", "."], r"cannot read .: Is a directory"),
    "method": (["--method", "svd"], r"argument --method: invalid choice: 'svd'"),
    "predictions dir": (["--predictions", "no/such/dir/p.csv"], r"cannot write predictions to no/such/dir/p.csv"),
    "predictions over input": (["--predictions", "r.tsv"], r"--predictions r.tsv is one of the input files"),
    "empty predictions": (["--predictions", ""], r"--predictions needs a file name"),
    "negative seed": (["--seed", "-1"], r"argument --seed: must be >= 0 and < 9.22337e\+18, got '-1'"),
    "huge seed": (["--seed", "9" * 30], r"argument --seed: must be >= 0 and < 9.22337e\+18"),
    "predictions is a folder": (["--predictions", "."], r"cannot write predictions to \.: Is a directory"),
    "rank beyond memory": (["--method", "als", "--rank", str(10 ** 13)],
                           r"--rank 10000000000000 needs 8\.4e\+05 GB for the factor tables of 12 users and 9 "
                           r"items, more than the .* GB of this machine; lower --rank"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_exit_2_with_one_error_line(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "r.tsv", _rows(), "tab")
    extra, message = BAD_ARGS[name]
    code, _, err = _run(capsys, "train", "r.tsv", *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_output_problems_are_found_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "r.tsv", _rows(), "tab")
    monkeypatch.setattr(cli, "_fit", lambda *a, **k: pytest.fail("trained before checking --predictions"))
    for target, why in ((".", "Is a directory"), ("no/such/p.csv", "no folder")):
        code, _, err = _run(capsys, "train", "r.tsv", "--predictions", target)
        assert code == 2 and err.startswith(f"error: cannot write predictions to {target}: {why}"), err


def _read_only(monkeypatch, folder) -> None:
    """Make creating a file in ``folder`` fail as in a read-only folder (tests may run as root, which can
    write in any folder its permission bits protect)."""
    real = cli.tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)


def test_cannot_write_says_why_or_none(tmp_path, monkeypatch):
    assert cli.cannot_write(str(tmp_path / "p.csv")) is None and list(tmp_path.iterdir()) == []  # nothing left
    assert cli.cannot_write(str(tmp_path / "missing" / "p.csv")) == "No such file or directory"
    assert cli.cannot_write(os.devnull) is None  # a device is written in place: no new file needed
    _read_only(monkeypatch, tmp_path)
    assert cli.cannot_write(str(tmp_path / "p.csv")) == "Permission denied"


def test_a_predictions_folder_without_write_permission_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "r.tsv", _rows(), "tab")
    (tmp_path / "locked").mkdir()
    _read_only(monkeypatch, tmp_path / "locked")
    monkeypatch.setattr(cli, "_fit", lambda *a, **k: pytest.fail("trained before checking --predictions"))
    code, _, err = _run(capsys, "train", "r.tsv", "--predictions", "locked/p.csv")
    assert code == 2 and err.startswith("error: cannot write predictions to locked/p.csv: Permission denied (in "), err


@pytest.mark.parametrize("method", ["als", "sgd", "adam"])
def test_any_rating_scale_trains_like_stars(tmp_path, capsys, method):
    """Ratings a * stars + b train on the same 1..5 values, so the test RMSE scales by a (seen: ALS's
    Cholesky failed and SGD diverged on 1e5-scaled ratings before the CLI mapped them)."""
    stars = _rows(n=90)
    stars.loc[:1, "rating"] = [1.0, 5.0]  # the range is exactly 1..5: the stars train as they are
    scaled = stars.assign(rating=1e5 * stars.rating - 3.0)
    results = []
    for name, frame in (("stars.tsv", stars), ("scaled.tsv", scaled)):
        code, out, err = _run(capsys, "train", _write(tmp_path / name, frame, "tab").as_posix(), "--method", method,
                              "--epochs", "5", "--json")
        assert code == 0, err
        results.append(_result(out))
    assert results[0]["rating_map"] == [0.0, 1.0] and results[1]["rating_map"] == [-3.0, 1e5]
    assert results[1]["rmse"] == pytest.approx(1e5 * results[0]["rmse"], rel=1e-3)


def test_predictions_follow_a_link_and_get_ordinary_permissions(tmp_path, capsys):
    path = _write(tmp_path / "r.tsv", _rows(), "tab")
    (tmp_path / "real.csv").write_text("old\n")
    os.chmod(tmp_path / "real.csv", 0o640)
    (tmp_path / "link.csv").symlink_to("real.csv")
    assert _run(capsys, "train", str(path), "--predictions", str(tmp_path / "link.csv"))[0] == 0
    assert (tmp_path / "link.csv").is_symlink() and (tmp_path / "real.csv").read_text().startswith("user,item,")
    assert (tmp_path / "real.csv").stat().st_mode & 0o777 == 0o640  # the replaced file's permissions
    umask = os.umask(0o022)
    try:
        assert _run(capsys, "train", str(path), "--predictions", str(tmp_path / "new.csv"))[0] == 0
    finally:
        os.umask(umask)
    assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_predictions_into_a_named_pipe_keep_the_pipe(tmp_path, capsys):
    import stat
    import threading

    path, fifo = _write(tmp_path / "r.tsv", _rows(), "tab"), tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    code, _, err = _run(capsys, "train", str(path), "--predictions", str(fifo))
    if reader.is_alive():  # the old code renamed a file over the pipe and never opened it
        with open(fifo, "w"):
            pass
    reader.join(10)
    assert code == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and received[0].startswith("user,item,prediction\n")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_is_one_error_line_and_a_closed_pipe_is_quiet(tmp_path):
    _write(tmp_path / "r.tsv", _rows(), "tab")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mfutils", "train", "r.tsv", "--json"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(argv, stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: cannot write the results to standard output: No space left on device\n"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write to the pipe fails
    try:
        proc = subprocess.run(argv, stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                              timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1 and proc.stderr == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_bad_input(tmp_path, capsys):
    path = _write(tmp_path / "r.tsv", _rows(), "tab")
    code, _, err = _run(capsys, "train", str(path), "--device", "cuda")
    assert code == 2 and err.startswith("error: --device: device='cuda' was requested but CUDA is not available")


@pytest.mark.slow  # each starts a Python that imports torch: seconds, not milliseconds
@pytest.mark.parametrize("argv, message", [
    (["train", "missing.csv"], "error: cannot read missing.csv: No such file or directory"),
    (["train", "empty.csv"], "error: empty.csv is empty"),
    (["train", "r.tsv", "--rank", "-3"], "error: argument --rank: must be >= 1, got '-3'"),
    ([], "error: the following arguments are required: command"),
])
def test_real_exit_code_and_no_traceback_through_python_m(tmp_path, argv, message):
    (tmp_path / "empty.csv").write_text("")
    _write(tmp_path / "r.tsv", _rows(), "tab")
    proc = _subprocess(*argv, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_python_m_success_prints_json_last(tmp_path):
    _write(tmp_path / "r.csv", _rows(half_stars=True), "csv")
    proc = _subprocess("train", "r.csv", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    assert JSON_KEYS <= json.loads(proc.stdout.strip().splitlines()[-1]).keys()


def test_help_documents_formats_and_duplicates(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "duplicates:" in out and "'::'-separated" in out


# ---------------------------------------------------------------- accuracy on ml-100k (slow)

@pytest.mark.slow
def test_default_method_beats_surprise_svd_on_ml100k_u1(tmp_path, capsys):
    from mfutils.movielens import load_ml100k_fold

    paths = []
    for data, name in zip(load_ml100k_fold(1, progress=False), ("u1.base", "u1.test")):
        frame = data.to_frame()[["user_id", "item_id", "rating", "timestamp"]]
        frame.to_csv(tmp_path / name, sep="\t", header=False, index=False)
        paths.append(str(tmp_path / name))
    code, out, _ = _run(capsys, "train", paths[0], "--test", paths[1], "--json")
    result = _result(out)
    assert code == 0 and result["n_test"] == 20_000 and result["rmse"] < 0.938  # Surprise SVD: 0.951 on u1


def test_a_ridge_too_small_for_als_is_one_error_line_not_a_traceback(tmp_path, capsys):
    path = _write(tmp_path / "r.tsv", _rows(), "tab")  # 12 users, 9 items: rank 20 leaves every system singular
    code, _, err = _run(capsys, "train", str(path), "--method", "als", "--rank", "20", "--reg", "1e-12")
    assert code == 1 and err.startswith("error: fit_als(): in sweep 0's user half-step, a least-squares system of ALS "
                                   "is singular"), err
    assert "raise reg (now 1e-12)" in err and len(err.strip().splitlines()) == 1 and "unexpected" not in err
