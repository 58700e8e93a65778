"""Tests for mfutils.movielens: formats, checksums, cache, mirror, download and safe extraction.

Default tests build tiny archives in ``tmp_path`` and serve them from a local HTTP server; the ``slow``
tests read the real archives from the shared mirror (``$MFUTILS_DATA_MIRROR``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mfutils import movielens
from mfutils.movielens import MovieLensError, load_ml100k_fold, load_movielens

MIRROR = Path(os.environ.get("MFUTILS_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")
GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


# ---------------------------------------------------------------------------------------- fixtures

def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def _u_item_line(item_id: int, title: str, genres: list[str]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in GENRES)
    return f"{item_id}|{title}|01-Jan-1995||http://us.imdb.com/M/x|{flags}\n"


def _tab_members() -> dict[str, bytes]:
    items = _u_item_line(1, "Misérables, Les (1995)", ["Drama", "Musical"]) + \
        _u_item_line(2, "Toy Story (1995)", ["Animation", "Children's", "Comedy"])
    return {"ml-100k/u.data": b"1\t1\t5\t881250949\n2\t2\t3\t891717742\n2\t1\t4\t878887116\n",
            "ml-100k/u.item": items.encode("latin-1"),
            "ml-100k/u.genre": "".join(f"{g}|{k}\n" for k, g in enumerate(GENRES)).encode() + b"\n"}


def _colon_members(folder: str, encoding: str, ratings: bytes) -> dict[str, bytes]:
    movies = "10::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n20::Amélie (2001)::Comedy\n"
    return {f"{folder}/ratings.dat": ratings, f"{folder}/movies.dat": movies.encode(encoding)}


def _csv_members() -> dict[str, bytes]:
    return {"ml-latest-small/ratings.csv": b"userId,movieId,rating,timestamp\r\n1,11,4.5,964982703\r\n"
                                           b"1,7,0.5,964981247\r\n3,11,3.0,964982224\r\n",
            "ml-latest-small/movies.csv": 'movieId,title,genres\r\n7,Sabrina (1995),Comedy|Romance\r\n'
                                          '11,"American President, The (1995)",Comedy|Drama|Romance\r\n'
                                          '12,Unrated (1995),Drama\r\n'.encode()}


FIXTURES = {
    "ml-100k": _tab_members,
    "ml-1m": lambda: _colon_members("ml-1m", "latin-1", b"1::10::5::978300760\n2::20::3::978302109\n"),
    "ml-10m": lambda: _colon_members("ml-10M100K", "utf-8", b"1::10::4.5::838985046\n1::20::2::838983525\n"),
    "ml-latest-small": _csv_members,
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """An isolated environment: a fresh cache, an empty mirror folder, no network, silent progress."""
    cache, mirror = tmp_path / "cache", tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("MFUTILS_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("MFUTILS_CACHE_DIR", str(cache))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(movielens, "_BASE_URL", "http://127.0.0.1:9/")   # discard port: refused at once
    return cache, mirror


def _pin(monkeypatch, name: str, archive: bytes, **changes) -> None:
    """Point the registry entry for ``name`` at a fixture archive's checksum."""
    spec = movielens._REGISTRY[name]
    changes.setdefault("sha256", hashlib.sha256(archive).hexdigest() if spec.sha256 else None)
    changes.setdefault("md5", hashlib.md5(archive).hexdigest() if spec.md5 else None)
    changes.setdefault("member_sha256", {})
    monkeypatch.setitem(movielens._REGISTRY, name, dataclasses.replace(spec, **changes))


def _mirrored(monkeypatch, mirror: Path, name: str, members: dict[str, bytes] | None = None) -> bytes:
    archive = _zip_bytes(members or FIXTURES[name]())
    (mirror / f"{name}.zip").write_bytes(archive)
    _pin(monkeypatch, name, archive)
    return archive


class _Server:
    """A local HTTP server that serves one payload, optionally cut short after ``cut`` bytes."""

    def __init__(self) -> None:
        self.payload, self.cut = b"", None
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                body = server.payload if server.cut is None else server.payload[:server.cut]
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()


@pytest.fixture
def server(env, monkeypatch):
    srv = _Server()
    monkeypatch.setattr(movielens, "_BASE_URL", srv.url)
    monkeypatch.delenv("MFUTILS_DATA_MIRROR")
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# ---------------------------------------------------------------------------------------- formats

