"""mfutils: matrix factorization for collaborative filtering in PyTorch, the package behind the book.

Notebooks import the rooms they need: ``from mfutils import data, models, train, metrics``.
``python -m mfutils train RATINGS`` trains the book's best model on a ratings file (see ``--help``).
"""
from __future__ import annotations

from mfutils import bpmf, data, metrics, models, movielens, plot, recommend, synthetic, train
from mfutils.bpmf import fit_bpmf
from mfutils.data import RatingData, from_arrays, per_user_split, random_split, temporal_split
from mfutils.movielens import DATASETS, MovieLensError, load_ml100k_fold, load_movielens
from mfutils.metrics import mae, rmse
from mfutils.models import BiasedMF, DenseMF
from mfutils.synthetic import SyntheticTruth
from mfutils.train import History, fit_als, fit_sgd, make_generator, resolve_device, seed_everything

__version__ = "0.1.0"
__all__ = ["bpmf", "data", "metrics", "models", "movielens", "plot", "recommend", "synthetic", "train",
           "RatingData", "from_arrays", "random_split", "per_user_split", "temporal_split",
           "DATASETS", "MovieLensError", "load_movielens", "load_ml100k_fold", "SyntheticTruth",
           "DenseMF", "BiasedMF", "History", "fit_sgd", "fit_als", "fit_bpmf", "resolve_device",
           "seed_everything", "make_generator", "rmse", "mae"]
