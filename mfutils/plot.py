"""Figures for the book: one look everywhere, labelled axes with units, captions from cell metadata."""
from __future__ import annotations

import matplotlib as mpl

__all__ = ["use_book_style"]


def use_book_style() -> None:
    """Set the book's figure defaults: size, line width, grid; no titles (captions live in the page)."""
    mpl.rcParams.update({
        "figure.figsize": (6.4, 3.6),
        "figure.dpi": 100,
        "lines.linewidth": 2,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "savefig.bbox": "tight",
    })