def test_tab_format_parses_latin1_titles_and_genre_flags(env, monkeypatch):
    _mirrored(monkeypatch, env[1], "ml-100k")
    data = load_movielens("ml-100k")
    assert (data.name, data.n_ratings, data.n_users, data.n_items) == ("ml-100k", 3, 2, 2)
    assert data.item_titles.tolist() == ["Misérables, Les (1995)", "Toy Story (1995)"]
    assert data.item_genres.tolist() == ["Drama|Musical", "Animation|Children's|Comedy"]
    assert data.rating.dtype == torch.float32 and data.timestamp.dtype == torch.int64
    assert data.to_frame()[["user_id", "item_id", "rating"]].values.tolist() == [[1, 1, 5], [2, 2, 3], [2, 1, 4]]


def test_colon_format_parses_titles_with_colons(env, monkeypatch):
    _mirrored(monkeypatch, env[1], "ml-1m")
    data = load_movielens("ml-1m")
    assert data.item_titles.tolist() == ["Star Wars: Episode IV - A New Hope (1977)", "Amélie (2001)"]
    assert data.item_genres.tolist() == ["Action|Sci-Fi", "Comedy"]
    assert data.rating.tolist() == [5.0, 3.0] and data.timestamp.tolist() == [978300760, 978302109]


def test_ml10m_is_verified_by_md5_and_extracts_from_its_own_folder_name(env, monkeypatch):
    _mirrored(monkeypatch, env[1], "ml-10m")
    assert movielens._REGISTRY["ml-10m"].sha256 is None
    data = load_movielens("ml-10m")
    assert data.rating.tolist() == [4.5, 2.0] and data.item_titles[1] == "Amélie (2001)"


def test_csv_format_parses_quoted_titles_with_commas_and_keeps_only_rated_movies(env, monkeypatch):
    _mirrored(monkeypatch, env[1], "ml-latest-small")
    data = load_movielens("ml-latest-small")
    assert data.item_ids.tolist() == [7, 11]
    assert data.item_titles.tolist() == ["Sabrina (1995)", "American President, The (1995)"]
    assert data.rating.tolist() == [4.5, 0.5, 3.0]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown data set 'ml-5m'.*ml-100k, ml-latest-small, ml-1m, ml-10m"):
        load_movielens("ml-5m")


@pytest.mark.parametrize("fold", [0, 6, 1.0, True])
def test_bad_fold_raises(fold):
    with pytest.raises(ValueError, match=r"fold must be an int from 1 to 5.*got"):
        load_ml100k_fold(fold)


# ---------------------------------------------------------------------------------------- cache

