"""LoRM: the strategy's merge equals the pure math; on real activations it beats FedIT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorm_flwr import wire
from lorm_flwr.client.gram import GramRecorder
from lorm_flwr.client.products import gram_products
from lorm_flwr.config import RunConfig
from lorm_flwr.math.merge import smooth_gram, weighted_mean
from lorm_flwr.models.adapters import (
    HEAD,
    adapter_layout,
    attach_lora,
    get_tensors,
    model_layout,
    set_tensors,
)
from lorm_flwr.models.backbones import build_classifier
from lorm_flwr.models.layout import AdaptedLayer
from lorm_flwr.server.rounds import train_exchange
from lorm_flwr.server.strategies.lorm import LoRM
from tests.messages import ScriptedGrid, train_content
from tests.oracles import merge_lora_a, merge_lora_b, regmean

matrix = AdaptedLayer.matrix

TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]


def _model(seed=0, rank=2):
    base = build_classifier("vit-tiny", 16, 10, seed)
    return attach_lora(base, rank=rank, alpha=2.0 * rank, targets=TARGETS)


def _client_tensors(model, seed, which):
    """Global tensors with the trained factor ``which`` (and the head) perturbed."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(get_tensors(model))
    for layer in adapter_layout(model):
        key = layer.a_key if which == "A" else layer.b_key
        out[key] = out[key] + 0.1 * torch.randn(out[key].shape, generator=gen)
    for k in (f"{HEAD}.weight", f"{HEAD}.bias"):
        out[k] = out[k] + 0.1 * torch.randn(out[k].shape, generator=gen)
    return out


def _grams_on(model, tensors, images, alphas):
    """Per-layer and head input Grams of ``model`` loaded with ``tensors``."""
    set_tensors(model, tensors)
    targets = {
        l.name: (model.get_submodule("base_model.model." + l.name), l.is_conv)
        for l in adapter_layout(model)
    }
    targets[HEAD] = (model.get_submodule("base_model.model." + HEAD), False)
    rec = GramRecorder(targets)
    with torch.no_grad(), rec.recording():
        model(images)
    return {n: smooth_gram(g, alphas.get(n, 1.0)) for n, g in rec.grams().items()}


def _close_on_data(got, expected, grams):
    """Relative difference in the data norm, ||(X - Y) S^(1/2)|| / ||Y S^(1/2)||, S = sum G_i.

    Statistics travel as fp32; in directions the summed Gram barely excites, that
    round-off moves the parameters without changing any client's outputs, so the
    merges are compared on the data, where the objective lives.
    """
    S = sum(g.double() if g.dim() == 2 else torch.diag(g.double()) for g in grams)
    d = got.double() - expected.double()
    num = float(torch.trace(d @ S @ d.T))
    den = float(torch.trace(expected.double() @ S @ expected.double().T))
    assert num <= 1e-8 * den, (num, den)


def _strategy(model, **cfg):
    strategy = LoRM(
        RunConfig(strategy="lorm", backbone="vit-tiny", lora_rank=2, **cfg), model_layout(model)
    )
    return strategy


def _run_round(strategy, global_tensors, clients, round_in_task):
    """One round through the real path (exchange, wire checks, merge); -> (merged, log)."""
    kind = strategy.round_plan(round_in_task).grams
    layers = list(strategy.layout.layers)
    script = {}
    for node, (tensors, grams, n) in enumerate(clients, start=1):
        products = gram_products(kind, tensors, grams, layers, strategy.layout.heads)
        arrays = {strategy.layout.heads[0].bias_key: tensors[strategy.layout.heads[0].bias_key]}
        script[node] = train_content(arrays, n, products)
    grid = ScriptedGrid(sorted(script), [script])
    _, merged, log, _ = train_exchange(grid, strategy, dict(global_tensors), round_in_task)
    return merged.tensors, log


