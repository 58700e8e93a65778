"""Shared fixtures. Tests run at one thread per process, so float results are bit-reproducible."""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(1)
# The data layer looks for archives here before downloading; point it at the copies beside the repo.
if "MFUTILS_DATA_MIRROR" not in os.environ and (SHARED_DATA / "ml-100k.zip").is_file():
    os.environ["MFUTILS_DATA_MIRROR"] = str(SHARED_DATA)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20260101)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config) -> str:
    missing = "" if "cuda" in DEVICES else " (CUDA is not available here: device tests ran on the CPU only)"
    return f"mfutils devices under test: {', '.join(DEVICES)}{missing}; torch threads: {torch.get_num_threads()}"


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device this machine has; the report header says which ones ran."""
    return torch.device(request.param)


@pytest.fixture
def small_matrix() -> torch.Tensor:
    """A hand-checkable 3x4 rating matrix; 0 marks a missing entry."""
    return torch.tensor([[5.0, 3.0, 0.0, 1.0],
                         [4.0, 0.0, 0.0, 1.0],
                         [1.0, 1.0, 0.0, 5.0]])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _serve(folder: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def serve_folder() -> Callable[[Path], contextlib.AbstractContextManager[str]]:
    """``with serve_folder(path) as url:`` serves a folder on 127.0.0.1 (the built book, stand-in downloads)."""
    return _serve
