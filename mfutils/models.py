r"""Matrix-factorization models: a dense toy (:class:`DenseMF`) and the real one (:class:`BiasedMF`).

Both approximate the rating matrix :math:`R` (``n_users × n_items``, mostly unobserved) by a product of
two thin matrices, :math:`P` (``user_factors``, ``n_users × n_factors``) and :math:`Q` (``item_factors``,
``n_items × n_factors``). :class:`DenseMF` builds all of :math:`PQ^\top` and masks it; :class:`BiasedMF`
gathers only the rows it needs. The two losses below agree on the same observed entries, value and
gradient, which is why the sparse model is a drop-in replacement for the dense one.

Parameters are drawn on the CPU from a seeded :class:`torch.Generator` and then moved to ``device``, so
a CPU run and a GPU run start from the same numbers.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DenseMF", "BiasedMF", "dense_masked_loss", "gathered_loss"]

_CHUNK = 1 << 12  # pairs per step in BiasedMF.predict: bounds the (chunk, n_factors) temporaries; at 1 << 16 a
# 256-factor model predicted 20k pairs ~5x slower, mostly faulting in fresh pages for its large temporaries


def _normal(shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """float32 N(0, std²) draws on the CPU from a private generator (the global RNG is never touched)."""
    if std == 0:  # the same values as zero-scaled draws, without drawing them
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * std


def _check_sizes(n_users: int, n_items: int, n_factors: int, init_std: float, who: str) -> None:
    for name, value in (("n_users", n_users), ("n_items", n_items), ("n_factors", n_factors)):
        if int(value) != value or value < 1:
            raise ValueError(f"{who}: {name} must be a positive integer; got {value!r}")
    if not init_std >= 0:
        raise ValueError(f"{who}: init_std must be >= 0; got {init_std!r}")


def dense_masked_loss(user_factors: torch.Tensor, item_factors: torch.Tensor, R: torch.Tensor,
                      mask: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    r"""Mean squared error over the observed cells of a dense matrix, plus the per-rating L2 penalty.

    .. math::
        L = \frac{1}{|\Omega|} \sum_{(u,i)\in\Omega} \Big[(r_{ui} - p_u^\top q_i)^2
            + \lambda\,(\lVert p_u\rVert^2 + \lVert q_i\rVert^2)\Big]
          = \frac{1}{|\Omega|}\Big[\sum_{\Omega} e_{ui}^2 + \lambda \sum_u n_u \lVert p_u\rVert^2
            + \lambda \sum_i n_i \lVert q_i\rVert^2\Big],

    where :math:`\Omega` is the set of observed cells (``mask`` true) and :math:`n_u`, :math:`n_i` count
    them per row and column. Unobserved cells contribute nothing, whatever finite value ``R`` holds there (the
    error is multiplied by the mask, so a NaN or infinity there would still spread).

    Args:
        user_factors: float32 :math:`P`, shape ``(n_users, n_factors)``.
        item_factors: float32 :math:`Q`, shape ``(n_items, n_factors)``, same device.
        R: float32 ratings, shape ``(n_users, n_items)``.
        mask: bool, shape ``(n_users, n_items)``; true where a rating is observed.
        reg: :math:`\lambda \ge 0`.
    Returns:
        A float32 scalar tensor.
    """
    mask = mask.to(R.dtype)
    n_observed = mask.sum()
    err2 = (user_factors @ item_factors.T - R) ** 2  # (n_users, n_items)
    loss = (err2 * mask).sum()
    if reg:
        n_u, n_i = mask.sum(1), mask.sum(0)  # (n_users,), (n_items,)
        loss = loss + reg * ((n_u * user_factors.pow(2).sum(1)).sum()
                             + (n_i * item_factors.pow(2).sum(1)).sum())
    return loss / n_observed


def gathered_loss(user_factors: torch.Tensor, item_factors: torch.Tensor, user_idx: torch.Tensor,
                  item_idx: torch.Tensor, rating: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
    r"""The same loss as :func:`dense_masked_loss`, computed only on the listed ratings.

    .. math:: L = \frac{1}{B}\sum_{b=1}^{B} \Big[(r_b - p_{u_b}^\top q_{i_b})^2
              + \lambda\,(\lVert p_{u_b}\rVert^2 + \lVert q_{i_b}\rVert^2)\Big]

    Memory is :math:`O(B \cdot k)` instead of :math:`O(n_\text{users} n_\text{items})`.

    Args:
        user_factors: float32, shape ``(n_users, n_factors)``.
        item_factors: float32, shape ``(n_items, n_factors)``.
        user_idx, item_idx: int64, shape ``(B,)``, same device.
        rating: float32, shape ``(B,)``.
        reg: :math:`\lambda \ge 0`.
    Returns:
        A float32 scalar tensor.
    """
    p, q = user_factors[user_idx], item_factors[item_idx]  # (B, n_factors) each
    err2 = (rating - (p * q).sum(1)) ** 2  # (B,)
    return (err2 + reg * (p.pow(2).sum(1) + q.pow(2).sum(1))).mean()


class DenseMF(nn.Module):
    r"""Plain :math:`\hat R = P Q^\top` for matrices small enough to hold densely (the toy chapters).

    Args:
        n_users, n_items: matrix shape.
        n_factors: rank :math:`k`.
        init_std: standard deviation of the normal initialisation.
        seed: seeds the CPU generator that draws :math:`P` then :math:`Q`.
        device: where the parameters live.

    Attributes:
        user_factors: :class:`~torch.nn.Parameter`, float32, shape ``(n_users, n_factors)``.
        item_factors: :class:`~torch.nn.Parameter`, float32, shape ``(n_items, n_factors)``.
    """

    def __init__(self, n_users: int, n_items: int, n_factors: int, *, init_std: float = 0.1,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        super().__init__()
        _check_sizes(n_users, n_items, n_factors, init_std, "DenseMF()")
        init = _normal((n_users + n_items, n_factors), init_std, seed)
        self.user_factors = nn.Parameter(init[:n_users].clone())
        self.item_factors = nn.Parameter(init[n_users:].clone())
        self.to(device)

    def forward(self) -> torch.Tensor:
        r"""The full reconstruction :math:`PQ^\top`, float32, shape ``(n_users, n_items)``."""
        return self.user_factors @ self.item_factors.T

    def loss(self, R: torch.Tensor, mask: torch.Tensor, reg: float = 0.0) -> torch.Tensor:
        r""":func:`dense_masked_loss` of this model on ``R`` observed where ``mask`` is true."""
        return dense_masked_loss(self.user_factors, self.item_factors, R, mask, reg)


class BiasedMF(nn.Module):
    r"""Biased matrix factorization, :math:`\hat r_{ui} = \mu + b_u + b_i + p_u^\top q_i`.

    Parameters are :class:`~torch.nn.Embedding` tables, so a batch touches only its own rows; with
    ``sparse=True`` their gradients are sparse too (use ``optim.SGD`` or ``optim.SparseAdam``).

    **Regulariser.** :meth:`penalty` charges every observed rating for the parameters it touches, so the
    training objective (the one :func:`mfutils.train.fit_sgd` and :func:`mfutils.train.fit_als` minimise) is

    .. math::
        L = \frac{1}{N}\sum_{(u,i)} \Big[(r_{ui} - \hat r_{ui})^2
            + \lambda\big(\lVert p_u\rVert^2 + \lVert q_i\rVert^2 + b_u^2 + b_i^2\big)\Big],

    which is the "weighted-λ" form :math:`\lambda\sum_u n_u\lVert p_u\rVert^2 + \dots`: a user with
    :math:`n_u` ratings is shrunk :math:`n_u` times. Surprise's ``SVD`` uses the same λ (its per-rating
    update :math:`p_u \leftarrow p_u + \gamma(e_{ui} q_i - \lambda p_u)` is a step on this objective).

    **Weight decay is not the same thing.** ``weight_decay=wd`` adds :math:`wd \cdot p_u` to the gradient
    of *every* row at *every* step, rated or not. Over an epoch of minibatches of mean loss, the penalty
    above adds :math:`2\lambda n_u / B` per epoch while weight decay adds :math:`wd \cdot N/B`, so they match
    row by row only when :math:`wd = 2\lambda n_u / N`; a single ``wd`` equals the λ of an average user
    (:math:`n_u = N/n_\text{users}`, i.e. :math:`wd = 2\lambda/n_\text{users}`) and shrinks rarely-rated
    users relatively harder. With Adam, weight decay is also rescaled by the adaptive step.

    Args:
        n_users, n_items: number of users and items (the RatingData's ``n_users``, ``n_items``).
        n_factors: rank :math:`k`.
        global_mean: :math:`\mu`, usually the mean training rating (a buffer, not learned).
        init_std: factors start as :math:`\mathcal N(0, \text{init\_std}^2)`; biases start at 0.
        biases: include :math:`b_u, b_i`. Without them ``user_bias`` and ``item_bias`` are ``None``.
        sparse: sparse embedding gradients.
        seed: seeds the CPU generator that draws :math:`P` then :math:`Q`.
        device: where parameters and the ``global_mean`` buffer live.

    Attributes:
        user_factors: ``Embedding`` with float32 weight of shape ``(n_users, n_factors)``.
        item_factors: ``Embedding``, weight ``(n_items, n_factors)``.
        user_bias, item_bias: ``Embedding`` with weight ``(n_users, 1)`` / ``(n_items, 1)``, or ``None``.
        global_mean: float32 scalar buffer.
    """

    def __init__(self, n_users: int, n_items: int, n_factors: int, *, global_mean: float = 0.0,
                 init_std: float = 0.1, biases: bool = True, sparse: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        _check_sizes(n_users, n_items, n_factors, init_std, "BiasedMF()")
        init = _normal((n_users + n_items, n_factors), init_std, seed)

        def table(weight: torch.Tensor) -> nn.Embedding:  # from_pretrained: no draw from the global RNG
            return nn.Embedding.from_pretrained(weight.clone(), freeze=False, sparse=sparse)

        self.user_factors, self.item_factors = table(init[:n_users]), table(init[n_users:])
        self.user_bias = table(torch.zeros(n_users, 1)) if biases else None
        self.item_bias = table(torch.zeros(n_items, 1)) if biases else None
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        self.to(device)

    @property
    def n_users(self) -> int:
        return self.user_factors.num_embeddings

    @property
    def n_items(self) -> int:
        return self.item_factors.num_embeddings

    @property
    def n_factors(self) -> int:
        return self.user_factors.embedding_dim

    @property
    def device(self) -> torch.device:
        return self.user_factors.weight.device

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        r"""Predicted ratings :math:`\hat r_{ui} = \mu + b_u + b_i + p_u^\top q_i` for known ids.

        Args:
            user_idx: int64 user numbers in ``0..n_users-1``, shape ``(B,)``, on the model's device.
            item_idx: int64 item numbers in ``0..n_items-1``, shape ``(B,)``.
        Returns:
            float32 tensor of shape ``(B,)``, not clipped. Use :meth:`predict` for unknown ids.
        """
        p, q = self.user_factors(user_idx), self.item_factors(item_idx)  # (B, n_factors) each
        pred = (p * q).sum(1) + self.global_mean  # row-wise dot product: (B,)
        if self.user_bias is not None:
            pred = pred + self.user_bias(user_idx).squeeze(1) + self.item_bias(item_idx).squeeze(1)
        return pred

    def penalty(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        r"""Per-rating L2 term :math:`\lVert p_u\rVert^2 + \lVert q_i\rVert^2 + b_u^2 + b_i^2`, shape ``(B,)``."""
        pen = self.user_factors(user_idx).pow(2).sum(1) + self.item_factors(item_idx).pow(2).sum(1)
        if self.user_bias is not None:
            pen = pen + self.user_bias(user_idx).squeeze(1) ** 2 + self.item_bias(item_idx).squeeze(1) ** 2
        return pen  # (B,)

    @torch.no_grad()
    def predict(self, user_idx: torch.Tensor, item_idx: torch.Tensor, *,
                clip: tuple[float, float] | None = None) -> torch.Tensor:
        r"""Like :meth:`forward`, but safe for users and items the model never saw.

        A number outside ``0..n-1`` (e.g. ``-1`` for "unknown") drops every term that needs it:
        an unknown user gets :math:`\mu + b_i`, an unknown item :math:`\mu + b_u`, both :math:`\mu`.
        Works through the pairs in chunks, so memory stays bounded for millions of pairs.

        Args:
            user_idx, item_idx: int64, shape ``(B,)``; any values, on any device.
            clip: ``(low, high)`` rating range to clamp predictions to, or ``None``.
        Returns:
            float32 tensor of shape ``(B,)`` on the model's device, never NaN.
        """
        user_idx, item_idx = user_idx.to(self.device), item_idx.to(self.device)
        pred = torch.cat([self._predict_chunk(u, i) for u, i in zip(user_idx.split(_CHUNK), item_idx.split(_CHUNK))]
                         ) if len(user_idx) else torch.zeros(0, device=self.device)
        return pred.clamp(*clip) if clip is not None else pred

    def _predict_chunk(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        known_u = (user_idx >= 0) & (user_idx < self.n_users)  # (B,) bool
        known_i = (item_idx >= 0) & (item_idx < self.n_items)
        u, i = torch.where(known_u, user_idx, 0), torch.where(known_i, item_idx, 0)
        dot = (self.user_factors(u) * self.item_factors(i)).sum(1)  # (B, n_factors) -> (B,)
        pred = self.global_mean + torch.where(known_u & known_i, dot, 0.0)
        if self.user_bias is not None:
            pred = pred + torch.where(known_u, self.user_bias(u).squeeze(1), 0.0)
            pred = pred + torch.where(known_i, self.item_bias(i).squeeze(1), 0.0)
        return pred  # (B,)