def _setup(which, head_alpha=0.5):
    model = _model()
    glob = get_tensors(model)
    clients = []
    for i in range(3):
        t = _client_tensors(model, seed=10 + i, which=which)
        images = torch.randn(2 + i, 3, 16, 16, generator=torch.Generator().manual_seed(i))
        grams = _grams_on(model, t, images, {HEAD: head_alpha})
        clients.append((t, grams, 2 + i))
    return model, glob, clients


def test_strategy_a_round_equals_pure_merges():
    model, glob, clients = _setup("A")
    strategy = _strategy(model)
    merged, _ = _run_round(strategy, glob, clients, round_in_task=1)  # round 1 trains A
    for layer in strategy.layout.layers:
        expected = merge_lora_a(
            [matrix(c[0][layer.a_key]).double() for c in clients],
            [c[1][layer.name] for c in clients],
        )
        _close_on_data(matrix(merged[layer.a_key]), expected, [c[1][layer.name] for c in clients])
        torch.testing.assert_close(merged[layer.b_key], glob[layer.b_key])  # B untouched
    w_key, b_key = strategy.layout.heads[0].weight_key, strategy.layout.heads[0].bias_key
    expected_w = regmean([c[0][w_key].double() for c in clients], [c[1][HEAD] for c in clients])
    _close_on_data(merged[w_key], expected_w, [c[1][HEAD] for c in clients])
    expected_b = weighted_mean([c[0][b_key] for c in clients], [c[2] for c in clients])
    torch.testing.assert_close(merged[b_key], expected_b)


def test_strategy_b_round_equals_pure_merges():
    model, glob, clients = _setup("B")
    strategy = _strategy(model)
    merged, _ = _run_round(strategy, glob, clients, round_in_task=0)  # round 0 trains B
    for layer in strategy.layout.layers:
        A = matrix(glob[layer.a_key]).double()
        expected = merge_lora_b(
            [matrix(c[0][layer.b_key]).double() for c in clients],
            A,
            [c[1][layer.name] for c in clients],
        )
        codes = [
            A @ (g if g.dim() == 2 else torch.diag(g)).double() @ A.T
            for g in (c[1][layer.name] for c in clients)
        ]
        _close_on_data(matrix(merged[layer.b_key]), expected, codes)
        torch.testing.assert_close(merged[layer.a_key], glob[layer.a_key])  # A untouched


def test_on_real_activations_lorm_reproduces_clients_better_than_fedit():
    """Sum over clients of ||W_merged X_i - W_i X_i||^2 on real ViT inputs of each layer."""
    model, glob, clients = _setup("A", head_alpha=1.0)
    for layer in adapter_layout(model):
        grams = [c[1][layer.name].double() for c in clients]  # a one-batch pass records fp32
        B = matrix(glob[layer.b_key]).double() + 0.3  # a shared, non-zero B
        As = [matrix(c[0][layer.a_key]).double() for c in clients]
        fedit = torch.stack(As).mean(0)
        lorm = merge_lora_a(As, grams)

        def err(A, B=B, As=As, grams=grams):
            return sum(
                float(torch.trace(B @ (A - Ai) @ g @ (A - Ai).T @ B.T)) for Ai, g in zip(As, grams)
            )

        assert err(lorm) <= err(fedit) * (1 + 1e-9) + 1e-9
    # And the whole-layer products (RegMean of B_i A_i vs FedIT's B-bar A-bar).
    rng = np.random.default_rng(0)
    layer = adapter_layout(model)[0]
    grams = [c[1][layer.name].double() for c in clients]
    As = [matrix(c[0][layer.a_key]).double() for c in clients]
    Bs = [torch.from_numpy(rng.standard_normal((layer.d_out, layer.rank))) for _ in clients]
    deltas = [b @ a for a, b in zip(As, Bs)]
    fedit = torch.stack(Bs).mean(0) @ torch.stack(As).mean(0)
    merged = regmean(deltas, grams)

    def err_w(W):
        return sum(float(torch.trace((W - D) @ g @ (W - D).T)) for D, g in zip(deltas, grams))

    assert err_w(merged) < err_w(fedit)


