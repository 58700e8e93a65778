"""`make execute`: re-execute notebooks in place and record how long each took.

Each notebook runs through the same nbconvert command as always (one kernel, no timing metadata, so the
stored outputs carry no timestamps); the wall time of that command, kernel start included, goes to
``book/results/execution.json`` with a description of the notebook (:func:`describe`), which the
execution-statistics appendix and the instructors' guide render. Notebooks that read that file run last,
whenever any notebook was executed: once timed, then once more untimed, so what they show is the file as it
stands, their own times included. A notebook that fails stops the run; its time is not recorded.

Usage: ``python book/_ext/execute_notebooks.py [NOTEBOOK ...]`` (all of ``notebooks/`` by default).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mfutils.bench import _cpu_model  # where timings were taken: the same CPU name the benchmarks record

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "book" / "results" / "execution.json"
NBCONVERT = ["-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
             "--ExecutePreprocessor.timeout=300", "--ExecutePreprocessor.record_timing=False",
             "--ExecutePreprocessor.kernel_name=python3"]


def reads_statistics(path: Path) -> bool:
    """Whether a notebook renders ``execution.json`` (then it must run after the others)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return any("execution.json" in "".join(c["source"]) for c in cells if c["cell_type"] == "code")


def title(path: Path) -> str:
    """The notebook's first heading, which is how the table of contents names the page."""
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        for line in "".join(cell["source"]).splitlines():
            if cell["cell_type"] == "markdown" and line.startswith("# "):
                return line[2:].strip()
    return path.stem


def describe(path: Path) -> dict:
    """What an instructor plans with: prose length, code cells, figures, exercises (and which ones check the
    student's answer), the chapter's learning objectives and required knowledge, read from the notebook."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    prose = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    code = [c for c in cells if c["cell_type"] == "code" and "remove-cell" not in c["metadata"].get("tags", [])]
    objectives = re.search(r"you will learn to:\n\n((?:- .*\n?)+)", prose)
    required = re.search(r"\*\*Required knowledge:\*\*\s*(.*)", prose)
    return {
        "title": title(path),
        "words": len(prose.split()),
        "code_cells": len(code),
        "figures": sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])),
        "exercises": len(re.findall(r"\{admonition\} Exercise \d+", prose)),
        "checked_exercises": sorted({int(n) for c in code
                                     for n in re.findall(r'check\("Exercise (\d+)"', "".join(c["source"]))}),
        "objectives": [line[2:].strip() for line in objectives.group(1).splitlines()] if objectives else [],
        "required": required.group(1).strip() if required else "",
    }


def _load() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text(encoding="utf-8"))
    return {"about": "wall seconds of `make execute` per notebook (nbconvert, kernel start included), "
                     "one thread per process", "notebooks": {}}


def _save(stats: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, prefix=".execution-", suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, RESULTS)


def execute(path: Path, stats: dict, *, record: bool = True) -> None:
    again = "" if record else " again, to show the final times"
    print(f"executing {path.relative_to(ROOT)}{again}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *NBCONVERT, str(path)], cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {path.relative_to(ROOT)} failed to execute (exit {proc.returncode}); "
                 "its outputs were not rewritten and its time was not recorded")
    if not record:
        return
    stats["notebooks"][path.name] = describe(path) | {
        "seconds": round(seconds, 2), "date": datetime.date.today().isoformat(),
        "cpu": _cpu_model(), "cores": os.cpu_count(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None}
    _save(stats)
    print(f"  {seconds:.1f} s", flush=True)


def main(argv: list[str]) -> int:
    everything = sorted((ROOT / "notebooks").glob("*.ipynb"))
    chosen = [Path(a).resolve() for a in argv] or everything
    for path in chosen:
        if not path.is_file() or path.suffix != ".ipynb":
            print(f"error: {path} is not a notebook; name files under notebooks/, e.g. "
                  "make execute NB=notebooks/01_meet_the_data.ipynb", file=sys.stderr)
            return 2
    stats = _load()
    stats["notebooks"] = {k: v | describe(ROOT / "notebooks" / k)  # the notebooks as they read now
                          for k, v in stats["notebooks"].items() if (ROOT / "notebooks" / k).is_file()}
    _save(stats)
    last = [p for p in everything if reads_statistics(p)]
    for path in [p for p in chosen if p not in last] + last:
        execute(path, stats)
    for path in last:
        execute(path, stats, record=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
