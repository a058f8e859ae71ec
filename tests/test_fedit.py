"""FedIT against a hand-computed weighted average, through the real strategy class."""

from __future__ import annotations

import pytest
import torch

from lorm_flwr import protocol as P
from lorm_flwr.config import RunConfig
from lorm_flwr.strategies.base import AggregationFailed, ModelLayout, RoundLog
from lorm_flwr.strategies.fedit import FedIT
from tests.messages import reply, error_reply


def _strategy(min_clients=2):
    shapes = {"l.lora_A.weight": (2, 3), "l.lora_B.weight": (4, 2), "linear_head.weight": (5, 4)}
    layout = ModelLayout((), "linear_head.weight", "linear_head.bias", shapes)
    s = FedIT(RunConfig(min_clients=min_clients), layout)
    s.rounds.append(RoundLog(task=0, round_in_task=0))
    return s, shapes


def _tensors(shapes, value):
    return {k: torch.full(v, float(value)) + torch.arange(torch.Size(v).numel()).view(v) for k, v in shapes.items()}


def test_fedit_is_the_sample_weighted_average():
    s, shapes = _strategy()
    t1, t2, t3 = _tensors(shapes, 1), _tensors(shapes, 5), _tensors(shapes, -2)
    replies = [reply(1, t1, 10), reply(2, t2, 30), reply(3, t3, 60)]
    arrays, metrics = s.aggregate_train(1, replies)
    merged = P.arrays_to_tensors(arrays)
    for k in shapes:
        expected = (10 * t1[k] + 30 * t2[k] + 60 * t3[k]) / 100  # by hand
        torch.testing.assert_close(merged[k], expected)
    assert metrics[P.MET_NUM_EXAMPLES] == 100
    assert s.rounds[-1].bytes_up > 0 and s.rounds[-1].replies == 3


def test_failures_and_bad_payloads_are_not_merged():
    s, shapes = _strategy()
    good1, good2 = _tensors(shapes, 1), _tensors(shapes, 3)
    nan = _tensors(shapes, 0)
    nan["l.lora_A.weight"][0, 0] = float("nan")
    wrong_shape = dict(good1)
    wrong_shape["l.lora_B.weight"] = torch.zeros(4, 3)
    replies = [
        reply(1, good1, 10), reply(2, good2, 10), reply(3, nan, 10),
        reply(4, wrong_shape, 10), reply(5, good1, 0), error_reply(6, "boom"),
    ]  # fmt: skip
    arrays, _ = s.aggregate_train(1, replies)
    merged = P.arrays_to_tensors(arrays)
    torch.testing.assert_close(merged["l.lora_A.weight"], (good1["l.lora_A.weight"] + good2["l.lora_A.weight"]) / 2)
    log = s.rounds[-1]
    assert len(log.rejected) == 3 and len(log.failures) == 1
    assert any("NaN" in r for r in log.rejected) and any("shape" in r for r in log.rejected)
    assert any("num-examples=0" in r for r in log.rejected)


def test_too_few_replies_raise():
    s, shapes = _strategy(min_clients=2)
    with pytest.raises(AggregationFailed, match="min-clients=2"):
        s.aggregate_train(1, [reply(1, _tensors(shapes, 1), 5), error_reply(2, "down")])


def _corrupt(kind, shapes):
    t = _tensors(shapes, 2)
    if kind == "extra key":
        t["l.lora_C.weight"] = torch.zeros(2, 2)
    elif kind == "missing key":
        del t["l.lora_B.weight"]
    elif kind == "integer dtype":
        t["l.lora_A.weight"] = t["l.lora_A.weight"].to(torch.int64)
    elif kind == "Inf":
        t["linear_head.weight"][1, 1] = float("inf")
    return t


@pytest.mark.parametrize(
    ("kind", "count", "reason"),
    [
        ("extra key", 10, "wrong keys"),
        ("missing key", 10, "wrong keys"),
        ("integer dtype", 10, "expected float"),
        ("Inf", 10, "NaN or Inf"),
        ("negative count", -3, "must be a positive integer"),
    ],
)
def test_each_kind_of_bad_payload_is_rejected_with_node_and_reason(kind, count, reason):
    s, shapes = _strategy()
    good = [reply(1, _tensors(shapes, 1), 10), reply(2, _tensors(shapes, 3), 10)]
    arrays, _ = s.aggregate_train(1, good + [reply(7, _corrupt(kind, shapes), count)])
    merged = P.arrays_to_tensors(arrays)
    expected = (_tensors(shapes, 1)["l.lora_A.weight"] + _tensors(shapes, 3)["l.lora_A.weight"]) / 2
    torch.testing.assert_close(merged["l.lora_A.weight"], expected)  # the bad reply is not merged
    (rejected,) = s.rounds[-1].rejected
    assert "node 7" in rejected and reason in rejected


def test_gram_checks_reject_what_cannot_be_x_xt():
    x = torch.randn(5, 3, dtype=torch.float64)
    P.check_gram(1, "g", x.T @ x)  # a real Gram passes
    for bad, why in [
        (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "not symmetric"),
        (torch.tensor([[1.0, 3.0], [3.0, 1.0]]), "not positive semi-definite"),
        (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal"),
        (torch.tensor([4.0, -2.0]), "negative diagonal"),
    ]:
        with pytest.raises(P.PayloadError, match=why):
            P.check_gram(1, "g", bad)