def test_reply_with_bad_gram_is_rejected():
    model, glob, clients = _setup("A")
    strategy = _strategy(model)
    layer = strategy.layout.layers[0]
    bad = dict(clients[0][1])
    g = bad[layer.name].clone()
    g[0, 1] += 1e3  # only the upper triangle travels: an indefinite symmetric matrix arrives
    bad[layer.name] = g
    clients = [(clients[0][0], bad, clients[0][2])] + clients[1:]
    merged, log = _run_round(strategy, glob, clients, round_in_task=1)
    assert len(log.rejected) == 1 and "node 1" in log.rejected[0]
    assert "not positive semi-definite" in log.rejected[0]
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_a_gram_with_a_negative_eigenvalue_is_rejected_though_its_2x2_minors_pass():
    """[[1,1,-1],[1,1,1],[-1,1,1]]: symmetric, unit diagonal, |g_ij| <= sqrt(g_ii g_jj),
    eigenvalue -1. It cannot be X X^T, and summed with others it would make S indefinite."""
    g = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    assert float(torch.linalg.eigvalsh(g).min()) < -0.99
    with pytest.raises(wire.PayloadError, match="node 4: x|G is not positive semi-definite"):
        wire.check_gram(4, "x|G", g)
    x = torch.randn(50, 3, dtype=torch.float64)
    wire.check_gram(4, "x|G", (x.T @ x).float())  # a real Gram passes, in fp32 too
    singular = torch.randn(2, 64)
    wire.check_gram(4, "x|G", singular.T @ singular)  # rank 2 of 64: PSD up to fp32 round-off
    for bad, why in [
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
        (torch.tensor([[1.0, 3.0], [3.0, 1.0]]), "not positive semi-definite"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal"),
        (torch.tensor([4.0, -2.0]), "negative diagonal"),
    ]:
        with pytest.raises(wire.PayloadError, match=why):
            wire.check_gram(1, "g", bad)


def test_a_gram_known_symmetric_is_judged_as_by_the_full_check_and_left_untouched():
    # Unpacked Grams skip the symmetry test and the averaging with the transpose: the
    # verdict must be the full check's, and the caller's fp64 Gram must stay as it was.
    x = torch.randn(30, 6, dtype=torch.float64)
    cases = [
        (x.T @ x, None),  # PSD, fp64: the check works on the caller's own tensor
        ((x.T @ x).float(), None),
        (torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]), "semi-definite"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal"),
    ]
    for g, why in cases:
        before = g.clone()
        for symmetric in (False, True):
            if why is None:
                wire.check_gram(2, "y|G", g, symmetric=symmetric)
            else:
                with pytest.raises(wire.PayloadError, match=why):
                    wire.check_gram(2, "y|G", g, symmetric=symmetric)
            assert torch.equal(g, before)


def test_a_non_finite_tensor_is_named_whatever_its_dtype():
    from flwr.app import Array, ArrayRecord

    from lorm_flwr.wire.checks import PayloadError, decode_tensors

    big = np.full(4, 3.0e38, dtype=np.float32)  # finite: their sum only fits in fp64
    assert decode_tensors(3, ArrayRecord({"a": Array(big)}), {"a": (4,)}, torch.float32)
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            values = np.ones(5, dtype=np.float32)
            values[2] = bad
            with pytest.raises(PayloadError, match="node 3: a holds NaN or Inf"):
                decode_tensors(3, ArrayRecord({"a": Array(values)}), {"a": (5,)}, dtype)
    huge = np.full(2, 1.0e300)  # finite in fp64, Inf once cast to the fp32 of the wire
    with pytest.raises(PayloadError, match="holds NaN or Inf"):
        decode_tensors(3, ArrayRecord({"a": Array(huge)}), {"a": (2,)}, torch.float32)


