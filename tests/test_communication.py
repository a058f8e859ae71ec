"""Communication: LoRM's upload with diagonal Grams stays within FedIT's plus the diagonals."""

from __future__ import annotations

import math

import pytest

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import HEAD, model_layout
from lorm_flwr.runtime import model_of


@pytest.mark.parametrize("kind", [wire.GRAMS_LORM_A, wire.GRAMS_LORM_B])
def test_lorm_upload_at_gram_alpha_zero_is_fedit_plus_diagonals_and_one_head_gram(kind):
    cfg = RunConfig(strategy="lorm", gram_alpha=0.0)  # the default backbone, EfficientNet-Lite0
    layout = model_layout(model_of(cfg))
    fedit = sum(math.prod(s) for s in layout.shapes.values())  # every tensor, every round
    head_shape = layout.shapes[layout.head_weight]
    stats = wire.gram_shapes(kind, layout, 0.0, cfg.head_gram_alpha)
    lorm = sum(math.prod(s) for s in stats.values()) + math.prod(layout.shapes[layout.head_bias])
    diagonals = sum(layer.d_in for layer in layout.layers)
    head_gram = head_shape[1] ** 2
    assert lorm <= fedit + diagonals + head_gram
    # and the backbone Grams really are diagonals
    assert all(len(s) == 1 for k, s in stats.items() if k.endswith("|G") and not k.startswith(HEAD))
