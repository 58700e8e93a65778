r"""Load the GroupLens MovieLens data sets, checksummed, cached and offline-friendly.

Where an archive comes from, in order:

1. an extracted, verified copy in the cache folder (argument ``cache_dir``, else ``$MFUTILS_CACHE_DIR``,
   else ``$XDG_CACHE_HOME/mfutils``, else ``~/.cache/mfutils``);
2. ``<name>.zip`` in the read-only mirror folder ``$MFUTILS_DATA_MIRROR`` (offline builds, CI);
3. a download from ``files.grouplens.org``.

Every archive is checked against a pinned checksum before anything is extracted. Downloads and extraction
go to temporary names first, so an interrupted run leaves nothing a later call would trust.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mfutils.data import RatingData, from_arrays

__all__ = ["DATASETS", "MovieLensError", "load_movielens", "load_ml100k_fold"]

_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
_MARKER = ".mfutils-complete"
_CHUNK = 1 << 20


class MovieLensError(RuntimeError):
    """An archive could not be found, downloaded, verified or extracted."""


@dataclass(frozen=True)
class _Spec:
    sha256: str | None            # of the GroupLens zip (tensorflow/datasets url_checksums)
    folder: str                   # top folder inside the zip
    fmt: Literal["tab", "colons", "csv"]
    ratings: str
    items: str
    items_encoding: str
    md5: str | None = None
    member_sha256: dict[str, str] = field(default_factory=dict)   # accept a re-zip with these members

    def url(self, name: str) -> str:
        return f"{_BASE_URL}{name}.zip"


_REGISTRY: dict[str, _Spec] = {
    "ml-100k": _Spec("50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229", "ml-100k", "tab",
                     "u.data", "u.item", "latin-1", member_sha256={
                         "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
                         "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"}),
    "ml-latest-small": _Spec("696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
                             "ml-latest-small", "csv", "ratings.csv", "movies.csv", "utf-8"),
    "ml-1m": _Spec("a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", "ml-1m", "colons",
                   "ratings.dat", "movies.dat", "latin-1"),
    # No SHA-256 of ml-10m.zip is published; GroupLens publishes only its MD5, so this entry alone
    # falls back to MD5.
    "ml-10m": _Spec(None, "ml-10M100K", "colons", "ratings.dat", "movies.dat", "utf-8",
                    md5="ce571fd55effeba0271552578f2648bd"),
    "ml-20m": _Spec("96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3", "ml-20m", "csv",
                    "ratings.csv", "movies.csv", "utf-8"),
    "ml-25m": _Spec("8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa", "ml-25m", "csv",
                    "ratings.csv", "movies.csv", "utf-8"),
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


# ------------------------------------------------------------------------------------ public API

def load_movielens(name: str, *, cache_dir: str | os.PathLike | None = None,
                   progress: bool = True) -> RatingData:
    r"""Load a MovieLens data set as :class:`~mfutils.data.RatingData`.

    Args:
        name: one of ``"ml-100k"``, ``"ml-latest-small"``, ``"ml-1m"``, ``"ml-10m"``, ``"ml-20m"``,
            ``"ml-25m"``.
        cache_dir: where extracted copies live; beats ``$MFUTILS_CACHE_DIR`` and the user cache folder.
        progress: show a ``tqdm`` bar while downloading (``TQDM_DISABLE=1`` also silences it).
    Returns:
        ``RatingData`` with ``n_ratings`` ratings (float32 stars, int64 Unix timestamps), users and items
        numbered in sorted raw-id order; only rated movies are items. ``item_titles`` and ``item_genres``
        (``"|"``-joined) are aligned with ``item_ids``.
    Raises:
        ValueError: unknown ``name``.
        MovieLensError: no cached, mirrored or downloadable archive, or a checksum mismatch.
    Example:
        >>> data = load_movielens("ml-100k")   # 100,000 ratings, 943 users, 1,682 items
    """
    spec = _spec(name, "load_movielens")
    folder = _ensure_extracted(name, spec, cache_dir, progress)
    ratings = _read_ratings(folder / spec.ratings, spec.fmt)
    items = _read_items(folder, spec)
    return from_arrays(ratings["user_id"].to_numpy(), ratings["item_id"].to_numpy(),
                       ratings["rating"].to_numpy(), ratings["timestamp"].to_numpy(), name=name, items=items)


def load_ml100k_fold(fold: int, *, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> tuple[RatingData, RatingData]:
    r"""The official ml-100k cross-validation fold ``u<fold>.base`` / ``u<fold>.test``.

    Args:
        fold: 1 to 5.
        cache_dir, progress: as for :func:`load_movielens`.
    Returns:
        ``(train, test)`` with 80,000 and 20,000 ratings, numbered with the id maps of the full ml-100k
        data, so both have ``n_users=943`` and ``n_items=1682``.
    Raises:
        ValueError: ``fold`` is not one of 1..5.
    """
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 1 <= fold <= 5:
        raise ValueError(f"load_ml100k_fold(): fold must be an int from 1 to 5 (files u1.base..u5.test); "
                         f"got {fold!r}")
    full = load_movielens("ml-100k", cache_dir=cache_dir, progress=progress)
    folder = _cache_root(cache_dir) / "ml-100k"
    return tuple(_with_maps(full, _read_ratings(folder / f"u{fold}.{part}", "tab"), f"ml-100k/u{fold}.{part}")
                 for part in ("base", "test"))


def _with_maps(full: RatingData, frame: pd.DataFrame, name: str) -> RatingData:
    return replace(full, name=name,
                   user_idx=torch.from_numpy(full.user_idx_of(frame["user_id"].to_numpy()).astype(np.int64)),
                   item_idx=torch.from_numpy(full.item_idx_of(frame["item_id"].to_numpy()).astype(np.int64)),
                   rating=torch.from_numpy(np.array(frame["rating"], dtype=np.float32)),
                   timestamp=torch.from_numpy(np.array(frame["timestamp"], dtype=np.int64)))


def _spec(name: str, func: str) -> _Spec:
    if name not in _REGISTRY:
        raise ValueError(f"{func}(): unknown data set {name!r}; valid names are {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# ------------------------------------------------------------------------------ parsing

_RATING_COLS = ["user_id", "item_id", "rating", "timestamp"]
_RATING_DTYPES = {"user_id": np.int64, "item_id": np.int64, "rating": np.float32, "timestamp": np.int64}


def _read_ratings(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "csv":
        frame = pd.read_csv(path, dtype=dict(zip(["userId", "movieId", "rating", "timestamp"],
                                                 _RATING_DTYPES.values())))
        return frame.set_axis(_RATING_COLS, axis=1)
    if fmt == "tab":
        return pd.read_csv(path, sep="\t", header=None, names=_RATING_COLS, dtype=_RATING_DTYPES)
    # "a::b::c::d" read with sep=":" gives empty columns 1, 3, 5 between the fields we keep.
    return pd.read_csv(path, sep=":", header=None, usecols=[0, 2, 4, 6], names=list(range(7)),
                       dtype={0: np.int64, 2: np.int64, 4: np.float32, 6: np.int64}).set_axis(_RATING_COLS, axis=1)


def _read_items(folder: Path, spec: _Spec) -> pd.DataFrame:
    r"""A frame indexed by raw item id with columns ``title`` and ``genres`` (``"|"``-joined)."""
    path = folder / spec.items
    if spec.fmt == "csv":
        frame = pd.read_csv(path, encoding=spec.items_encoding, dtype={"movieId": np.int64})
        return frame.rename(columns={"movieId": "item_id"}).set_index("item_id")[["title", "genres"]]
    if spec.fmt == "colons":   # titles may hold ":" but not "::"; a control char is a safe one-char sep
        text = path.read_bytes().replace(b"::", b"\x1f")
        return pd.read_csv(io.BytesIO(text), sep="\x1f", header=None, names=["item_id", "title", "genres"],
                           encoding=spec.items_encoding, quoting=3, index_col="item_id")
    genre_names = pd.read_csv(folder / "u.genre", sep="|", header=None, encoding=spec.items_encoding)[0]
    genre_names = genre_names.to_numpy(dtype=object)                        # (19,)
    frame = pd.read_csv(path, sep="|", header=None, encoding=spec.items_encoding, quoting=3)
    flags = frame.iloc[:, 5:].to_numpy(dtype=bool)                           # (n_items, 19)
    genres = ["|".join(genre_names[row].tolist()) for row in flags]
    return pd.DataFrame({"title": frame[1].to_numpy(), "genres": genres}, index=frame[0].rename("item_id"))


# ------------------------------------------------------------------------------ cache, mirror, download

def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("MFUTILS_CACHE_DIR"):
        return Path(os.environ["MFUTILS_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mfutils"


def _fingerprint(spec: _Spec) -> str:
    return f"sha256:{spec.sha256}" if spec.sha256 else f"md5:{spec.md5}"


def _is_complete(target: Path, spec: _Spec) -> bool:
    marker = target / _MARKER
    return marker.is_file() and marker.read_text().strip() == _fingerprint(spec)


def _ensure_extracted(name: str, spec: _Spec, cache_dir, progress: bool) -> Path:
    root = _cache_root(cache_dir)
    target = root / name
    if _is_complete(target, spec):
        return target
    mirror = os.environ.get("MFUTILS_DATA_MIRROR")
    if mirror and (Path(mirror) / f"{name}.zip").is_file():
        archive = Path(mirror) / f"{name}.zip"
        _verify_archive(archive, spec, f"the mirror archive {archive} (from MFUTILS_DATA_MIRROR)",
                        "replace it with the GroupLens original, or unset MFUTILS_DATA_MIRROR to download")
        _extract(archive, spec, target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"{name}.zip"       # an earlier, verified download: kept so it is never fetched twice
    if not archive.is_file() or not _archive_ok(archive, spec):
        archive.unlink(missing_ok=True)
        _download(name, spec, root, archive, progress)
    _extract(archive, spec, target)
    return target


def _offline_hint(name: str, url: str, root: Path) -> str:
    mirror = os.environ.get("MFUTILS_DATA_MIRROR")
    where = (f"MFUTILS_DATA_MIRROR={mirror} holds no {name}.zip" if mirror
             else "MFUTILS_DATA_MIRROR is not set")
    return (f"No verified copy of {name} is cached in {root / name}, and {where}. Either go online, or "
            f"set the environment variable MFUTILS_DATA_MIRROR to a folder holding {name}.zip "
            f"(downloaded from {url}).")


def _download(name: str, spec: _Spec, root: Path, archive: Path, progress: bool) -> None:
    url = spec.url(name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".zip.part", dir=root)
    tmp = Path(tmp_name)
    disable = not progress or os.environ.get("TQDM_DISABLE", "").lower() in {"1", "true", "yes"}
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
                              disable=disable) as bar:  # explicit: tqdm reads TQDM_DISABLE only at import
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                raise MovieLensError(f"load_movielens(): could not download {url} ({err}; got {received:,} "
                                     f"bytes). {_offline_hint(name, url, root)}") from err
        if total is not None and received != total:
            raise MovieLensError(f"load_movielens(): the download of {url} stopped after {received:,} of "
                                 f"{total:,} bytes. Call again to retry. {_offline_hint(name, url, root)}")
        _verify_archive(tmp, spec, f"the file downloaded from {url}", "call again to retry the download")
        os.replace(tmp, archive)
    finally:
        tmp.unlink(missing_ok=True)


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _archive_ok(path: Path, spec: _Spec, digests: tuple[str, str] | None = None) -> bool:
    sha, md5 = digests or _digests(path)
    return sha == spec.sha256 or (spec.sha256 is None and md5 == spec.md5) or _members_match(path, spec)


def _verify_archive(path: Path, spec: _Spec, what: str, fix: str) -> None:
    sha, md5 = _digests(path)
    if _archive_ok(path, spec, (sha, md5)):
        return
    expected = f"sha256 {spec.sha256}" if spec.sha256 else f"md5 {spec.md5}"
    raise MovieLensError(f"checksum mismatch for {what}: expected {expected}, found sha256 {sha} "
                         f"(md5 {md5}); the file is corrupt or not the GroupLens original. To fix: {fix}")


def _members_match(path: Path, spec: _Spec) -> bool:
    r"""A rebuilt zip is accepted when its pinned member files are byte-identical to GroupLens's."""
    if not spec.member_sha256:
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            for member, expected in spec.member_sha256.items():
                digest = hashlib.sha256()
                with zf.open(f"{spec.folder}/{member}") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                if digest.hexdigest() != expected:
                    return False
    except (zipfile.BadZipFile, KeyError, OSError):
        return False
    return True


