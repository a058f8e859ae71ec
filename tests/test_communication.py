"""Communication: LoRM's upload with diagonal Grams stays within FedIT's plus the diagonals."""

from __future__ import annotations

import math

import pytest
import torch

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.symmetric import PackedShape, pack_upper, packed_length, side_of, unpack_upper
from lorm_flwr.models.adapters import HEAD, model_layout
from lorm_flwr.runtime import model_of


@pytest.mark.parametrize("kind", [wire.GRAMS_LORM_A, wire.GRAMS_LORM_B])
def test_lorm_upload_at_gram_alpha_zero_is_fedit_plus_diagonals_and_one_head_gram(kind):
    cfg = RunConfig(strategy="lorm", gram_alpha=0.0)  # the default backbone, EfficientNet-Lite0
    layout = model_layout(model_of(cfg))
    fedit = sum(math.prod(s) for s in layout.shapes.values())  # every tensor, every round
    head_shape = layout.shapes[layout.heads[0].weight_key]
    stats = wire.gram_shapes(kind, layout, 0.0, cfg.head_gram_alpha)
    lorm = sum(math.prod(s) for s in stats.values()) + math.prod(
        layout.shapes[layout.heads[0].bias_key]
    )
    diagonals = sum(layer.d_in for layer in layout.layers)
    head_gram = head_shape[1] ** 2
    assert lorm <= fedit + diagonals + head_gram
    # and the backbone Grams really are diagonals
    assert all(len(s) == 1 for k, s in stats.items() if k.endswith("|G") and not k.startswith(HEAD))


def test_symmetric_statistics_travel_as_their_upper_triangle():
    """The default LoRM A-round upload (gram-alpha=1): 9,526,858 floats per client with whole
    Grams; the upper triangles cut it to at most 0.55 of that."""
    cfg = RunConfig(strategy="lorm")
    layout = model_layout(model_of(cfg))
    spec = wire.train_reply_spec(
        layout, wire.Instructions(0, 1, train_a=True, train_head=True, grams=wire.GRAMS_LORM_A),
        cfg.gram_alpha, cfg.head_gram_alpha,
    )  # fmt: skip
    upload = sum(math.prod(s) for s in [*spec.grams.values(), *spec.arrays.values()])
    whole = sum(
        math.prod(s) if not isinstance(s, PackedShape) else s.side**2
        for s in [*spec.grams.values(), *spec.arrays.values()]
    )
    assert whole == 9_526_858
    assert upload <= 0.55 * whole, upload / whole
    for key, shape in spec.grams.items():  # every full Gram, the head's too
        if key.endswith("|G"):
            assert isinstance(shape, PackedShape) and shape == (shape.side * (shape.side + 1) // 2,)


def test_unpacking_keeps_every_bit_of_the_triangle():
    # Signed zeros, NaN and huge values come back as sent, mirrored below the diagonal.
    k = 40
    packed = torch.randn(packed_length(k))
    packed[1:4] = torch.tensor([-0.0, float("nan"), 3.0e38])  # g[0, 1:4]
    g = unpack_upper(packed, k)
    rows, cols = torch.triu_indices(k, k)
    assert torch.equal(g[rows, cols].view(torch.int32), packed.view(torch.int32))
    assert torch.equal(g.T.contiguous().view(torch.int32), g.view(torch.int32))
    assert torch.signbit(g[1, 0]) and torch.isnan(g[2, 0]) and g[3, 0] == 3.0e38


def test_pack_and_unpack_are_inverse_and_reject_what_is_not_a_triangle():
    g = torch.randn(7, 7, dtype=torch.float64)
    g = g + g.T
    packed = pack_upper(g)
    assert packed.shape == (28,) and packed_length(7) == 28 and side_of(28) == 7
    assert torch.equal(unpack_upper(packed), g)
    assert torch.equal(unpack_upper(packed, 7), g)
    assert torch.equal(packed[:7], g[0])  # row by row, diagonal included
    with pytest.raises(ValueError, match="not the upper triangle"):
        side_of(27)
    with pytest.raises(ValueError, match="square"):
        pack_upper(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="not the upper triangle of 6x6"):
        unpack_upper(packed, 6)
    import pickle

    shape = PackedShape(5)
    again = pickle.loads(pickle.dumps(shape))
    assert again == (15,) and again.side == 5
