"""``python -m mfutils``: the command-line entry point (see :mod:`mfutils.cli`)."""
from __future__ import annotations

import sys

from mfutils.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
