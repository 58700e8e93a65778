r"""``python -m mfutils train``: fit a matrix factorization to a ratings file and score it on held-out rows.

Everything a reader's own file needs happens here: detect the format, parse with pandas, resolve duplicate
ratings, number the ids, hold out a test set, train with good defaults, predict (unknown users and items
included), and report. Bad input ends with exit code 2 and one ``error: ...`` line on stderr.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mfutils import __version__
from mfutils.data import RatingData

__all__ = ["main", "build_parser", "read_ratings", "dedupe", "fit_predict", "write_file", "RatingsTable", "UsageError"]

DEFAULTS = {  # per method: rank, reg, epochs (chosen on validation splits of ml-100k u*.base)
    "bpmf": {"rank": 6, "reg": None, "epochs": 20},
    "als": {"rank": 20, "reg": 0.15, "epochs": 15},
    "sgd": {"rank": 50, "reg": 0.05, "epochs": 40},
    "adam": {"rank": 50, "reg": 0.1, "epochs": 30},
}
_SEPARATORS = {"::": "'::' (like ratings.dat)", "\t": "tabs (like u.data)", ",": "commas (CSV)",
               r"\s+": "spaces"}


class UsageError(Exception):
    """Bad input from the command line or a file: reported as one ``error:`` line, exit code 2."""


@dataclass(frozen=True)
class RatingsTable:
    """A parsed ratings file: raw id tokens, float64 ratings, int64 timestamps (or None), file line numbers."""

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray | None
    line: np.ndarray
    path: str

    def take(self, index: np.ndarray) -> RatingsTable:
        ts = None if self.timestamp is None else self.timestamp[index]
        return RatingsTable(self.user[index], self.item[index], self.rating[index], ts, self.line[index], self.path)


def _sniff(data: bytes, path: str, line: int) -> tuple[str, bool, int]:
    """Separator, whether the first line is a header (its third field is a word), and the column count."""
    first = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
    sep = next((s for s in ("::", "\t", ",") if s in first), r"\s+")
    fields = first.split() if sep == r"\s+" else first.split(sep)
    if len(fields) < 3:
        raise UsageError(f"{path} line {line}: found {len(fields)} column(s) separated by {_SEPARATORS[sep]}, "
                         f"but each row needs user, item, rating[, timestamp]")
    third = fields[2].strip().strip("'\"")
    try:
        float(third)
        header = False
    except ValueError:
        header = any(c.isalpha() for c in third)  # "rating" is a header; "" or "4,5" are bad data
    return sep, header, len(fields)


def read_ratings(path: str) -> RatingsTable:
    r"""Parse ``user, item, rating[, timestamp]`` rows: CSV with a header, tab-separated, ``::``-separated
    or whitespace-separated (detected from the first line; a header is recognised by a non-numeric third
    field). Ids are kept as strings; extra columns after the fourth are ignored.

    Raises:
        UsageError: unreadable, empty or header-only file; too few columns; a missing or non-numeric
            field; a NaN or infinite rating (the message names the file and line).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data.strip():
        raise UsageError(f"{path} is empty: expected rows of user, item, rating[, timestamp]")
    body = data.lstrip()
    skipped, data = data[:len(data) - len(body)].count(b"\n"), body  # leading blank lines
    sep, header, n_cols = _sniff(data, path, skipped + 1)
    if sep == "::":
        data, sep = data.replace(b"::", b"\t"), "\t"
    frame = _parse(data, sep, header, n_cols, path, skipped)
    if len(frame) == 0:
        raise UsageError(f"{path} has a header line but no ratings")
    _check_numbers(frame, data, sep, header, n_cols, path, skipped)
    ts = frame[3].to_numpy(np.int64) if n_cols >= 4 else None
    return RatingsTable(frame[0].to_numpy(object), frame[1].to_numpy(object), frame[2].to_numpy(np.float64), ts,
                        frame.index.to_numpy() + 1 + header + skipped, path)


