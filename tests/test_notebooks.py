"""Checks on the stored notebooks that nbval does not make: one clean run, no machine traces, chapter shape."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHAPTERS = [p for p in NOTEBOOKS if re.match(r"\d\d_", p.name)]  # the guide and the appendices are not chapters
HEADINGS = ["Overview", "Summary", "Exercises", "References"]


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


def test_every_notebook_is_in_the_table_of_contents():
    toc = (ROOT / "_toc.yml").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.stem}" in toc, f"{path.name} is not listed in _toc.yml"
    for doc in re.findall(r"file:\s*(\S+)", toc) + [yaml.safe_load(toc)["root"]]:
        assert any((ROOT / f"{doc}{ext}").is_file() for ext in (".md", ".ipynb")), f"_toc.yml lists missing {doc}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_come_from_one_clean_run(path):
    cells = code_cells(load(path))
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(cells)}; re-run `make execute NB={path}`")
    for c in cells:
        assert "execution" not in c.get("metadata", {}), f"{path.name}: timing metadata stored; use make execute"
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}: an error output is stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_hold_no_machine_paths(path):
    text = json.dumps([c.get("outputs", []) for c in code_cells(load(path))])
    for trace in {str(ROOT), os.path.expanduser("~") + "/", "/tmp/", "site-packages", "Traceback"}:
        assert trace not in text, f"{path.name}: stored outputs mention {trace!r}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_has_the_book_shape(path):
    nb = load(path)
    first = "".join(nb["cells"][0]["source"])
    assert first.startswith("# "), f"{path.name}: the first cell should be the chapter title"
    md = markdown(nb)
    for heading in HEADINGS:
        assert re.search(rf"^## {heading}\b", md, re.M), f"{path.name}: no '## {heading}' section"
    exercises = len(re.findall(r"\{admonition\} Exercise \d+", md))
    solutions = len(re.findall(r"\{dropdown\} Solution to exercise \d+", md))
    assert exercises >= 3, f"{path.name}: {exercises} exercises; each chapter needs at least three"
    assert solutions == exercises, f"{path.name}: {exercises} exercises but {solutions} solution dropdowns"
    assert "{cite}" in md or "{cite:" in md, f"{path.name}: cites nothing from book/references.bib"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_figures_have_captions_and_no_titles(path):
    for c in code_cells(load(path)):
        has_figure = any("image/png" in out.get("data", {}) for out in c.get("outputs", []))
        source = "".join(c["source"])
        assert "set_title" not in source and "plt.title" not in source, (
            f"{path.name}: figures take captions from cell metadata, not titles:\n{source}")
        if has_figure:
            figure = c.get("metadata", {}).get("mystnb", {}).get("figure", {})
            assert figure.get("caption") and figure.get("name"), (
                f"{path.name}: a figure cell lacks mystnb.figure caption/name metadata:\n{source}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_short(path):
    for c in code_cells(load(path)):
        text = "".join("".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
                       for out in c.get("outputs", []))
        assert len(text) < 4000, f"{path.name}: a cell prints {len(text)} characters; print less"


def _execute_script():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "book" / "_ext" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_execution_record_is_current(path):
    """book/results/execution.json (run times, and what the instructors' guide says of each chapter) must
    describe the notebook as it is now: `make execute` rewrites it with the stored outputs."""
    record = json.loads((ROOT / "book" / "results" / "execution.json").read_text())["notebooks"]
    assert path.name in record, f"{path.name} has no recorded run time; run `make execute NB={path.relative_to(ROOT)}`"
    entry, now = record[path.name], _execute_script().describe(path)
    stale = {key: (entry.get(key), value) for key, value in now.items() if entry.get(key) != value}
    assert not stale, f"{path.name}: execution.json is stale {stale}; run `make execute NB={path.relative_to(ROOT)}`"
    assert 0 < entry["seconds"] <= 60, f"{path.name}: recorded run of {entry['seconds']} s; the budget is 60 s"
