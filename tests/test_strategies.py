"""FedSA, FFA, VeRA and RegMean: what is shared, what stays local, what is exact.

The FedSA tests drive the real ClientApp handlers with Flower messages and
contexts, so the local state goes through ``context.state`` as in a run.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, RecordDict

import client_app
from lorm_flwr import protocol as P
from lorm_flwr.client import Instructions, train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.lorm import matrix, regmean_products
from lorm_flwr.models.adapters import HEAD, adapter_layout, attach_lora, get_tensors, group_of
from lorm_flwr.models.backbones import build_classifier
from lorm_flwr.runtime import initial_tensors, layout_of, model_of
from lorm_flwr.strategies import strategy_class
from lorm_flwr.strategies.base import RoundLog
from tests.messages import reply

RUN = {
    "dataset": "digits", "backbone": "vit-tiny", "num-tasks": 2, "local-epochs": 1,
    "image-size": 16, "lora-rank": 2, "lora-alpha": 2.0, "batch-size": 64,
}  # fmt: skip


def _contexts(run_config, n=2):
    return [
        Context(
            run_id=1, node_id=10 + k, node_config={"partition-id": k, "num-partitions": n},
            state=RecordDict(), run_config=run_config,
        )  # fmt: skip
        for k in range(n)
    ]


def _train_messages(strategy, arrays, server_round, nodes):
    messages = strategy.configure_train(
        server_round, P.tensors_to_arrays(arrays), ConfigRecord(), _Grid(nodes)
    )
    return {m.metadata.dst_node_id: m for m in messages}


class _Grid:
    """The part of Flower's Grid that configure_train uses."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_fedsa_keeps_b_and_head_per_client_and_averages_a_over_two_rounds():
    run_config = {**RUN, "strategy": "fedsa"}
    cfg = RunConfig.from_mapping(run_config)
    strategy = strategy_class("fedsa")(cfg, layout_of(model_of(cfg)))
    strategy.cfg = cfg.replace(min_clients=2)
    contexts = _contexts(run_config)
    glob = dict(initial_tensors(cfg))
    strategy.begin_task(0, glob)
    for server_round in (1, 2):
        replies, trained = [], []
        messages = _train_messages(strategy, glob, server_round, [c.node_id for c in contexts])
        for k, ctx in enumerate(contexts):
            msg = messages[ctx.node_id]
            sent = P.arrays_to_tensors(msg.content[P.ARRAYS])
            assert {group_of(key) for key in sent} == {"A"}  # B and head never travel
            before = P.arrays_to_tensors(ctx.state[P.LOCAL_STATE]) if P.LOCAL_STATE in ctx.state else None
            out = client_app.train(msg, ctx)
            local = P.arrays_to_tensors(ctx.state[P.LOCAL_STATE])
            assert {group_of(key) for key in local} == {"B", "head"}
            if before is not None:  # round 2 started from this client's own round-1 parts
                assert any(not torch.equal(local[key], before[key]) for key in local)
            replies.append(reply(ctx.node_id, P.arrays_to_tensors(out.content[P.ARRAYS]),
                                 int(out.content[P.METRICS][P.MET_NUM_EXAMPLES])))
            trained.append((P.arrays_to_tensors(out.content[P.ARRAYS]), local))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        glob = P.arrays_to_tensors(arrays)
        weights = [int(r.content[P.METRICS][P.MET_NUM_EXAMPLES]) for r in replies]
        for layer in strategy.layout.layers:
            expected = sum(w * t[0][layer.a_key] for w, t in zip(weights, trained)) / sum(weights)
            torch.testing.assert_close(glob[layer.a_key], expected)
        # Each client's B and head are its own: not overwritten, not averaged.
        for layer in strategy.layout.layers:
            b0, b1 = (trained[k][1][layer.b_key] for k in range(2))
            assert not torch.equal(b0, b1)
            torch.testing.assert_close(
                P.arrays_to_tensors(contexts[0].state[P.LOCAL_STATE])[layer.b_key], b0
            )


def test_ffa_leaves_a_bit_identical():
    cfg = RunConfig.from_mapping({**RUN, "strategy": "ffa"})
    start = dict(initial_tensors(cfg))
    plan = Instructions(task=0, round_in_task=0, train_a=False, train_b=True, train_head=True,
                        stats=P.STATS_NONE, seed=1)
    result = train_round(cfg, 0, 2, start, plan)
    assert {group_of(k) for k in result.tensors} == {"B", "head"}  # A is not even sent
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
    strategy = strategy_class("fedsa-vera")(cfg, layout_of(model_of(cfg)))
    assert strategy.local_groups == {"B", "head"}


def test_vera_on_a_conv_only_backbone_stops_with_a_clear_error():
    import pytest

    base = build_classifier("efficientnet-lite0", 32, 10, 0)
    with pytest.raises(ValueError, match="VeRA adapts Linear layers only"):
        attach_lora(base, rank=4, alpha=4.0, targets=["conv_pw"], kind="vera")


def test_regmean_single_client_returns_its_delta_exactly():
    cfg = RunConfig.from_mapping({**RUN, "strategy": "regmean", "min-clients": 1})
    model = model_of(cfg)
    strategy = strategy_class("regmean")(cfg, layout_of(model))
    gen = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial_tensors(cfg).items()}
    layers = adapter_layout(model)
    grams = {}
    for layer in layers + [None]:
        k = layer.d_in if layer else strategy.layout.shapes[strategy.layout.head_weight][1]
        x = torch.randn(3 * k, k, generator=gen, dtype=torch.float64)  # full-rank inputs
        grams[layer.name if layer else HEAD] = x.T @ x
    stats = regmean_products(tensors, grams, layers, HEAD, strategy.layout.head_weight)
    strategy.rounds.append(RoundLog(task=0, round_in_task=0))
    strategy._sent = dict(tensors)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, {strategy.layout.head_bias: tensors[strategy.layout.head_bias]}, 5, stats=stats)]
    )
    merged = P.arrays_to_tensors(arrays)
    for layer in layers:
        delta = layer.scaling * matrix(tensors[layer.b_key]).double() @ matrix(tensors[layer.a_key]).double()
        got = layer.scaling * matrix(merged[layer.b_key]).double() @ matrix(merged[layer.a_key]).double()
        torch.testing.assert_close(got, delta, rtol=1e-4, atol=1e-5)
    assert strategy.rounds[-1].extra["truncation_error_max"] < 1e-5
