"""mfutils: matrix factorization for collaborative filtering in PyTorch, the package behind the book.

Notebooks import the rooms they need: ``from mfutils import data, movielens, synthetic, plot``.
"""
from __future__ import annotations

from mfutils import data, movielens, plot, synthetic
from mfutils.data import RatingData, from_arrays, per_user_split, random_split, temporal_split
from mfutils.movielens import DATASETS, MovieLensError, load_ml100k_fold, load_movielens
from mfutils.synthetic import SyntheticTruth

__version__ = "0.1.0"
__all__ = ["data", "movielens", "plot", "synthetic", "RatingData", "from_arrays", "random_split",
           "per_user_split", "temporal_split", "DATASETS", "MovieLensError", "load_movielens",
           "load_ml100k_fold", "SyntheticTruth"]