def _read(data: bytes, sep: str, header: bool, n_cols: int, dtype) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), sep=sep, header=None, skiprows=int(header), names=range(n_cols),
                        usecols=range(min(n_cols, 4)), dtype=dtype, skip_blank_lines=False,
                        keep_default_na=False, na_values=[""], encoding_errors="surrogateescape")
    return frame.dropna(how="all")  # blank lines; the index still counts every line


def _parse(data: bytes, sep: str, header: bool, n_cols: int, path: str, skipped: int) -> pd.DataFrame:
    dtype = {k: t for k, t in {0: str, 1: str, 2: np.float64, 3: np.float64}.items() if k < n_cols}
    try:
        return _read(data, sep, header, n_cols, dtype)
    except pd.errors.ParserError as exc:
        raise UsageError(f"{path}: {str(exc).replace('Error tokenizing data. C error: ', '').strip()}") from None
    except ValueError:  # a non-numeric rating or timestamp: re-read as text to say where
        frame = _read(data, sep, header, n_cols, str)
        for col, name in ((2, "rating"), (3, "timestamp")):
            if col in frame:
                bad = pd.to_numeric(frame[col], errors="coerce").isna() & frame[col].notna()
                if bad.any():
                    row = bad.idxmax()
                    raise UsageError(f"{path} line {row + 1 + header + skipped}: {name} {_what(frame[col][row])}")
        raise


def _what(raw: str | float) -> str:
    """Why a numeric field was rejected, e.g. ``'nan' is not a finite number``."""
    if pd.isna(raw):
        return "is missing"
    try:
        float(raw)
        return f"{raw!r} is not a finite number"
    except ValueError:
        return f"{raw!r} is not a number"


def _check_numbers(frame: pd.DataFrame, data: bytes, sep: str, header: bool, n_cols: int, path: str,
                   skipped: int) -> None:
    for col, name in ((0, "user"), (1, "item"), (2, "rating"), (3, "timestamp")):
        if col not in frame:
            continue
        bad = frame[col].isna().to_numpy(copy=True)
        if col >= 2:
            bad |= ~np.isfinite(frame[col].to_numpy(np.float64, na_value=np.nan))
        if bad.any():
            row = frame.index[bad.argmax()]
            raw = _read(data, sep, header, n_cols, str)[col][row]
            raise UsageError(f"{path} line {row + 1 + header + skipped}: {name} {_what(raw)}")
        if col == 3:  # timestamps are kept as int64: a larger magnitude would wrap around silently
            big = np.abs(frame[col].to_numpy(np.float64)) >= 2.0 ** 63
            if big.any():
                row = frame.index[big.argmax()]
                raw = _read(data, sep, header, n_cols, str)[col][row]
                raise UsageError(f"{path} line {row + 1 + header + skipped}: timestamp {raw!r} is out of range "
                                 f"(at most {2 ** 63 - 1:.3g} in magnitude, e.g. Unix seconds); fix or drop the "
                                 f"timestamp column")
        if col == 2:  # ratings are trained in float32: a larger magnitude would become inf
            big = np.abs(frame[col].to_numpy(np.float64)) > np.finfo(np.float32).max
            if big.any():
                row = frame.index[big.argmax()]
                raw = _read(data, sep, header, n_cols, str)[col][row]
                raise UsageError(f"{path} line {row + 1 + header + skipped}: rating {raw!r} is too large for "
                                 f"float32 (at most {float(np.finfo(np.float32).max):.3g}); rescale the ratings")


def dedupe(table: RatingsTable) -> tuple[RatingsTable, int]:
    """Keep one rating per (user, item): the latest by timestamp, ties and timestamp-less files by file order."""
    frame = pd.DataFrame({"user": table.user, "item": table.item,
                          "ts": table.timestamp if table.timestamp is not None else 0})
    order = frame.sort_values("ts", kind="stable").index  # stable: later lines stay later among equal ts
    keep = ~frame.loc[order].duplicated(["user", "item"], keep="last")
    index = np.sort(order[keep.to_numpy()].to_numpy())
    return table.take(index), len(table.rating) - len(index)


