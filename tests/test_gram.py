"""Gram recording with hooks: exact sums, 1x1-conv tokens, diagonals, token masks.

Per-batch products are fp32 (summed in fp64 over several batches; a one-batch
pass keeps its fp32 product), hence the 1e-5 tolerances and the fp64 casts of
one-batch results before comparing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorm_flwr.client.gram import GramRecorder, GramStats, gram_of, layer_grams, tokens_of
from lorm_flwr.math.merge import project_gram, smooth_gram


def test_linear_gram_is_sum_of_outer_products_over_batches():
    lin = nn.Linear(5, 3)
    rec = GramRecorder({"lin": (lin, False)})
    xs = [torch.randn(4, 7, 5), torch.randn(2, 7, 5)]  # (batch, tokens, features)
    with rec.recording():
        for x in xs:
            lin(x)
    X = torch.cat([x.reshape(-1, 5) for x in xs]).double()  # (n, k)
    torch.testing.assert_close(rec.grams()["lin"], X.T @ X, rtol=1e-5, atol=1e-5)
    assert rec.stats["lin"].tokens == 6 * 7
    lin(torch.randn(1, 5))  # hooks removed after the context
    assert rec.stats["lin"].tokens == 42


def test_conv1x1_every_pixel_is_a_token_and_diagonal_mode():
    conv = nn.Conv2d(4, 6, kernel_size=1)
    full = GramRecorder({"c": (conv, True)})
    diag = GramRecorder({"c": (conv, True)}, diagonal=True)
    x = torch.randn(3, 4, 5, 5)
    with full.recording(), diag.recording():
        conv(x)
    X = x.permute(0, 2, 3, 1).reshape(-1, 4).double()  # (3*25, 4)
    torch.testing.assert_close(full.grams()["c"].double(), X.T @ X, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag.grams()["c"].double(), (X * X).sum(0), rtol=1e-5, atol=1e-5)
    assert full.stats["c"].tokens == 75
    assert tokens_of(x, True).shape == (75, 4)


def test_padding_tokens_are_excluded_by_the_mask():
    lin = nn.Linear(3, 2)
    x = torch.randn(2, 4, 3)
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    x_padded = x.clone()
    x_padded[~keep] = 100.0  # padding garbage must not count
    rec = GramRecorder({"lin": (lin, False)}, token_mask=lambda: keep)
    with rec.recording():
        lin(x_padded)
    X = x[keep].double()
    torch.testing.assert_close(rec.grams()["lin"].double(), X.T @ X, rtol=1e-5, atol=1e-5)
    assert rec.stats["lin"].tokens == 5


def test_low_precision_activations_are_never_summed_below_fp32():
    lin = nn.Linear(3, 2).to(torch.bfloat16)
    rec = GramRecorder({"lin": (lin, False)})
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 3, generator=gen).to(torch.bfloat16) for _ in range(2)]
    with rec.recording():
        lin(xs[0])
        assert rec.stats["lin"].gram.dtype == torch.float32  # one batch: its fp32 product as it is
        lin(xs[1])
    assert rec.grams()["lin"].dtype == torch.float64  # summed over batches: fp64
    X = torch.cat(xs).double()
    torch.testing.assert_close(rec.grams()["lin"], X.T @ X, rtol=1e-6, atol=1e-6)  # fp32 products


def test_a_one_batch_gram_is_that_batch_product_and_later_sums_are_fp64():
    t = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    stats = GramStats(diagonal=False)
    stats.add(t)
    assert stats.gram.dtype == torch.float32 and torch.equal(stats.gram, gram_of(t))
    stats.add(t)
    stats.add(t)
    assert stats.gram.dtype == torch.float64 and stats.tokens == 120
    torch.testing.assert_close(
        stats.gram, 3 * t.double().T @ t.double(), rtol=1e-5, atol=1e-5
    )  # fp32 products


def test_wide_gram_from_upper_blocks_equals_one_gemm_and_is_symmetric():
    t = torch.randn(50, 300, dtype=torch.float64)  # 300 > 2 blocks: the blocked path
    g = gram_of(t)
    torch.testing.assert_close(g, t.T @ t)
    assert torch.equal(g[:128, 128:], g[128:, :128].T)  # mirrored, not recomputed


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_projected_gram_is_a_g_at_without_forming_g(alpha):
    """A B-round records (A X)(A X)^T; with smoothing, plus A diag(G) A^T."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel_size=1)
    lin = nn.Linear(5, 2)
    model = nn.Sequential(conv, nn.Flatten(2), _Transpose(), lin)
    x = torch.randn(7, 6, 3, 3)
    A = torch.randn(2, 6)
    targets = {"c": (conv, True), "l": (lin, False)}

    def inputs(batch, device):
        return torch.from_numpy(batch)

    kw = {
        "inputs": inputs,
        "batch_size": 3,
        "device": torch.device("cpu"),
        "alphas": {"c": alpha, "l": alpha},
    }
    plain, n = layer_grams(model, targets, x.numpy(), **kw)
    projected, _ = layer_grams(model, targets, x.numpy(), projections={"c": A}, **kw)
    assert n == 7
    assert projected["c"].shape == (2, 2)
    torch.testing.assert_close(projected["c"], project_gram(A, plain["c"]), rtol=1e-5, atol=1e-5)
    X = x.permute(0, 2, 3, 1).reshape(-1, 6).double()
    G = X.T @ X
    expected = smooth_gram(G, alpha) if alpha > 0 else torch.diagonal(G)
    torch.testing.assert_close(plain["c"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projected["l"], plain["l"])  # not projected: unchanged


class _Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)  # (N, C, HW) -> (N, HW, C)
