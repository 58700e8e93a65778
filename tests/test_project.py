"""The project's own files agree with each other: one source of pinned versions, no data in git."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


def test_every_requirement_is_pinned_exactly():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in requirement_lines(name):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][0-9A-Za-z.+\-]*", line), f"{name}: {line!r} is not pinned"


def test_torch_is_pinned_to_the_cpu_wheel_version():
    assert "torch==2.13.0" in requirement_lines("requirements.txt")


def test_pyproject_and_environment_read_the_same_requirement_files():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dynamic = meta["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    assert dynamic["optional-dependencies"]["dev"]["file"] == ["requirements-dev.txt"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip and "-r requirements-dev.txt" in pip
    assert not [p for p in pip if "==" in p], "environment.yml repeats a pin; keep pins in requirements*.txt"


def test_sphinx_skips_hidden_folders_and_builds():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    for pattern in (".*", "**/.*", "_build", ".venv"):
        assert pattern in config["exclude_patterns"]
    assert config["execute"]["execute_notebooks"] == "off"


def test_no_dataset_is_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    data = [f for f in tracked.split() if re.search(r"\.(zip|dat|gz)$|(^|/)u\.(data|item)$|ratings\.csv$", f)]
    assert not data, f"dataset files are committed (MovieLens may not be redistributed): {data}"


def test_no_code_hard_codes_a_gpu():
    """One `device` argument everywhere: no `.cuda()` in the package, the tests or any notebook's code cells."""
    import json

    sources = {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "mfutils").glob("*.py")}
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb.name] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    offenders = [name for name, text in sources.items() if re.search(r"\.cuda\(\s*\)", text)]
    assert not offenders, f"hard-coded .cuda() calls in {offenders}; take a device argument and use .to(device)"


def test_binder_gets_the_cpu_build_of_torch():
    """Binder builds from environment.yml: PyTorch's CPU index must come first, or pip pulls the CUDA build."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip
    assert "-e ." in pip, "Binder must install mfutils from the repository"