def to_rating_data(table: RatingsTable) -> RatingData:
    """Number users and items in sorted order of their raw tokens (``RatingData``'s convention)."""
    u_codes, user_ids = _number(table.user)
    i_codes, item_ids = _number(table.item)
    ts = table.timestamp if table.timestamp is not None else np.zeros(len(table.rating), np.int64)
    return RatingData(user_idx=torch.from_numpy(u_codes), item_idx=torch.from_numpy(i_codes),
                      rating=torch.from_numpy(table.rating.astype(np.float32)),
                      timestamp=torch.from_numpy(np.array(ts, dtype=np.int64)),
                      user_ids=user_ids, item_ids=item_ids, name=os.path.basename(table.path))


def _number(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(tokens)  # hashing: fast on millions of strings
    order = np.argsort(uniques.astype(str), kind="stable")  # (n_unique,)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[codes].astype(np.int64), np.asarray(uniques, dtype=object)[order]


def _holdout(table: RatingsTable, frac: float, seed: int) -> tuple[RatingsTable, RatingsTable]:
    n = len(table.rating)
    n_test = int(round(frac * n))
    if not 0 < n_test < n:
        raise UsageError(f"--test-frac {frac} of {n:,} rating(s) in {table.path} leaves {n_test} test and "
                         f"{n - n_test} training rows; both need at least one")
    perm = np.random.default_rng(seed).permutation(n)
    return table.take(np.sort(perm[n_test:])), table.take(np.sort(perm[:n_test]))


def _fit(method: str, train: RatingData, rank: int, reg: float | None, epochs: int, seed: int,
         device: torch.device):
    """Train one method with the CLI's settings; returns a BiasedMF (for bpmf, its posterior mean)."""
    from mfutils.bpmf import fit_bpmf
    from mfutils.models import BiasedMF
    from mfutils.train import fit_als, fit_sgd

    if method == "bpmf":
        n_burnin = epochs // 5
        return fit_bpmf(train, n_factors=rank, n_samples=epochs - n_burnin, n_burnin=n_burnin, seed=seed,
                        device=device)[0]
    model = BiasedMF(train.n_users, train.n_items, rank, global_mean=float(train.rating.mean()), seed=seed,
                     device=device)
    if method == "als":
        fit_als(model, train, reg=reg, n_epochs=epochs, device=device)
    else:
        fit_sgd(model, train, optimizer=method, reg=reg, n_epochs=epochs, seed=seed, device=device,
                **({"batch_size": 4096} if method == "adam" else {}))
    return model


def fit_predict(train_table: RatingsTable, test_table: RatingsTable, *, method: str = "bpmf",
                rank: int | None = None, reg: float | None = None, epochs: int | None = None, seed: int = 0,
                device: str | torch.device = "cpu") -> tuple[np.ndarray, dict]:
    """Number the training ids, fit, and predict every test row (unseen ids fall back to biases).

    als, sgd and adam train on the training ratings mapped linearly onto 1..5 (:func:`_star_scale`), so
    their defaults suit any rating scale; their predictions are mapped back.

    Returns:
        float32 predictions aligned with ``test_table`` (clipped to the training rating range), and facts
        about the run (``n_train``, ``fit_seconds``, ``predict_seconds``, ``n_test_unknown``, ``rating_map``
        (offset, unit: rating = offset + unit * trained value) ...).
    """
    from mfutils.train import resolve_device

    if method not in DEFAULTS:
        raise ValueError(f"fit_predict(): method must be one of {sorted(DEFAULTS)}; got {method!r}")
    rank, reg, epochs = (DEFAULTS[method][k] if v is None else v for k, v in
                         (("rank", rank), ("reg", reg), ("epochs", epochs)))
    device, start = resolve_device(device), time.perf_counter()
    low, high = float(train_table.rating.min()), float(train_table.rating.max())
    scale = _star_scale(low, high) if method != "bpmf" else (0.0, 1.0)
    train = to_rating_data(_rescaled(train_table, scale))
    _check_memory(train, rank, device)
    model = _fit(method, train, rank, reg, epochs, seed, device)
    fit_seconds, start = time.perf_counter() - start, time.perf_counter()
    user_idx = pd.Index(train.user_ids).get_indexer(test_table.user)  # (n_test,), -1 = unseen
    item_idx = pd.Index(train.item_ids).get_indexer(test_table.item)
    pred = model.predict(torch.from_numpy(user_idx), torch.from_numpy(item_idx)).cpu().numpy().astype(np.float64)
    pred = np.clip(scale[0] + scale[1] * pred, low, high).astype(np.float32)  # back on the file's scale
    return pred, {"n_train": train.n_ratings, "n_users": train.n_users, "n_items": train.n_items,
                  "n_test": len(pred), "n_test_unknown": int(((user_idx < 0) | (item_idx < 0)).sum()),
                  "fit_seconds": fit_seconds, "predict_seconds": time.perf_counter() - start,
                  "method": method, "rank": rank, "reg": reg, "epochs": epochs, "seed": seed,
                  "device": str(device), "rating_range": [low, high], "rating_map": list(scale)}


def _star_scale(low: float, high: float) -> tuple[float, float]:
    """``(offset, unit)`` that maps 1..5 onto the training range ``low..high``: ``r = offset + unit * star``.

    als, sgd and adam train on ``(r - offset) / unit``, which spans 1 to 5 stars whatever the file's scale,
    so their defaults (reg, and sgd's learning rate, chosen on 1-5 stars) hold for any scale; ratings
    already on 1..5 map to themselves. A single distinct rating keeps unit 1.
    """
    unit = (high - low) / 4 if high > low else 1.0
    return low - unit, unit


def _rescaled(table: RatingsTable, scale: tuple[float, float]) -> RatingsTable:
    if scale == (0.0, 1.0):
        return table
    return RatingsTable(table.user, table.item, (table.rating - scale[0]) / scale[1], table.timestamp, table.line,
                        table.path)


def _check_memory(train: RatingData, rank: int, device: torch.device) -> None:
    """Refuse a rank whose factor tables alone exceed the memory of the machine (or GPU) before allocating."""
    needed = (train.n_users + train.n_items) * (rank + 1) * 4  # float32 factors and a bias per row
    from mfutils.bench import _memory_bytes

    if device.type == "cuda":
        available, where = torch.cuda.get_device_properties(device).total_memory, "this GPU"
    else:
        available, where = _memory_bytes(), "this machine"
    if available is not None and needed > available:  # None: the system does not say (e.g. Windows)
        raise UsageError(f"--rank {rank} needs {needed / 1e9:.3g} GB for the factor tables of {train.n_users:,} "
                         f"users and {train.n_items:,} items, more than the {available / 1e9:.3g} GB of {where}; "
                         f"lower --rank")


def cannot_write(path: str) -> str | None:
    """Why :func:`write_file` could not write ``path`` (the error message), or None when it could: a file is
    created in the folder it would write in and removed at once, so that an output path is checked before a
    long run, not after it. A pipe or device (``/dev/stdout``) is written in place and needs no new file."""
    if os.path.exists(path) and not os.path.isfile(path):
        return None
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.realpath(path))):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def write_file(path: str, write: Callable[[str], None], *, prefix: str = ".mfutils-") -> None:
    """``write(p)`` the file at ``path`` whole or not at all: into a temporary file beside it, then a rename.

    A symbolic link is followed (the file it names is replaced, the link kept). A path that exists and
    is not a regular file (``/dev/stdout``, a named pipe) is written directly: renaming over it would
    replace it. The file gets the permissions a new file gets (the umask's), or keeps those of the file
    it replaces. OSError passes through; the temporary file never stays behind.
    """
    if os.path.exists(path) and not os.path.isfile(path):
        write(path)
        return
    target = os.path.realpath(path)
    if os.path.exists(target):
        mode = os.stat(target).st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=prefix, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp made it private (0600)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def write_predictions(path: str, test: RatingsTable, pred: np.ndarray) -> None:
    """Write ``user,item,prediction`` per test row with :func:`write_file` (whole or not at all)."""
    frame = pd.DataFrame({"user": test.user, "item": test.item, "prediction": pred})
    try:
        write_file(path, lambda p: frame.to_csv(p, index=False, float_format="%.4f", encoding="utf-8",
                                                errors="surrogateescape", lineterminator="\n"))
    except OSError as exc:
        raise UsageError(f"cannot write predictions to {path}: {exc.strerror or exc}") from None


