"""A client's Gram statistics: the products it uploads instead of raw factors.

Only sums over clients enter the closed-form merges, so in a LoRM A-round a client
sends ``A_i G_i`` and ``G_i``; in a B-round ``B_i A G_i A^T`` and ``A G_i A^T``; for
RegMean ``s B_i A_i G_i`` and ``G_i``; for the head ``W_i G_i`` and ``G_i``. Keys and
shapes are declared in :func:`lorm_flwr.wire.gram_shapes` (its keys come from the wire); the
products themselves are plain torch.
"""

from __future__ import annotations

import torch

from lorm_flwr.math.merge import project_gram, times_gram
from lorm_flwr.models.layout import AdaptedLayer, HeadLayer
from lorm_flwr.wire import keys as wire

__all__ = ["gram_products"]


def gram_products(
    kind: str,
    tensors: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    layers: list[AdaptedLayer],
    heads: list[HeadLayer] | tuple[HeadLayer, ...],
    *,
    codes: bool = False,
) -> dict[str, torch.Tensor]:
    """The ``grams`` record of a reply of kind ``kind`` (fp32 on the wire; the server
    solves in fp64).

    Products with a Gram run in the Gram's dtype: fp32 for a one-batch pass, whose
    result is sent as fp32 anyway.

    ``grams[name]`` is the layer's input Gram ``G~`` (k, k) or (k,), and
    ``grams[head.name]`` each head Linear's; with ``codes=True`` (LoRM B-rounds only) a layer's
    entry is already ``A G~ A^T: (r, r)``, recorded without forming ``G~``
    (:func:`lorm_flwr.client.gram.layer_grams` ``projections``).
    """
    if codes and kind != wire.GRAMS_LORM_B:
        raise ValueError("code Grams (A G A^T) only serve a LoRM B-round")
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        g = grams[layer.name]
        a = layer.matrix(tensors[layer.a_key])
        if kind == wire.GRAMS_LORM_A:
            out[wire.gram_key(layer.name, wire.AG)] = times_gram(a.to(g.dtype), g)
            out[wire.gram_key(layer.name, wire.G)] = g
        elif kind == wire.GRAMS_LORM_B:
            b = layer.matrix(tensors[layer.b_key]).double()
            aga = g.double() if codes else project_gram(a, g)  # (r, r)
            out[wire.gram_key(layer.name, wire.BAGA)] = b @ aga
            out[wire.gram_key(layer.name, wire.AGA)] = aga
        elif kind == wire.GRAMS_REGMEAN:
            delta = layer.scaling * layer.matrix(tensors[layer.b_key]).double() @ a.double()
            out[wire.gram_key(layer.name, wire.DG)] = times_gram(delta.to(g.dtype), g)
            out[wire.gram_key(layer.name, wire.G)] = g
        else:
            raise ValueError(f"no Gram products of kind {kind!r}")
    for head in heads:
        gh = grams[head.name]
        out[wire.gram_key(head.name, wire.WG)] = times_gram(
            tensors[head.weight_key].to(gh.dtype), gh
        )
        out[wire.gram_key(head.name, wire.G)] = gh
    return {k: v.float() for k, v in out.items()}
