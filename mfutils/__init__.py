"""mfutils: matrix factorization for collaborative filtering in PyTorch, the package behind the book."""
from __future__ import annotations

__version__ = "0.1.0"