def _train_command(args: argparse.Namespace) -> dict:
    """Run ``train``: read, dedupe, split, fit, predict, score; returns the JSON-able summary."""
    from mfutils.metrics import mae, rmse
    from mfutils.train import resolve_device

    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:  # --device cuda on a machine without CUDA
        raise UsageError(str(exc).replace("resolve_device(): ", "--device: ")) from None
    table, n_dupes = dedupe(read_ratings(args.ratings))
    if args.test is not None:
        train_table, test_table = table, read_ratings(args.test)
    else:
        train_table, test_table = _holdout(table, args.test_frac, args.seed)
    pred, facts = fit_predict(train_table, test_table, method=args.method, rank=args.rank, reg=args.reg,
                              epochs=args.epochs, seed=args.seed, device=device)
    if args.predictions:
        write_predictions(args.predictions, test_table, pred)
    pred, target = torch.from_numpy(pred), torch.from_numpy(test_table.rating.astype(np.float32))
    return {"rmse": rmse(pred, target), "mae": mae(pred, target), **facts, "n_duplicates_dropped": n_dupes,
            "ratings": args.ratings, "test": args.test, "test_frac": None if args.test else args.test_frac,
            "predictions": args.predictions, "mfutils": __version__, "torch": torch.__version__}


def _summary(result: dict) -> str:
    reg = "" if result["reg"] is None else f", reg {result['reg']:g}"
    epochs = f"{result['epochs']} {'sweeps' if result['method'] == 'bpmf' else 'epochs'}"
    return (f"trained {result['method']} (rank {result['rank']}{reg}, {epochs}) on "
            f"{result['n_train']:,} ratings ({result['n_users']:,} users x {result['n_items']:,} items) in "
            f"{result['fit_seconds']:.2f} s on {result['device']}\n"
            f"test: {result['n_test']:,} ratings ({result['n_test_unknown']:,} with an unseen user or item): "
            f"RMSE {result['rmse']:.4f}, MAE {result['mae']:.4f}")


