r"""Accuracy metrics: pure functions of tensors (no models, no data containers).

Notation: :math:`\hat r_{ui}` is a prediction, :math:`r_{ui}` the true rating, and the sums run over the
:math:`n` pairs of a test set :math:`\mathcal T`.
"""
from __future__ import annotations

import torch

__all__ = ["rmse", "mae"]


def _errors(pred: torch.Tensor, target: torch.Tensor, who: str) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"{who}: pred and target must have the same shape; got pred {tuple(pred.shape)} "
                         f"and target {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError(f"{who}: pred and target are empty (shape {tuple(pred.shape)}); "
                         f"there is nothing to score")
    # detach: a metric is a number, never part of a graph; float64 keeps the sum exact enough for any n
    return pred.detach().double() - target.detach().to(pred.device).double()


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    r"""Root mean squared error, :math:`\sqrt{\frac1n \sum_{(u,i)\in\mathcal T} (\hat r_{ui} - r_{ui})^2}`.

    Args:
        pred: predictions, any float dtype and shape, on any device.
        target: true ratings, the same shape.
    Returns:
        A Python float.
    Raises:
        ValueError: if the shapes differ or the inputs are empty.
    Example:
        >>> rmse(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 2.0]))  # sqrt((1 + 4) / 2)
        1.5811388300841898
    """
    return float(_errors(pred, target, "rmse()").pow(2).mean().sqrt())


def mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    r"""Mean absolute error, :math:`\frac1n \sum_{(u,i)\in\mathcal T} |\hat r_{ui} - r_{ui}|`.

    Args:
        pred: predictions, any float dtype and shape, on any device.
        target: true ratings, the same shape.
    Returns:
        A Python float.
    Raises:
        ValueError: if the shapes differ or the inputs are empty.
    Example:
        >>> mae(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 2.0]))  # (1 + 2) / 2
        1.5
    """
    return float(_errors(pred, target, "mae()").abs().mean())
