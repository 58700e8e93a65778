"""``mfutils.distributed``: block ALS over torch.distributed equals ``fit_als``; blocks, bytes, bad input, failures.

The multi-process tests start real ``torchrun`` groups of 2 gloo workers through :func:`launch` (a few
seconds each, mostly importing torch); the rest run in this process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mfutils import distributed
from mfutils.data import random_split
from mfutils.distributed import DistributedError, fit_als_distributed, gather_bytes_per_sweep, launch, partition
from mfutils.models import BiasedMF
from mfutils.synthetic import synthetic
from mfutils.train import fit_als

ROOT = Path(__file__).resolve().parents[1]
SIZES, RANK, REG, EPOCHS, SEED = (600, 400, 20_000), 8, 0.15, 5, 0
ARGS = ["--synthetic", *map(str, SIZES), "--rank", str(RANK), "--reg", str(REG), "--epochs", str(EPOCHS),
        "--seed", str(SEED), "--test-frac", "0.2", "--device", "cpu"]
# Two processes solve every row from the same inputs as fit_als, but float32 sums run in another order (the
# Gram chunks hold other rows, the squared errors are summed per block, then across ranks): the results
# differ by float32 rounding, ~1e-7 in RMSE and ~1e-6 in a factor on this data. The tolerances leave 100x room
# and are still far below any real change (one more sweep moves the RMSE by ~1e-2, a factor by ~1e-2).
RMSE_ATOL, FACTOR_ATOL = 1e-5, 1e-4


def _split():
    data, _ = synthetic(*SIZES, seed=SEED)
    return random_split(data, 0.2, seed=SEED)


def _model(train, biases: bool = True) -> BiasedMF:
    """The model the command line builds: the same sizes, global mean and seed."""
    return BiasedMF(train.n_users, train.n_items, RANK, global_mean=float(train.rating.mean()), biases=biases,
                    seed=SEED)


@pytest.fixture(scope="module")
def reference():
    """``fit_als`` in this process on the command line's data and initial model."""
    train, test = _split()
    model = _model(train)
    history = fit_als(model, train, val=test, reg=REG, n_epochs=EPOCHS, device="cpu")
    return model, history


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """One run of the command line on 2 gloo workers: its results and its saved factors."""
    folder = tmp_path_factory.mktemp("two_workers")
    out, factors = folder / "results.json", folder / "factors.pt"
    result = launch(2, [*ARGS, "--out", str(out), "--save-factors", str(factors)], timeout=180)
    assert json.loads(out.read_text()) == result
    return result, torch.load(factors)


