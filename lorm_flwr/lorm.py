"""LoRM's client-side statistics: the products a client uploads instead of raw factors.

Only sums over clients enter LoRM's closed-form steps (algorithms.md), so in an
A-round a client sends ``A_i G_i`` and ``G_i``; in a B-round ``B_i A G_i A^T`` and
``A G_i A^T``; for the head ``W_i G_i`` and ``G_i``. Pure torch, no Flower.
"""

from __future__ import annotations

import torch

from lorm_flwr import protocol as P
from lorm_flwr.merge import _times_gram, project_gram
from lorm_flwr.models.adapters import AdaptedLayer

__all__ = ["expected_stats", "lorm_products", "matrix", "regmean_products"]


def matrix(t: torch.Tensor) -> torch.Tensor:
    """(r, k, 1, 1) conv factor -> (r, k); 2-D tensors unchanged."""
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t


def lorm_products(
    kind: str,
    tensors: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    layers: list[AdaptedLayer],
    head_name: str,
    head_weight_key: str,
    *,
    codes: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``stats`` record of a LoRM reply (fp32 on the wire; the server solves in fp64).

    Products with a Gram run in the Gram's dtype: fp32 for a one-batch pass,
    whose result is sent as fp32 anyway.

    ``grams[name]`` is the layer's input Gram ``G~`` (k, k) or (k,); with
    ``codes=True`` (B-rounds only) it is already ``A G~ A^T: (r, r)``, recorded
    without forming ``G~`` (:func:`lorm_flwr.gram.layer_grams` ``projections``).
    """
    if codes and kind != P.STATS_LORM_B:
        raise ValueError("code Grams (A G A^T) only serve a B-round")
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        g = grams[layer.name]
        a = matrix(tensors[layer.a_key])
        if kind == P.STATS_LORM_A:
            out[P.stat_key(layer.name, P.STAT_AG)] = _times_gram(a.to(g.dtype), g)
            out[P.stat_key(layer.name, P.STAT_G)] = g
        elif kind == P.STATS_LORM_B:
            b = matrix(tensors[layer.b_key]).double()
            aga = g.double() if codes else project_gram(a, g)  # (r, r)
            out[P.stat_key(layer.name, P.STAT_BAGA)] = b @ aga
            out[P.stat_key(layer.name, P.STAT_AGA)] = aga
        else:
            raise ValueError(f"unknown LoRM statistics kind {kind!r}")
    gh = grams[head_name]
    out[P.stat_key(head_name, P.STAT_WG)] = _times_gram(tensors[head_weight_key].to(gh.dtype), gh)
    out[P.stat_key(head_name, P.STAT_G)] = gh
    return {k: v.float() for k, v in out.items()}


def regmean_products(
    tensors: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    layers: list[AdaptedLayer],
    head_name: str,
    head_weight_key: str,
) -> dict[str, torch.Tensor]:
    """RegMean of whole LoRA deltas: ``s B_i A_i G_i`` and ``G_i`` per layer; head as LoRM."""
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        g = grams[layer.name]
        delta = layer.scaling * matrix(tensors[layer.b_key]).double() @ matrix(tensors[layer.a_key]).double()
        out[P.stat_key(layer.name, P.STAT_DG)] = _times_gram(delta.to(g.dtype), g)
        out[P.stat_key(layer.name, P.STAT_G)] = g
    gh = grams[head_name]
    out[P.stat_key(head_name, P.STAT_WG)] = _times_gram(tensors[head_weight_key].to(gh.dtype), gh)
    out[P.stat_key(head_name, P.STAT_G)] = gh
    return {k: v.float() for k, v in out.items()}


def expected_stats(
    kind: str,
    layers: list[AdaptedLayer],
    head_name: str,
    head_shape: tuple[int, int],
    gram_alpha: float,
    head_gram_alpha: float,
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a valid ``stats`` record of kind ``kind``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        k, r, d = layer.d_in, layer.rank, layer.d_out
        if kind == P.STATS_LORM_A:
            shapes[P.stat_key(layer.name, P.STAT_AG)] = (r, k)
            shapes[P.stat_key(layer.name, P.STAT_G)] = (k,) if gram_alpha == 0 else (k, k)
        elif kind == P.STATS_LORM_B:
            shapes[P.stat_key(layer.name, P.STAT_BAGA)] = (d, r)
            shapes[P.stat_key(layer.name, P.STAT_AGA)] = (r, r)
        elif kind == P.STATS_REGMEAN:
            shapes[P.stat_key(layer.name, P.STAT_DG)] = (d, k)
            shapes[P.stat_key(layer.name, P.STAT_G)] = (k,) if gram_alpha == 0 else (k, k)
        elif kind == P.STATS_GRAMS:
            shapes[P.stat_key(layer.name, P.STAT_G)] = (k,) if gram_alpha == 0 else (k, k)
    if kind in (P.STATS_LORM_A, P.STATS_LORM_B, P.STATS_REGMEAN):
        c, f = head_shape
        shapes[P.stat_key(head_name, P.STAT_WG)] = (c, f)
        shapes[P.stat_key(head_name, P.STAT_G)] = (f,) if head_gram_alpha == 0 else (f, f)
    return shapes
