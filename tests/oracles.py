"""The list forms of the closed-form merges, from every client's own matrices (test oracles).

The server never sees per-client matrices, only sums (:func:`lorm_flwr.math.merge.merge_from_sums`);
these build the sums from per-client inputs exactly as the clients and the server do
together, so that tests can hold the production solver against an independent
least-squares solution and against the strategies' merges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorm_flwr.math.merge import (
    client_weights,
    gram_sum,
    merge_from_sums,
    project_gram,
    times_gram,
)

Tensor = torch.Tensor


def _check_grams(grams: Sequence[Tensor], k: int) -> bool:
    """Return True when the Grams are diagonals ``(k,)``, False when full ``(k, k)``."""
    if not grams:
        raise ValueError("at least one client is needed")
    diagonal = grams[0].dim() == 1
    for g in grams:
        expected = (k,) if diagonal else (k, k)
        if tuple(g.shape) != expected:
            raise ValueError(
                f"Gram of shape {tuple(g.shape)} does not match {expected}; "
                "Grams must all be full (k, k) or all diagonal (k,)"
            )
    return diagonal


def regmean(
    Ws: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    ridge: float = 0.0,
) -> Tensor:
    """RegMean: ``argmin_W sum_i w_i ||(W - W_i) X_i||^2 = (sum w_i W_i G_i)(sum w_i G_i)^+``.

    Parameters
    ----------
    Ws : list of (d, k) weight matrices, one per client.
    grams : list of (k, k) or (k,) input Grams ``G_i = X_i X_i^T``.
    weights : optional non-negative per-client weights ``w_i``.
    ridge : relative ridge on the summed Gram (0: exact minimum-norm optimum).

    Returns
    -------
    (d, k) tensor in the dtype of ``Ws[0]``.
    """
    k = Ws[0].shape[1]
    _check_grams(grams, k)
    w = client_weights(len(Ws), weights)
    rhs = torch.zeros(Ws[0].shape, dtype=torch.float64, device=Ws[0].device)
    for wi, Wi, g in zip(w, Ws, grams):
        rhs.add_(times_gram(Wi.to(torch.float64), g.to(torch.float64)), alpha=wi)
    return merge_from_sums(rhs, gram_sum(grams, w), ridge).to(Ws[0].dtype)


def merge_lora_a(
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    ridge: float = 0.0,
) -> Tensor:
    """LoRM A-step: ``argmin_A sum_i w_i ||(A - A_i) X_i||^2 = (sum w_i A_i G_i)(sum w_i G_i)^+``.

    For any fixed B the same A minimises ``sum_i w_i ||B (A - A_i) X_i||^2``.

    Parameters
    ----------
    As : list of (r, k) LoRA down-projections.
    grams : list of (k, k) or (k,) input Grams.

    Returns
    -------
    (r, k) tensor in the dtype of ``As[0]``.
    """
    return regmean(As, grams, weights, ridge)


def merge_lora_b(
    Bs: Sequence[Tensor],
    A: Tensor,
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    ridge: float = 0.0,
) -> Tensor:
    """LoRM B-step: ``argmin_B sum_i w_i ||(B - B_i) A X_i||^2``.

    Equal to ``(sum w_i B_i A G_i A^T)(A (sum w_i G_i) A^T)^+``: only an (r, r)
    pseudo-inverse is needed.

    Parameters
    ----------
    Bs : list of (d, r) LoRA up-projections.
    A : (r, k), the down-projection shared by all clients this round.
    grams : list of (k, k) or (k,) input Grams.

    Returns
    -------
    (d, r) tensor in the dtype of ``Bs[0]``.
    """
    _check_grams(grams, A.shape[1])
    w = client_weights(len(Bs), weights)
    projected = [project_gram(A, g) for g in grams]  # each (r, r)
    rhs = torch.zeros(Bs[0].shape, dtype=torch.float64, device=Bs[0].device)
    for wi, Bi, q in zip(w, Bs, projected):
        rhs.add_(Bi.to(torch.float64) @ q, alpha=wi)
    return merge_from_sums(rhs, gram_sum(projected, w), ridge).to(Bs[0].dtype)