def test_a_reply_with_an_indefinite_gram_is_rejected_in_a_round():
    model, glob, clients = _setup("A")
    strategy = _strategy(model)
    layer = strategy.layout.layers[0]
    bad = dict(clients[1][1])
    k = layer.d_in
    evals, evecs = torch.linalg.eigh(bad[layer.name].double())
    evals[0] = -0.5 * float(evals[-1])  # one clearly negative eigenvalue, symmetric still
    bad[layer.name] = (evecs @ torch.diag(evals) @ evecs.T).float()
    assert bad[layer.name].shape == (k, k)
    clients = [clients[0], (clients[1][0], bad, clients[1][2]), clients[2]]
    merged, log = _run_round(strategy, glob, clients, round_in_task=1)
    (rejected,) = log.rejected
    assert "node 2" in rejected and "positive semi-definite" in rejected
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_diagonal_grams_upload_only_diagonals():
    model = _model()
    t = _client_tensors(model, 1, "A")
    grams = _grams_on(model, t, torch.randn(2, 3, 16, 16), {HEAD: 0.5})
    grams = {n: torch.diagonal(g).clone() if n != HEAD else g for n, g in grams.items()}
    layers = adapter_layout(model)
    stats = gram_products(wire.GRAMS_LORM_A, t, grams, layers, model_layout(model).heads)
    for layer in layers:
        assert stats[wire.gram_key(layer.name, wire.G)].shape == (layer.d_in,)


def test_b_round_code_grams_give_the_products_of_full_grams():
    """A B-round client records A G~ A^T directly (merged forward, codes' Gram); the
    products it sends equal those computed from the full Grams of an unmerged pass."""
    from lorm_flwr.client.round import input_grams

    cfg = RunConfig.from_mapping(
        {"strategy": "lorm", "backbone": "vit-tiny", "image-size": 16, "gram-alpha": 0.7,
         "eval-batch-size": 5}
    )  # fmt: skip
    model = _model(seed=3)
    tensors = _client_tensors(model, 1, "B")
    tensors = _client_tensors(model, 2, "A") | {
        k: v for k, v in tensors.items() if ".lora_B." in k or k.startswith(HEAD)
    }
    layers = adapter_layout(model)
    images = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    set_tensors(model, tensors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = input_grams(cfg, model, images, with_head=True,
                   projections={ly.name: matrix(tensors[ly.a_key]) for ly in layers})  # fmt: skip
    full = input_grams(cfg, model, images, with_head=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # merge undone bit for bit
    heads = model_layout(model).heads
    got = gram_products(wire.GRAMS_LORM_B, tensors, codes, layers, heads, codes=True)
    want = gram_products(wire.GRAMS_LORM_B, tensors, full, layers, heads)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(
            got[k], want[k], rtol=1e-4, atol=1e-4 * want[k].abs().max().item()
        )


@pytest.mark.parametrize("round_in_task", [0, 1])  # a B-round and an A-round
def test_degenerate_clients_never_put_nan_or_inf_in_the_global_model(round_in_task):
    """One-sample clients, an all-zero-feature client and duplicate clients: the Grams are
    singular in every way, the merge still writes only finite values."""
    which = "B" if round_in_task == 0 else "A"
    model = _model()
    glob = get_tensors(model)
    t = _client_tensors(model, seed=10, which=which)
    one_sample = _grams_on(model, t, torch.randn(1, 3, 16, 16), {HEAD: 0.5})
    zeros = {name: torch.zeros_like(g) for name, g in one_sample.items()}
    clients = [(t, one_sample, 1), (t, one_sample, 1), (t, zeros, 3)]  # duplicates + zero features
    strategy = _strategy(model)
    merged, log = _run_round(strategy, glob, clients, round_in_task=round_in_task)
    assert not log.rejected  # all valid payloads
    assert all(torch.isfinite(v).all() for v in merged.values())
    strategy_all_zero = _strategy(model)
    merged, _ = _run_round(strategy_all_zero, glob, [(t, zeros, 2), (t, zeros, 2)], round_in_task)
    assert all(torch.isfinite(v).all() for v in merged.values())
