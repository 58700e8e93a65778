"""What the book's notebooks need wherever a reader opens them: a local checkout, Binder, or Colab.

- :func:`glue` records a value for the page's prose (myst-nb's ``glue``); where myst-nb is not installed
  (Colab), it shows the value when asked to and records nothing, so every notebook still runs.
- :func:`results_file` finds a committed results file (``book/results/<name>``): in the checkout next to the
  package, else downloaded once from the book's repository into the cache folder.
- :func:`check` tells a student whether an exercise answer is right, without printing the answer.
- :func:`citation` gives the BibTeX entry for citing the book (the same facts as ``CITATION.cff``).
"""
from __future__ import annotations

import math
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["glue", "results_file", "check", "citation", "TITLE", "AUTHORS", "YEAR", "REPOSITORY", "RESULTS_URL"]

TITLE = "Matrix factorization in PyTorch"  # as in _config.yml and CITATION.cff (a test keeps them equal)
AUTHORS = "The mfutils authors"
YEAR = 2026
REPOSITORY = "https://github.com/mf-pytorch-book/mf-pytorch-book"
RESULTS_URL = "https://raw.githubusercontent.com/mf-pytorch-book/mf-pytorch-book/main/book/results/{name}"


def glue(name: str, variable: Any, display: bool = True) -> None:
    """myst-nb's ``glue(name, variable, display)``; without myst-nb, display the value (if asked) and go on."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # Colab: no page to paste into
        if display:
            from IPython.display import display as show
            show(variable)
        return
    myst_glue(name, variable, display=display)


def _checkout_results() -> Path:
    return Path(__file__).resolve().parents[1] / "book" / "results"


def _cache_results() -> Path:
    from mfutils.movielens import _cache_root

    return _cache_root(None) / "results"  # beside the MovieLens archives, in the same cache folder


def results_file(name: str, *, required: bool = True, url: str = RESULTS_URL) -> Path | None:
    """Path of the committed results file ``book/results/<name>``.

    In a clone of the book (the package next to ``book/results``: locally, Binder) only that folder counts,
    and nothing is downloaded. Where only the package was installed (Colab), the file is taken from the
    cache folder (``$MFUTILS_CACHE_DIR/results``, else ``$XDG_CACHE_HOME/mfutils/results``, else
    ``~/.cache/mfutils/results``), or downloaded from
    the book's repository into it.

    Args:
        name: file name, e.g. ``"folds.json"``.
        required: if False, a file that exists nowhere (a GPU sweep not yet recorded) gives None.
        url: download address, ``{name}`` filled in.
    Raises:
        FileNotFoundError: ``required`` and the file is neither local nor downloadable; says what to do.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"results_file(): name must be a bare file name such as 'folds.json'; got {name!r}")
    checkout, target = _checkout_results(), _cache_results() / name
    if checkout.is_dir():  # a clone of the book: a file that is not here has not been recorded
        if (checkout / name).is_file():
            return checkout / name
        if not required:
            return None
        raise FileNotFoundError(f"results file {name!r} is not in {checkout}; the command that writes it is "
                                "named in the notebook that reads it (see also the Makefile's bench targets)")
    if target.is_file():
        return target
    try:
        with urllib.request.urlopen(url.format(name=name), timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as exc:
        if not required:
            return None
        raise FileNotFoundError(
            f"results file {name!r} is not in {_checkout_results()} and could not be downloaded from "
            f"{url.format(name=name)} ({exc}); clone the book's repository ({REPOSITORY}) and run the "
            f"notebook from its notebooks/ folder") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)  # never leave a half-written file
    with os.fdopen(fd, "wb") as out:
        out.write(payload)
    os.replace(tmp, target)
    return target


def _plain(value: Any) -> Any:
    """Tensors and arrays as Python numbers or lists, so answers of any of these types compare alike."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _matches(answer: Any, expected: Any, rel_tol: float, abs_tol: float) -> bool:
    answer, expected = _plain(answer), _plain(expected)
    if isinstance(expected, bool) or isinstance(answer, bool):
        return answer is expected or answer == expected
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        return math.isclose(answer, expected, rel_tol=rel_tol, abs_tol=abs_tol)
    if isinstance(expected, str):
        return isinstance(answer, str) and answer.strip().casefold() == expected.strip().casefold()
    if isinstance(expected, Set):
        return isinstance(answer, (Set, Sequence)) and set(answer) == set(expected)
    if isinstance(expected, Mapping):
        return (isinstance(answer, Mapping) and answer.keys() == expected.keys()
                and all(_matches(answer[k], expected[k], rel_tol, abs_tol) for k in expected))
    if isinstance(expected, Sequence):
        return (isinstance(answer, Sequence) and not isinstance(answer, str) and len(answer) == len(expected)
                and all(_matches(a, e, rel_tol, abs_tol) for a, e in zip(answer, expected)))
    return answer == expected


def check(label: str, answer: Any, expected: Any, *, rel_tol: float = 1e-3, abs_tol: float = 1e-9) -> bool:
    """Print whether ``answer`` matches ``expected`` (numbers within ``rel_tol``/``abs_tol``); never print ``expected``.

    Numbers, strings (case and surrounding spaces ignored), sets, sequences, mappings, tensors and arrays are
    compared element by element. ``answer=None`` prints how to use the check instead.

    Returns:
        True if the answer matches.
    """
    if answer is None:
        print(f"{label}: put your answer in the variable above and run this cell to check it.")
        return False
    right = _matches(answer, expected, rel_tol, abs_tol)
    if right:
        print(f"{label}: right.")
    else:
        tolerance = f" (numbers must agree within {rel_tol:.2%})" if rel_tol else ""
        print(f"{label}: not yet{tolerance}; compare your steps with the chapter and try again.")
    return right


def citation() -> str:
    """BibTeX for the book at this package's version, e.g. for a syllabus or a paper."""
    from mfutils import __version__

    return "\n".join([
        "@misc{mf_pytorch_book,",
        f"  title        = {{{TITLE}}},",
        f"  author       = {{{{{AUTHORS}}}}},",
        f"  year         = {{{YEAR}}},",
        f"  version      = {{{__version__}}},",
        f"  howpublished = {{An executable book, {REPOSITORY}}},",
        f"  url          = {{{REPOSITORY}}}",
        "}"])
