"""mfutils.book: the notebooks' setup cell, glue without myst-nb, results files, and the exercise checks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager

from mfutils import book

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def first_code_cell(path: Path) -> dict:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return next(c for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_notebook_starts_by_making_mfutils_importable(path):
    cell = first_code_cell(path)
    source = "".join(cell["source"])
    assert "import mfutils" in source and f"git+{book.REPOSITORY}" in source, (
        f"{path.name}: the first code cell must install mfutils from {book.REPOSITORY} where it is missing")
    assert "--no-deps" in source, f"{path.name}: the install must not replace Colab's torch (use --no-deps)"
    assert cell["outputs"] == [], f"{path.name}: the setup cell prints nothing where mfutils is installed"
    assert "remove-cell" in cell["metadata"].get("tags", []), f"{path.name}: the setup cell is not on the page"
    python = TransformerManager().transform_cell(source)
    compile(python, path.name, "exec")  # the %pip line becomes valid Python inside the except branch
    assert "get_ipython().run_line_magic('pip'" in python


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_glue_through_mfutils_book(path):
    text = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert "from myst_nb" not in text, f"{path.name}: import glue from mfutils.book so the notebook runs in Colab"
    assert "../book/results" not in text, f"{path.name}: read results through mfutils.book.results_file()"


def test_glue_without_myst_nb_shows_only_what_is_displayed(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import fails as in Colab
    book.glue("hidden", 1.25, display=False)
    assert capsys.readouterr().out == ""
    book.glue("shown", 2.5)
    assert capsys.readouterr().out.strip() == "2.5"


def test_results_file_in_a_clone_never_downloads(served):
    assert book.results_file("folds.json") == ROOT / "book" / "results" / "folds.json"
    assert book.results_file("remote.json", required=False, url=served) is None  # not recorded here
    with pytest.raises(FileNotFoundError, match="is not in"):
        book.results_file("remote.json", url=served)


@pytest.fixture
def installed_alone(monkeypatch, tmp_path):
    """As in Colab: the package without the book's folders beside it, and an empty cache."""
    monkeypatch.setattr(book, "_checkout_results", lambda: tmp_path / "no-checkout")
    monkeypatch.setenv("MFUTILS_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def served(tmp_path, serve_folder):
    """A local web server standing in for the repository's raw files."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "remote.json").write_text('{"ok": true}')
    with serve_folder(folder) as url:
        yield url + "/{name}"


def test_results_file_downloads_once_into_the_cache(installed_alone, tmp_path, served):
    path = book.results_file("remote.json", url=served)
    assert path == tmp_path / "cache" / "results" / "remote.json"
    assert json.loads(path.read_text()) == {"ok": True}
    assert sorted(p.name for p in path.parent.iterdir()) == ["remote.json"]  # no temporary file left
    (tmp_path / "remote" / "remote.json").unlink()
    assert book.results_file("remote.json", url=served) == path  # the cached copy, no second download


def test_results_file_missing(installed_alone, tmp_path, served):
    assert book.results_file("devices_none.json", required=False, url=served) is None
    with pytest.raises(FileNotFoundError, match="clone the book's repository"):
        book.results_file("devices_none.json", url=served)
    assert not (tmp_path / "cache" / "results" / "devices_none.json").exists()
    with pytest.raises(ValueError, match="bare file name"):
        book.results_file("../secrets.json")


@pytest.mark.parametrize(("answer", "expected", "right"), [
    (0.38889, (1 / 2 + 2 / 3) / 3, True),
    (0.4, (1 / 2 + 2 / 3) / 3, False),
    (torch.tensor([1.0, 2.0]), [1.0, 2.0005], True),
    (np.array([1, 2, 3]), [1, 2], False),
    ([7, 1, 8], {1, 7, 8}, True),
    ({1, 7}, {1, 7, 8}, False),
    (" Popularity", "popularity", True),
    ({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, True),
    ({"a": 1.0}, {"a": 1.0, "b": 2.0}, False),
    (np.float32(3.0), 3, True),
    (True, True, True),
    ("3", 3, False),
])
def test_check_compares_answers(capsys, answer, expected, right):
    assert book.check("Exercise 1", answer, expected) is right
    out = capsys.readouterr().out
    assert out.startswith("Exercise 1: " + ("right" if right else "not yet"))
    assert str(expected) not in out  # the check never gives the answer away


def test_check_without_an_answer_says_how(capsys):
    assert book.check("Exercise 2", None, 1.0) is False
    assert "put your answer" in capsys.readouterr().out


def test_citation_agrees_with_citation_cff_and_the_book_config():
    import yaml

    from mfutils import __version__

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cff["title"] == book.TITLE == config["title"]
    assert cff["authors"] == [{"name": book.AUTHORS}] and config["author"] == book.AUTHORS
    assert cff["version"] == __version__ and str(book.YEAR) == str(config["copyright"])
    assert cff["repository-code"] == book.REPOSITORY == config["repository"]["url"]
    entry = book.citation()
    assert entry.startswith("@misc{") and entry.count("{") == entry.count("}")
    for fact in (book.TITLE, book.AUTHORS, str(book.YEAR), __version__, book.REPOSITORY):
        assert fact in entry
