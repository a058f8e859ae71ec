"""FedSA, FFA, VeRA and RegMean: what is shared, what stays local, what is exact.

The FedSA tests drive the real ClientApp handlers with Flower messages and
contexts, so the local state goes through ``context.state`` as in a run.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, RecordDict

import client_app
from lorm_flwr import wire
from lorm_flwr.client.products import gram_products
from lorm_flwr.client.round import train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import (
    HEAD,
    adapter_layout,
    attach_lora,
    get_tensors,
    group_of,
    model_layout,
)
from lorm_flwr.models.backbones import build_classifier
from lorm_flwr.models.layout import AdaptedLayer
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.rounds import train_exchange
from lorm_flwr.wire.packing import unpack_content
from tests.messages import ScriptedGrid, train_content

matrix = AdaptedLayer.matrix

RUN = {
    "dataset": "digits", "backbone": "vit-tiny", "num-tasks": 2, "local-epochs": 1,
    "image-size": 16, "lora-rank": 2, "lora-alpha": 2.0, "batch-size": 64,
}  # fmt: skip


def _contexts(run_config, n=2):
    return [
        Context(
            run_id=1,
            node_id=10 + k,
            node_config={"partition-id": k, "num-partitions": n},
            state=RecordDict(),
            run_config=run_config,
        )
        for k in range(n)
    ]


def test_fedsa_keeps_b_and_head_per_client_and_averages_a_over_two_rounds():
    run_config = {**RUN, "strategy": "fedsa", "min-clients": 2}
    cfg = RunConfig.from_mapping(run_config)
    strategy = strategy_class("fedsa")(cfg, model_layout(model_of(cfg)))
    contexts = _contexts(run_config)
    glob = strategy.begin_task(0, dict(initial_tensors(cfg)))
    for round_in_task in (0, 1):
        before = [
            wire.arrays_to_tensors(c.state[wire.LOCAL_STATE])
            if wire.LOCAL_STATE in c.state
            else None
            for c in contexts
        ]
        script = {c.node_id: (lambda m, c=c: client_app.train(m, c).content) for c in contexts}
        grid = ScriptedGrid(sorted(script), [script])
        replies, merged, _, _ = train_exchange(grid, strategy, glob, round_in_task)
        for m in grid.sent[0]:
            sent = wire.arrays_to_tensors(unpack_content(m.content)[wire.ARRAYS])  # sent packed
            assert {group_of(key) for key in sent} == {"A"}  # B and head never travel
        assert all({group_of(key) for key in r.arrays} == {"A"} for r in replies)
        locals_ = [wire.arrays_to_tensors(c.state[wire.LOCAL_STATE]) for c in contexts]
        for local, old in zip(locals_, before):
            assert {group_of(key) for key in local} == {"B", "head"}
            if old is not None:  # round 2 started from this client's own round-1 parts
                assert any(not torch.equal(local[key], old[key]) for key in local)
        glob = merged.tensors
        weights = [r.num_examples for r in replies]
        for layer in strategy.layout.layers:
            expected = sum(w * r.arrays[layer.a_key] for w, r in zip(weights, replies)) / sum(
                weights
            )
            torch.testing.assert_close(glob[layer.a_key], expected)
        # Each client's B and head are its own: not overwritten, not averaged.
        for layer in strategy.layout.layers:
            assert not torch.equal(locals_[0][layer.b_key], locals_[1][layer.b_key])


def test_ffa_leaves_a_bit_identical():
    cfg = RunConfig.from_mapping({**RUN, "strategy": "ffa"})
    start = dict(initial_tensors(cfg))
    strategy = strategy_class("ffa")(cfg, model_layout(model_of(cfg)))
    plan = strategy.instructions(0)
    train_round(cfg, 0, 2, start, plan)
    spec = strategy.reply_spec(plan)
    assert {group_of(k) for k in spec.arrays} == {"B", "head"}  # A is not even sent
    model = model_of(cfg)
    after = get_tensors(model)
    for layer in adapter_layout(model):
        assert torch.equal(after[layer.a_key], start[layer.a_key])
        assert not torch.equal(after[layer.b_key], start[layer.b_key])


def test_fedsa_vera_shares_lambda_d_and_draws_identical_frozen_matrices():
    def vera(seed_model):
        base = build_classifier("vit-tiny", 16, 10, seed_model)
        return attach_lora(base, rank=4, alpha=4.0, targets=["qkv", "fc1"], kind="vera", seed=7)

    m1, m2 = vera(0), vera(0)
    frozen1 = {n: b for n, b in m1.named_buffers() if "vera_A" in n or "vera_B" in n}
    frozen2 = {n: b for n, b in m2.named_buffers() if "vera_A" in n or "vera_B" in n}
    assert frozen1 and frozen1.keys() == frozen2.keys()
    assert all(torch.equal(frozen1[n], frozen2[n]) for n in frozen1)
    groups = {k: group_of(k) for k in get_tensors(m1)}
    assert {k for k, g in groups.items() if g == "A"} == {k for k in groups if "vera_lambda_d" in k}
    assert {k for k, g in groups.items() if g == "B"} == {k for k in groups if "vera_lambda_b" in k}
    cfg = RunConfig.from_mapping({**RUN, "strategy": "fedsa-vera"})
    strategy = strategy_class("fedsa-vera")(cfg, model_layout(model_of(cfg)))
    assert strategy.local_groups == {"B", "head"}


def test_vera_on_a_conv_only_backbone_stops_with_a_clear_error():
    import pytest

    base = build_classifier("efficientnet-lite0", 32, 10, 0)
    with pytest.raises(ValueError, match="VeRA adapts Linear layers only"):
        attach_lora(base, rank=4, alpha=4.0, targets=["conv_pw"], kind="vera")


def test_regmean_single_client_returns_its_delta_exactly():
    cfg = RunConfig.from_mapping(
        {**RUN, "strategy": "regmean", "min-clients": 1, "gram-alpha": 1.0}
    )
    model = model_of(cfg)
    strategy = strategy_class("regmean")(cfg, model_layout(model))
    gen = torch.Generator().manual_seed(0)
    tensors = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial_tensors(cfg).items()
    }
    layers = adapter_layout(model)
    grams = {}
    for layer in layers + [None]:
        k = layer.d_in if layer else strategy.layout.shapes[strategy.layout.heads[0].weight_key][1]
        x = torch.randn(3 * k, k, generator=gen, dtype=torch.float64)  # full-rank inputs
        grams[layer.name if layer else HEAD] = x.T @ x
    stats = gram_products(wire.GRAMS_REGMEAN, tensors, grams, layers, strategy.layout.heads)
    content = train_content(
        {strategy.layout.heads[0].bias_key: tensors[strategy.layout.heads[0].bias_key]}, 5, stats
    )
    _, result, _, _ = train_exchange(ScriptedGrid([1], [{1: content}]), strategy, dict(tensors), 0)
    merged = result.tensors
    assert result.report["truncation_error_max"] < 1e-6  # a rank-r delta is re-factored exactly
    for layer in layers:
        delta = (
            layer.scaling
            * matrix(tensors[layer.b_key]).double()
            @ matrix(tensors[layer.a_key]).double()
        )
        got = (
            layer.scaling
            * matrix(merged[layer.b_key]).double()
            @ matrix(merged[layer.a_key]).double()
        )
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-5)


def test_a_retried_round_starts_from_the_local_parts_of_its_first_attempt():
    """The server sends a round again when too few replies were valid; a FedSA client
    that already trained it must not train its B and head on top of that attempt."""
    run_config = {**RUN, "strategy": "fedsa", "min-clients": 1}
    cfg = RunConfig.from_mapping(run_config)
    strategy = strategy_class("fedsa")(cfg, model_layout(model_of(cfg)))
    ctx = _contexts(run_config)[0]
    glob = strategy.begin_task(0, dict(initial_tensors(cfg)))
    replies = []
    for round_in_task, attempt in ((0, 1), (1, 1), (1, 2), (1, 3)):
        script = {ctx.node_id: lambda m: client_app.train(m, ctx).content}
        grid = ScriptedGrid([ctx.node_id], [script])
        messages = list(strategy.configure_train(round_in_task + 1, wire.tensors_to_arrays(strategy.shared(glob)),
                                                 ConfigRecord(), grid))  # fmt: skip
        (reply,) = grid.send_and_receive(messages)
        local = wire.arrays_to_tensors(ctx.state[wire.LOCAL_STATE])
        replies.append(
            (round_in_task, attempt, wire.arrays_to_tensors(reply.content[wire.ARRAYS]), local)
        )
    first, second, third = (r for r in replies if r[0] == 1)
    for k in first[2]:  # the shared A: the same training from the same start, bit for bit
        assert torch.equal(first[2][k], second[2][k]) and torch.equal(first[2][k], third[2][k])
    for k in first[3]:  # and the kept B and head
        assert torch.equal(first[3][k], second[3][k]) and torch.equal(first[3][k], third[3][k])
    round0_local = replies[0][3]
    assert any(
        not torch.equal(first[3][k], round0_local[k]) for k in round0_local
    )  # round 1 trained on