def _number_type(kind: type, low: float, *, low_open: bool = False, high: float | None = None):
    """An argparse ``type=`` that parses ``kind`` and checks ``low <=`` (or ``<``) value (``< high``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, "
                                             f"got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not (kind is int or math.isfinite(value)) or too_low or (high is not None and value >= high):
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: main() prints it as "error: ..."
        raise UsageError(f"{message} (see '{self.prog} --help')")


_EPILOG = """\
input files: one rating per row, columns user, item, rating[, timestamp] (by position; more are ignored).
  CSV with a header (ratings.csv), tab-separated (u.data), '::'-separated (ratings.dat) or space-separated;
  detected from the first line. Ids are any tokens; ratings any numeric scale (als, sgd and adam train on
  the training range mapped onto 1 to 5, where their defaults were chosen, and predict on the file's scale).
duplicates: if RATINGS rates the same (user, item) twice, the latest rating by timestamp is kept (by file
  order when timestamps tie or are absent); this happens before --test-frac splits. TEST rows are all kept.
unknown ids: a TEST user or item that is not in training is predicted from the item bias, the user bias or
  the global mean. Predictions are clipped to the training rating range.
defaults (rank, reg, epochs): bpmf 6, -, 20 (4 burn-in + 16 averaged sweeps); als 20, 0.15, 15;
  sgd 50, 0.05, 40; adam 50, 0.1, 30.
exit status: 0 on success, 2 on bad input (one 'error:' line on stderr), 1 on an unexpected failure."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mfutils", description="Matrix factorization for collaborative filtering.")
    parser.add_argument("--version", action="version", version=f"mfutils {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="fit a model to a ratings file and score it on test ratings",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("ratings", metavar="RATINGS", help="training ratings file")
    held_out = train.add_mutually_exclusive_group()
    held_out.add_argument("--test", metavar="TEST", help="test ratings file (same formats)")
    held_out.add_argument("--test-frac", type=_number_type(float, 0, low_open=True, high=1), default=0.2,
                          metavar="F", help="without --test: hold out this fraction of RATINGS (default 0.2)")
    train.add_argument("--method", choices=sorted(DEFAULTS), default="bpmf",
                       help="bpmf (default: Bayesian MF by Gibbs sampling), als, sgd or adam")
    train.add_argument("--rank", type=_number_type(int, 1), metavar="K", help="number of latent factors")
    train.add_argument("--reg", type=_number_type(float, 0), metavar="L", help="L2 strength λ (not bpmf)")
    train.add_argument("--epochs", type=_number_type(int, 1), metavar="N", help="epochs, sweeps for bpmf")
    train.add_argument("--seed", type=_number_type(int, 0, high=2 ** 63), default=0, metavar="S",
                       help="seed for split, init, sampling")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: auto")
    train.add_argument("--predictions", metavar="OUT.csv", help="write user,item,prediction per test row")
    train.add_argument("--json", action="store_true", help="end stdout with one JSON line of results")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.method == "bpmf" and args.reg is not None:
        raise UsageError("--reg does not apply to --method bpmf (its prior is learned); drop it or use als/sgd/adam")
    for key, value in DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "als" and args.reg == 0:
        raise UsageError("--method als needs --reg > 0 (each least-squares system is singular without it)")
    if args.predictions is not None:
        if not args.predictions:
            raise UsageError("--predictions needs a file name, e.g. --predictions predictions.csv")
        inputs = [p for p in (args.ratings, args.test) if p is not None and os.path.exists(p)]
        if any(os.path.exists(args.predictions) and os.path.samefile(args.predictions, p) for p in inputs):
            raise UsageError(f"--predictions {args.predictions} is one of the input files; it would be overwritten. "
                             f"Name another file")
        folder = os.path.dirname(os.path.realpath(args.predictions))
        if os.path.isdir(args.predictions) or not os.path.isdir(folder):  # found now, not after training
            why = "Is a directory" if os.path.isdir(args.predictions) else f"no folder {folder}"
            raise UsageError(f"cannot write predictions to {args.predictions}: {why}")
        why = cannot_write(args.predictions)
        if why is not None:
            raise UsageError(f"cannot write predictions to {args.predictions}: {why} (in {folder})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mfutils`` and the ``mfutils`` script; returns the exit status."""
    try:
        args = _parse_args(argv)
        result = _train_command(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the library's own boundary checks
        if os.environ.get("MFUTILS_DEBUG"):
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # sgd/adam diverged, or an ALS system was singular
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - no traceback for users; MFUTILS_DEBUG=1 shows it
        if os.environ.get("MFUTILS_DEBUG"):
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with MFUTILS_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1
    return _report(result, args.json)


def _report(result: dict, as_json: bool) -> int:
    """Print the summary (and the JSON line); a closed pipe or a full disk on stdout ends quietly, exit 1."""
    try:
        print(_summary(result))
        if as_json:
            print(json.dumps(result))
        sys.stdout.flush()
    except OSError as exc:
        try:  # nothing more can reach stdout: point it at devnull, so the interpreter's last flush is quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout has no file descriptor (replaced in-process)
            pass
        if not isinstance(exc, BrokenPipeError):  # a reader that closed the pipe wanted no more
            print(f"error: cannot write the results to standard output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