def _leftovers(var: str, tag: str) -> list[int]:
    """Live processes whose environment holds ``var=tag`` (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = []
    if psutil is not None:
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(var) == tag:
                    found.append(proc.pid)
            except (psutil.Error, OSError):
                continue
        return found
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{var}={tag}".encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except OSError:
            continue
    return found


# ----------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("group", ["none", "gloo"])
@pytest.mark.parametrize("biases", [True, False])
def test_world_size_one_in_process_equals_fit_als(group, biases):
    """One rank owns every row: the same arithmetic as fit_als, so the same numbers bit for bit."""
    train, test = _split()
    expected, got = _model(train, biases), _model(train, biases)
    history = fit_als(expected, train, val=test, reg=REG, n_epochs=EPOCHS, device="cpu")
    if group == "gloo":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fit = fit_als_distributed(got, train, val=test, reg=REG, n_epochs=EPOCHS, device="cpu")
    finally:
        if group == "gloo":
            dist.destroy_process_group()
    assert (fit.world_size, fit.backend) == (1, group)
    assert fit.history.train_loss == history.train_loss
    assert fit.history.train_rmse == history.train_rmse
    assert fit.history.val_rmse == history.val_rmse
    for name, value in expected.state_dict().items():
        assert torch.equal(got.state_dict()[name], value), name
    assert fit.bytes_sent == [[0] * EPOCHS] and fit.user_bounds == [0, train.n_users]


def test_two_workers_reproduce_fit_als(two_workers, reference):
    result, factors = two_workers
    model, history = reference
    assert (result["world_size"], result["backend"], result["device"]) == (2, "gloo", "cpu")
    assert result["final"]["train_rmse"] == pytest.approx(history.train_rmse[-1], abs=RMSE_ATOL)
    assert result["final"]["test_rmse"] == pytest.approx(history.val_rmse[-1], abs=RMSE_ATOL)
    assert result["sweeps"]["train_rmse"] == pytest.approx(history.train_rmse, abs=RMSE_ATOL)
    assert result["sweeps"]["train_loss"] == pytest.approx(history.train_loss, abs=RMSE_ATOL)
    assert result["sweeps"]["test_rmse"] == pytest.approx(history.val_rmse, abs=RMSE_ATOL)
    assert result["model"]["global_mean"] == pytest.approx(float(model.global_mean), abs=0)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(factors[name], value, atol=FACTOR_ATOL, rtol=0, msg=name)
    assert history.train_rmse[-1] < history.train_rmse[0] - 0.05  # the check above is not between two no-ops


def test_results_file_has_the_documented_fields(two_workers):
    result, _ = two_workers
    assert {"world_size", "backend", "device", "data", "model", "partition", "sweeps", "per_rank", "final",
            "fit_seconds", "wall_seconds", "torch"} <= result.keys()
    assert result["data"]["n_train"] + result["data"]["n_test"] == SIZES[2]
    for key in ("compute_s", "comm_s", "bytes_sent", "bytes_received"):
        assert len(result["per_rank"][key]) == 2 and all(len(row) == EPOCHS for row in result["per_rank"][key])
    assert all(t > 0 for row in result["per_rank"]["compute_s"] for t in row)
    assert all(len(result["sweeps"][key]) == EPOCHS for key in ("train_loss", "train_rmse", "test_rmse", "seconds"))


# ----------------------------------------------------------------------------------------- blocks and bytes

@pytest.mark.parametrize("n_parts", [1, 2, 3, 5, 8])
def test_blocks_cover_every_row_once_and_balance_ratings(n_parts):
    train, _ = _split()
    for rows, n in ((train.user_idx, train.n_users), (train.item_idx, train.n_items)):
        counts = torch.bincount(rows, minlength=n)
        bounds = partition(counts, n_parts)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == n_parts + 1
        assert bool((bounds[1:] >= bounds[:-1]).all())  # contiguous, in order: each row in exactly one block
        owner = torch.bucketize(torch.arange(n), bounds[1:-1], right=True)
        assert torch.equal(torch.bincount(owner, minlength=n_parts), bounds[1:] - bounds[:-1])
        per_block = torch.stack([counts[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
        share = len(rows) / n_parts
        assert int(per_block.sum()) == len(rows)
        assert float((per_block - share).abs().max()) <= int(counts.max())  # the guarantee: N/W ± max count
        assert float(per_block.max()) <= 1.25 * share  # and on MovieLens-like data, much better


def test_blocks_follow_ratings_not_rows():
    bounds = partition(torch.tensor([30, 0, 0, 0, 10, 10, 10]), 2)
    assert bounds.tolist() == [0, 1, 7]  # the heavy first row alone holds half the ratings
    assert partition(torch.zeros(5), 2).tolist() == [0, 2, 5]  # no ratings: cut by rows
    assert partition(torch.tensor([1, 1]), 4).tolist()[-1] == 2  # more blocks than rows: some stay empty
    with pytest.raises(ValueError, match="n_parts"):
        partition(torch.ones(3), 0)


def test_the_run_uses_balanced_blocks(two_workers):
    result, _ = two_workers
    part, n_train = result["partition"], result["data"]["n_train"]
    assert part["user_bounds"][0] == 0 and part["user_bounds"][-1] == SIZES[0]
    assert part["item_bounds"][0] == 0 and part["item_bounds"][-1] == SIZES[1]
    for key in ("user_block_ratings", "item_block_ratings"):
        assert sum(part[key]) == n_train and max(part[key]) <= 1.05 * n_train / 2


def test_bytes_per_sweep_follow_the_formula(two_workers):
    result, _ = two_workers
    part, world, cols = result["partition"], 2, RANK + 1  # + 1: the bias column
    padded = max(b - a for a, b in zip(part["user_bounds"], part["user_bounds"][1:])) \
        + max(b - a for a, b in zip(part["item_bounds"], part["item_bounds"][1:]))
    expected = (world - 1) * padded * cols * 4
    assert gather_bytes_per_sweep(part["user_bounds"], part["item_bounds"], cols) == expected
    assert result["per_rank"]["bytes_sent"] == [[expected] * EPOCHS] * world
    assert result["per_rank"]["bytes_received"] == [[expected] * EPOCHS] * world
    unpadded = (world - 1) / world * (SIZES[0] + SIZES[1]) * cols * 4
    assert unpadded <= expected <= 1.05 * unpadded  # the padding of near-equal blocks costs little
    assert result["per_rank"]["setup_bytes"] == (SIZES[1] * cols + 1) * 4  # item tables and global mean


# ----------------------------------------------------------------------------------------- the command line

def test_one_process_command_line_writes_results_and_factors(tmp_path, capsys, reference):
    out, factors = tmp_path / "r.json", tmp_path / "f.pt"
    assert distributed.main([*ARGS, "--out", str(out), "--save-factors", str(factors)]) == 0
    assert "ALS on 1 process(es) (gloo, cpu)" in capsys.readouterr().out
    result, model = json.loads(out.read_text()), reference[0]
    assert result["world_size"] == 1 and result["per_rank"]["bytes_sent"] == [[0] * EPOCHS]
    assert result["final"]["train_rmse"] == reference[1].train_rmse[-1]
    state = torch.load(factors)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt", "r.json"]  # no temporary files left
    assert not dist.is_initialized()


def test_no_mean_fits_the_ratings_uncentred_like_spark(tmp_path, capsys):
    """--no-biases --no-mean: the model Spark MLlib's ALS fits, equal to fit_als on BiasedMF(global_mean=0)."""
    data, _ = synthetic(50, 40, 600, seed=1)
    out, factors = tmp_path / "r.json", tmp_path / "f.pt"
    assert distributed.main(["--synthetic", "50", "40", "600", "--seed", "1", "--test-frac", "0", "--rank", "3",
                             "--epochs", "2", "--no-biases", "--no-mean", "--device", "cpu", "--out", str(out),
                             "--save-factors", str(factors)]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["model"]["global_mean"] == 0.0 and result["model"]["biases"] is False
    model = BiasedMF(data.n_users, data.n_items, 3, global_mean=0.0, biases=False, seed=1)
    history = fit_als(model, data, reg=result["model"]["reg"], n_epochs=2, device="cpu")
    assert result["final"]["train_rmse"] == history.train_rmse[-1]
    assert all(torch.equal(torch.load(factors)[k], v) for k, v in model.state_dict().items())


def test_command_line_reads_a_ratings_file(tmp_path, capsys):
    data, _ = synthetic(50, 40, 600, seed=1)
    lines = [f"u{u}\ti{i}\t{r:g}\n" for u, i, r in zip(data.user_idx.tolist(), data.item_idx.tolist(),
                                                         data.rating.tolist())]
    (tmp_path / "u.data").write_text("".join(lines))
    out = tmp_path / "r.json"
    assert distributed.main(["--ratings", str(tmp_path / "u.data"), "--test-frac", "0", "--rank", "3",
                             "--epochs", "2", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"]["n_train"] == 600 and result["data"]["n_test"] == 0
    assert result["final"]["test_rmse"] is None and result["sweeps"]["test_rmse"] == [None, None]
    assert "test RMSE" not in capsys.readouterr().out


BAD = [
    (["--rank", "0"], "--rank: must be >= 1"),
    (["--reg", "0"], "--reg: must be > 0"),
    (["--epochs", "-2"], "--epochs: must be >= 1"),
    (["--timeout", "0"], "--timeout: must be > 0"),
    (["--device", "gpu"], "--device: invalid choice"),
    (["--synthetic", "-5", "400", "20000"], "--synthetic: must be >= 1"),
    (["--synthetic", "10", "10", "60"], "at most 50 ratings fit"),
    (["--test-frac", "1"], "--test-frac: must be >= 0 and < 1"),
    (["--out", "/nonexistent/folder/r.json"], "does not exist"),
    (["--seed", "-1"], "--seed: must be >= 0 and < 9.22337e+18, got '-1'"),  # as 'mfutils train'
    (["--seed", "9" * 30], "--seed: must be >= 0 and < 9.22337e+18, got '999"),
    (["--timeout", "1e10"], "--timeout: must be > 0 and < 1e+09"),  # torch overflows on it
    (["--synthetic", "9" * 20, "10", "10"], "--synthetic: must be >= 1 and < 9.22337e+18"),
    (["--out", ""], "--out needs a file name"),
    (["--rank", "9" * 20], "GB of this machine; lower --rank"),  # as 'mfutils train'
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, extra, message):
    out = tmp_path / "r.json"
    code = distributed.main([*ARGS, "--out", str(out), *extra])  # argparse: the last value of an option wins
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _one_error_line(capsys, code: int, message: str) -> None:
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and message in captured.err, captured


@pytest.mark.parametrize("case", ["out is a folder", "factors is a folder", "trailing slash", "out is the ratings",
                                  "out is the factors"])
def test_output_paths_are_checked_before_training(tmp_path, capsys, case):
    """A path that cannot take the results is refused up front (exit 2), not after training (exit 1)."""
    folder, ratings = tmp_path / "folder", tmp_path / "u.data"
    folder.mkdir()
    ratings.write_text("1\t1\t4\n1\t2\t3\n2\t1\t5\n2\t2\t1\n")
    out, factors = str(tmp_path / "r.json"), str(tmp_path / "f.pt")
    source = ["--ratings", str(ratings)] if case == "out is the ratings" else ["--synthetic", "50", "40", "600"]
    paths, message = {
        "out is a folder": ((str(folder), factors), f"--out {folder} names a folder, not a file"),
        "factors is a folder": ((out, str(folder)), f"--save-factors {folder} names a folder, not a file"),
        "trailing slash": ((str(tmp_path / "new") + "/", factors), "names a folder, not a file"),
        "out is the ratings": ((str(ratings), factors), f"--out {ratings} is the --ratings file"),
        "out is the factors": ((out, out), "--out and --save-factors both name"),
    }[case]
    code = distributed.main([*source, "--test-frac", "0", "--rank", "2", "--epochs", "1", "--device", "cpu",
                             "--out", paths[0], "--save-factors", paths[1]])
    _one_error_line(capsys, code, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "u.data"] and not list(folder.iterdir())
    assert ratings.read_text().startswith("1\t1\t4\n")


def test_an_output_folder_without_write_permission_is_refused_before_training(tmp_path, capsys, monkeypatch):
    from mfutils import cli

    locked = tmp_path / "locked"
    locked.mkdir()
    real = cli.tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):  # as a read-only folder would (tests may run as root)
        if dir == str(locked):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(distributed, "fit_als_distributed", lambda *a, **k: pytest.fail("trained before the check"))
    for option, other in (("--out", "--save-factors"), ("--save-factors", "--out")):
        code = distributed.main(["--synthetic", "50", "40", "600", "--test-frac", "0", "--rank", "2", "--epochs", "1",
                                 "--device", "cpu", option, str(locked / "x"), other, str(tmp_path / "y")])
        _one_error_line(capsys, code, f"{option} {locked / 'x'}: cannot write in {locked}: Permission denied")
    assert list(locked.iterdir()) == [] and list(tmp_path.iterdir()) == [locked]


@pytest.mark.parametrize("rank, world, local", [(2, 2, 0), (-1, 2, 0), (0, 2, -1), (0, 0, 0), (0, 1, 1)],
                         ids=["rank=world", "negative rank", "negative local rank", "world 0", "local rank=world"])
def test_an_inconsistent_torchrun_environment_exits_2(tmp_path, capsys, monkeypatch, rank, world, local):
    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", distributed._free_port())):
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "r.json"
    code = distributed.main([*ARGS, "--timeout", "3", "--out", str(out)])  # 3 s: were it unchecked, no long hang
    _one_error_line(capsys, code, f"torchrun's environment is inconsistent (RANK={rank}, WORLD_SIZE={world}, "
                                  f"LOCAL_RANK={local}): it needs WORLD_SIZE >= 1 and 0 <= RANK, LOCAL_RANK < "
                                  f"WORLD_SIZE")
    assert not list(tmp_path.iterdir()) and not dist.is_initialized()


def test_data_too_large_to_build_fails_with_one_line(tmp_path, capsys):
    """2**62 synthetic users pass the option check, but torch cannot even size the tables: exit 1, no traceback."""
    code = distributed.main(["--synthetic", str(2 ** 62), "10", "10", "--device", "cpu",
                             "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == "" and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("error: rank 0 of 1: loading the data failed: RuntimeError: "), captured
    assert not list(tmp_path.iterdir())


def test_a_broken_least_squares_system_says_how_to_fix_it(tmp_path, capsys):
    """Ratings of magnitude 1e5 make float32 Gram matrices lose positive definiteness: one line with the fix."""
    rng = np.random.default_rng(0)
    pairs = rng.choice(60 * 40, size=700, replace=False)
    rows = "".join(f"{p // 40},{p % 40},{1e5 * rng.integers(1, 6)}\n" for p in pairs)
    (tmp_path / "r.csv").write_text("user,item,rating\n" + rows)
    code = distributed.main(["--ratings", str(tmp_path / "r.csv"), "--epochs", "3", "--device", "cpu",
                             "--out", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert code == 1 and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("error: rank 0 of 1: training failed: FloatingPointError: a least-squares "
                                   "system of ALS is singular"), captured.err
    assert "rescale them to a few units (e.g. 1 to 5) or raise --reg" in captured.err
    assert not (tmp_path / "r.json").exists()


def test_outputs_follow_a_link_and_keep_its_file_permissions(tmp_path, capsys):
    (tmp_path / "real.json").write_text("old\n")
    os.chmod(tmp_path / "real.json", 0o640)
    (tmp_path / "link.json").symlink_to("real.json")
    assert distributed.main([*ARGS, "--device", "cpu", "--out", str(tmp_path / "link.json")]) == 0, capsys.readouterr()
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "real.json").read_text())
    assert (tmp_path / "real.json").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert distributed.main([*ARGS, "--device", "cuda", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device: ") and "CUDA is not available" in err and not list(tmp_path.iterdir())


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "mfutils.distributed", *ARGS, "--rank", "0", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and run.stdout == "" and not out.exists()
    assert run.stderr.startswith("error: argument --rank: must be >= 1") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr


def test_launch_checks_its_arguments_before_starting_anything():
    with pytest.raises(ValueError, match="bad arguments: argument --reg: must be > 0"):
        launch(2, [*ARGS, "--reg", "-1"])
    with pytest.raises(ValueError, match="n_workers"):
        launch(0, ARGS)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(DistributedError, match=f"master_port {taken.getsockname()[1]} .* already in use"):
            launch(2, ARGS, master_port=taken.getsockname()[1])


# ----------------------------------------------------------------------------------------- failures

def _failing_run(tmp_path, mode: str, collective_timeout: int) -> tuple[DistributedError, float, str]:
    tag = uuid.uuid4().hex
    env = {"MFUTILS_DIST_FAIL_RANK": "1", "MFUTILS_DIST_FAIL_SWEEP": "1", "MFUTILS_DIST_FAIL_MODE": mode,
           "MFUTILS_TEST_TAG": tag}
    out = tmp_path / "r.json"
    start = time.perf_counter()
    with pytest.raises(DistributedError) as caught:
        launch(2, [*ARGS, "--timeout", str(collective_timeout), "--out", str(out)], env=env, timeout=180)
    elapsed = time.perf_counter() - start
    assert not out.exists() and list(tmp_path.iterdir()) == []
    deadline = time.monotonic() + 5  # a process killed a moment ago may still be on its way out
    while _leftovers("MFUTILS_TEST_TAG", tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers("MFUTILS_TEST_TAG", tag) == []
    return caught.value, elapsed, str(caught.value)


def test_a_dead_worker_makes_the_run_fail_fast_with_a_clear_error(tmp_path):
    """Rank 1 is SIGKILLed at the start of sweep 1; rank 0 loses its peer in the next collective."""
    error, elapsed, message = _failing_run(tmp_path, "exit", collective_timeout=10)
    assert elapsed < 10 + 30, (elapsed, message)  # start-up (two torch imports) + far less than the timeout
    assert message.startswith("distributed run with 2 worker(s) failed"), message
    assert "rank 1 was killed by SIGKILL without an error line" in message, message
    # the survivor either reports the lost peer itself, or torchrun stops it first and the message says so
    survivor = message.split("rank 1 was killed by SIGKILL", 1)[1]
    assert "rank 0" in survivor or "the launcher then stopped the other 1 rank(s)" in survivor, message
    assert "\n" not in message and "Traceback" not in message, message
    assert error.returncode not in (0, None) and "Root Cause" in error.stderr  # the full log stays available


def test_the_failure_message_names_the_rank_that_died_first_even_if_torchrun_blames_a_survivor():
    """Both exits seen in one poll: torchrun's "root cause" may be the survivor; its own line says it lost a peer."""
    stderr = "\n".join([
        "error: rank 0 of 2: training failed: RuntimeError: Read error: Connection reset by peer "
        "(a peer process died; see its own error line)",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "Failures:", "[1]:", "  rank      : 1 (local_rank: 1)", "  exitcode  : -9 (pid: 12)  (SIGKILL)",
        "Root Cause (first observed failure):", "[0]:", "  rank      : 0 (local_rank: 0)",
        "  exitcode  : 1 (pid: 11)", "=========="])
    message = distributed._failure_message(2, 1, stderr)
    assert message == ("distributed run with 2 worker(s) failed (launcher exit status 1): rank 1 was killed by "
                       "SIGKILL without an error line (killed, out of memory, or a crash); rank 0 exited with "
                       "status 1: training failed: RuntimeError: Read error: Connection reset by peer (a peer "
                       "process died; see its own error line)")


def test_a_stalled_worker_makes_the_others_time_out(tmp_path):
    """Rank 1 sleeps instead of joining sweep 1: rank 0's collective gives up after --timeout seconds."""
    _, elapsed, message = _failing_run(tmp_path, "hang", collective_timeout=3)
    assert elapsed < 3 + 30
    assert "rank 0 exited with status 1: training failed: RuntimeError: Timed out" in message
    assert "--timeout 3 s" in message and "\n" not in message