def test_cache_dir_argument_beats_env_var_and_xdg_cache_home_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("MFUTILS_CACHE_DIR", str(tmp_path / "env"))
    assert movielens._cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert movielens._cache_root(None) == tmp_path / "env"
    monkeypatch.delenv("MFUTILS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert movielens._cache_root(None) == tmp_path / "xdg" / "mfutils"


def test_extracted_copy_is_reused_without_the_mirror(env, monkeypatch):
    cache, mirror = env
    _mirrored(monkeypatch, mirror, "ml-100k")
    first = load_movielens("ml-100k")
    (mirror / "ml-100k.zip").unlink()
    assert (cache / "ml-100k" / ".mfutils-complete").is_file()
    assert torch.equal(load_movielens("ml-100k").rating, first.rating)
    assert [p for p in _files(cache) if "extracting" in p or p.endswith(".zip")] == []


def test_stale_folder_without_marker_is_replaced(env, monkeypatch):
    cache, mirror = env
    _mirrored(monkeypatch, mirror, "ml-100k")
    (cache / "ml-100k").mkdir(parents=True)
    (cache / "ml-100k" / "u.data").write_text("half-written garbage\n")
    assert load_movielens("ml-100k").n_ratings == 3


def test_interrupted_extraction_leaves_nothing_trusted(env, monkeypatch):
    cache, mirror = env
    _mirrored(monkeypatch, mirror, "ml-100k")

    def crash(self, path, *args, **kwargs):
        Path(path, "ml-100k").mkdir(parents=True)
        Path(path, "ml-100k", "u.data").write_text("1\t1\t5\t0\n")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(zipfile.ZipFile, "extractall", crash)
        with pytest.raises(KeyboardInterrupt):
            load_movielens("ml-100k")
    assert _files(cache) == []
    assert load_movielens("ml-100k").n_ratings == 3


# ---------------------------------------------------------------------------------------- checksums

def test_mirror_checksum_mismatch_names_the_file_and_keeps_it(env, monkeypatch):
    cache, mirror = env
    _mirrored(monkeypatch, mirror, "ml-100k")
    _pin(monkeypatch, "ml-100k", b"something else")
    with pytest.raises(MovieLensError, match=r"checksum mismatch for the mirror archive .*ml-100k\.zip"):
        load_movielens("ml-100k")
    assert (mirror / "ml-100k.zip").is_file() and _files(cache) == []


def test_rebuilt_ml100k_zip_is_accepted_when_its_members_match(env, monkeypatch):
    members = _tab_members()
    _mirrored(monkeypatch, env[1], "ml-100k")
    pins = {f: hashlib.sha256(members[f"ml-100k/{f}"]).hexdigest() for f in ("u.data", "u.item")}
    _pin(monkeypatch, "ml-100k", b"the original container", member_sha256=pins)
    assert load_movielens("ml-100k").n_ratings == 3
    _pin(monkeypatch, "ml-100k", b"the original container", member_sha256={**pins, "u.data": "0" * 64})
    with pytest.raises(MovieLensError, match="checksum mismatch"):
        load_movielens("ml-100k", cache_dir=env[0] / "other")


@pytest.mark.parametrize("evil", ["../evil.txt", "ml-100k/../../evil.txt", "/tmp/evil-abs.txt", "..\\evil.txt"])
def test_zip_slip_member_is_rejected_and_nothing_is_written(env, monkeypatch, tmp_path, evil):
    cache, mirror = env
    _mirrored(monkeypatch, mirror, "ml-100k", {**_tab_members(), evil: b"pwned"})
    with pytest.raises(MovieLensError, match=r"unsafe member .*evil"):
        load_movielens("ml-100k")
    assert _files(cache) == [] and not Path("/tmp/evil-abs.txt").exists()
    assert [p for p in _files(tmp_path) if "evil" in p] == []


# ---------------------------------------------------------------------------------------- download

def test_download_is_verified_extracted_and_kept_in_the_cache(server, monkeypatch):
    server.payload = _zip_bytes(_tab_members())
    _pin(monkeypatch, "ml-100k", server.payload)
    data = load_movielens("ml-100k")
    cache = Path(os.environ["MFUTILS_CACHE_DIR"])
    assert data.n_ratings == 3
    assert (cache / "ml-100k.zip").read_bytes() == server.payload
    assert not [p for p in _files(cache) if ".part" in p or "extracting" in p]


def test_corrupt_cached_zip_is_downloaded_again(server, monkeypatch):
    server.payload = _zip_bytes(_tab_members())
    _pin(monkeypatch, "ml-100k", server.payload)
    cache = Path(os.environ["MFUTILS_CACHE_DIR"])
    cache.mkdir()
    (cache / "ml-100k.zip").write_bytes(server.payload[:-10])
    assert load_movielens("ml-100k").n_ratings == 3
    assert (cache / "ml-100k.zip").read_bytes() == server.payload


def test_connection_reset_mid_stream_removes_the_partial_file(env, monkeypatch):
    monkeypatch.delenv("MFUTILS_DATA_MIRROR")

    class Response(io.BytesIO):
        headers = {"Content-Length": "2000000"}

        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("peer went away")
            return super().read(size)

    monkeypatch.setattr(movielens.urllib.request, "urlopen", lambda url, timeout: Response(b"x" * 2_000_000))
    with pytest.raises(MovieLensError, match=r"could not download .*peer went away; got 1,048,576 bytes"):
        load_movielens("ml-100k")
    assert _files(env[0]) == []


def test_interrupted_download_leaves_no_trusted_file_and_a_retry_works(server, monkeypatch):
    server.payload, server.cut = _zip_bytes(_tab_members()), 100
    _pin(monkeypatch, "ml-100k", server.payload)
    with pytest.raises(MovieLensError, match=r"(stopped after 100 of|could not download).*MFUTILS_DATA_MIRROR"):
        load_movielens("ml-100k")
    cache = Path(os.environ["MFUTILS_CACHE_DIR"])
    assert _files(cache) == []
    server.cut = None
    assert load_movielens("ml-100k").n_ratings == 3


def test_download_checksum_mismatch_removes_the_bad_file(server, monkeypatch):
    server.payload = _zip_bytes(_tab_members())
    _pin(monkeypatch, "ml-100k", b"what GroupLens really serves")
    with pytest.raises(MovieLensError, match=r"checksum mismatch for the file downloaded from http://127"):
        load_movielens("ml-100k")
    assert _files(Path(os.environ["MFUTILS_CACHE_DIR"])) == []


def test_offline_error_names_the_url_the_cache_and_the_mirror_variable(env, monkeypatch):
    cache, _ = env
    monkeypatch.delenv("MFUTILS_DATA_MIRROR")
    url = re.escape("http://127.0.0.1:9/ml-latest-small.zip")
    pattern = (rf"could not download {url}.*cached in {re.escape(str(cache / 'ml-latest-small'))}.*"
               r"set the environment variable MFUTILS_DATA_MIRROR to a folder holding ml-latest-small\.zip")
    with pytest.raises(MovieLensError, match=pattern):
        load_movielens("ml-latest-small")


@pytest.mark.parametrize("tqdm_disable, progress, shown", [("1", True, False), ("", False, False),
                                                          ("", True, True)])
def test_progress_bar_is_silent_under_tqdm_disable(server, monkeypatch, capfd, tqdm_disable, progress, shown):
    monkeypatch.setenv("TQDM_DISABLE", tqdm_disable)
    server.payload = _zip_bytes(_tab_members())
    _pin(monkeypatch, "ml-100k", server.payload)
    load_movielens("ml-100k", progress=progress)
    out, err = capfd.readouterr()
    assert ("downloading ml-100k" in err) == shown and out == ""


# ---------------------------------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    if not (MIRROR / "ml-100k.zip").is_file():
        pytest.fail(f"no MovieLens mirror at {MIRROR}: set MFUTILS_DATA_MIRROR to the folder holding "
                    f"ml-100k.zip and ml-latest-small.zip (the repo's ../shared/data)")
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture
def real(real_cache, monkeypatch) -> Path:
    monkeypatch.setenv("MFUTILS_DATA_MIRROR", str(MIRROR))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(movielens, "_BASE_URL", "http://127.0.0.1:9/")
    return real_cache


@pytest.mark.slow
def test_real_ml100k_has_the_published_counts_and_latin1_titles(real):
    data = load_movielens("ml-100k", cache_dir=real)
    assert (data.n_ratings, data.n_users, data.n_items) == (100_000, 943, 1_682)
    assert "Misérables, Les (1995)" in set(data.item_titles)
    assert data.item_titles[0] == "Toy Story (1995)" and data.item_genres[0] == "Animation|Children's|Comedy"
    assert set(data.rating.unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.slow
def test_real_ml_latest_small_has_the_published_counts_and_half_stars(real):
    data = load_movielens("ml-latest-small", cache_dir=real)
    assert (data.n_ratings, data.n_users, data.n_items) == (100_836, 610, 9_724)
    assert set(data.rating.unique().tolist()) == {k / 2 for k in range(1, 11)}
    assert data.item_titles is not None and not any(t is None or t != t for t in data.item_titles)


@pytest.mark.slow
def test_real_ml100k_folds_are_disjoint_and_each_makes_up_u_data(real):
    full = load_movielens("ml-100k", cache_dir=real)
    n_items = full.n_items
    everything = np.sort((full.user_idx * n_items + full.item_idx).numpy())
    for fold in range(1, 6):
        train, test = load_ml100k_fold(fold, cache_dir=real)
        assert (train.n_ratings, test.n_ratings) == (80_000, 20_000)
        assert (train.n_users, train.n_items, test.n_users, test.n_items) == (943, 1682, 943, 1682)
        keys = [(d.user_idx * n_items + d.item_idx).numpy() for d in (train, test)]
        assert np.intersect1d(*keys).size == 0
        assert np.array_equal(np.sort(np.concatenate(keys)), everything)