def _extract(archive: Path, spec: _Spec, target: Path) -> None:
    r"""Unzip into a temporary folder beside ``target``, then publish it with one atomic rename.

    The marker file is written last inside the temporary folder, so a folder under the final name is
    always complete; any member that would land outside the temporary folder is rejected first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extracting", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            _check_members(zf, tmp, archive)
            zf.extractall(tmp)
        data = tmp / spec.folder
        missing = [f for f in (spec.ratings, spec.items) if not (data / f).is_file()]
        if missing:
            raise MovieLensError(f"{archive} has no {spec.folder}/{missing[0]}; it is not the expected "
                                 f"MovieLens archive. Replace it with the GroupLens original")
        (data / _MARKER).write_text(_fingerprint(spec) + "\n")
        if _is_complete(target, spec):   # another process finished first
            return
        if target.exists():              # stale: no marker, or one for another checksum
            shutil.rmtree(target)
        try:
            os.replace(data, target)
        except OSError:
            if not _is_complete(target, spec):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_members(zf: zipfile.ZipFile, dest: Path, archive: Path) -> None:
    root = dest.resolve()
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if (name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]
                or not (root / name).resolve().is_relative_to(root)):
            raise MovieLensError(f"unsafe member {name!r} in {archive}: it would be written outside the "
                                 f"extraction folder; refusing to extract this archive (replace it with "
                                 f"the GroupLens original)")
