"""FedIT against a hand-computed weighted average, through the real round path
(exchange, wire checks, merge), and every kind of bad reply rejected on that path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.merge import fedavg_mean
from lorm_flwr.models.layout import HeadLayer, ModelLayout
from lorm_flwr.server.exchange import ExchangeFailed
from lorm_flwr.server.rounds import train_exchange
from lorm_flwr.server.strategies.fedit import FedIT
from tests.messages import ScriptedGrid, train_content

SHAPES = {"l.lora_A.weight": (2, 3), "l.lora_B.weight": (4, 2), "linear_head.weight": (5, 4),
          "linear_head.bias": (5,)}  # fmt: skip
KEY = "l.lora_A.weight"


def _strategy(min_clients=2, retries=0):
    layout = ModelLayout(
        (), (HeadLayer("linear_head", "linear_head.weight", "linear_head.bias"),), SHAPES
    )
    return FedIT(RunConfig(min_clients=min_clients, round_retries=retries), layout)


def _tensors(value):
    return {
        k: torch.full(v, float(value)) + torch.arange(torch.Size(v).numel()).view(v)
        for k, v in SHAPES.items()
    }


def _round(script, nodes=None, retries=0, examples=lambda node: None):
    s = _strategy(retries=retries)
    grid = ScriptedGrid(nodes or sorted(script[0]), script)
    replies, merged, log, _ = train_exchange(grid, s, _tensors(0), 0, examples=examples)
    return replies, merged.tensors, log


def test_fedit_is_the_sample_weighted_average():
    t1, t2, t3 = _tensors(1), _tensors(5), _tensors(-2)
    script = [{1: train_content(t1, 10), 2: train_content(t2, 30), 3: train_content(t3, 60)}]
    replies, merged, log = _round(script)
    for k in SHAPES:
        expected = (10 * t1[k] + 30 * t2[k] + 60 * t3[k]) / 100  # by hand
        torch.testing.assert_close(merged[k], expected)
    assert [r.num_examples for r in replies] == [10, 30, 60]
    assert log.bytes_up == sum(
        wire.record_bytes(train_content(t, n)) for t, n in ((t1, 10), (t2, 30), (t3, 60))
    )
    assert log.replies == 3 and log.bytes_down > 0


def test_fedavg_mean_is_bit_for_bit_flowers_fedavg():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=gen) for _ in range(3)]
    weights = [13, 7, 101]
    records = [
        RecordDict({"a": ArrayRecord({"x": t}), "m": MetricRecord({"n": w})})
        for t, w in zip(tensors, weights)
    ]
    flower = aggregate_arrayrecords(records, "n")["x"].numpy()
    ours = fedavg_mean(tensors, weights).numpy()
    assert ours.dtype == flower.dtype and np.array_equal(ours, flower)


def _bad(kind: str) -> RecordDict:
    """A reply from a client that sends ``kind`` of wrong (each alone)."""
    t = _tensors(2)
    if kind == "extra key":
        t["l.lora_C.weight"] = torch.zeros(2, 2)
    elif kind == "missing key":
        del t["l.lora_B.weight"]
    elif kind == "integer dtype":
        t[KEY] = t[KEY].to(torch.int64)
    elif kind == "NaN":
        t[KEY][0, 0] = float("nan")
    elif kind == "Inf":
        t["linear_head.weight"][1, 1] = float("inf")
    elif kind == "wrong shape":
        t["l.lora_B.weight"] = torch.zeros(4, 3)
    elif kind == "float64 overflowing fp32":
        t[KEY] = t[KEY].double() * 1e300
    content = train_content(t, 10)
    if kind == "negative count":
        content = train_content(t, -3)
    elif kind == "zero count":
        content = train_content(t, 0)
    elif kind == "fractional count":
        content = train_content(t, 10)
        content[wire.METRICS] = MetricRecord(
            {**dict(content[wire.METRICS]), wire.NUM_EXAMPLES: 2.5}
        )
    elif kind == "count 1e15 (not the shard size)":
        content = train_content(t, 10**15)
    elif kind == "extra NaN ArrayRecord":
        content["more"] = ArrayRecord({KEY: torch.full((2, 3), float("nan"))})
    elif kind == "extra ArrayRecord with a new key":
        content["more"] = ArrayRecord({"l.lora_Z.weight": torch.zeros(2, 3)})
    elif kind == "forged first MetricRecord":
        content = RecordDict(
            {"aaa": MetricRecord({wire.NUM_EXAMPLES: 10**15}), **dict(content.items())}
        )
    elif kind == "ConfigRecord where arrays belong":
        content[wire.ARRAYS] = ConfigRecord({"x": 1})
    elif kind == "metric is a list":
        content[wire.METRICS] = MetricRecord(
            {**dict(content[wire.METRICS]), wire.TRAIN_LOSS: [0.1, 0.2]}
        )
    elif kind == "metric is NaN":
        content[wire.METRICS] = MetricRecord(
            {**dict(content[wire.METRICS]), wire.TRAIN_LOSS: float("nan")}
        )
    elif kind == "missing metric":
        content[wire.METRICS] = MetricRecord({wire.NUM_EXAMPLES: 10})
    elif kind == "string dtype":
        arrays = {k: Array(v.numpy()) for k, v in t.items()}
        arrays[KEY] = Array(np.full(SHAPES[KEY], "x"))
        content[wire.ARRAYS] = ArrayRecord(arrays)
    elif kind == "corrupt array bytes":
        record = wire.tensors_to_arrays(t)
        record[KEY].data = b"\x93NUMPY garbage"
        content[wire.ARRAYS] = record
    elif kind == "header declaring 4 TB":  # refused before NumPy would allocate it
        record = wire.tensors_to_arrays(t)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
        )
        record[KEY].data = header.getvalue() + bytes(16)
        content[wire.ARRAYS] = record
    elif kind == "truncated array bytes":
        record = wire.tensors_to_arrays(t)
        record[KEY].data = record[KEY].data[:-4]
        content[wire.ARRAYS] = record
    return content


BAD = {
    "extra key": "wrong keys",
    "missing key": "wrong keys",
    "integer dtype": "expected a float",
    "NaN": "NaN or Inf",
    "Inf": "NaN or Inf",
    "wrong shape": "has shape",
    "float64 overflowing fp32": "NaN or Inf",
    "negative count": "metric num-examples=-3 is negative",
    "zero count": "must be a positive integer",
    "fractional count": "must be a positive integer",
    "count 1e15 (not the shard size)": "its shard has 10",
    "extra NaN ArrayRecord": "records",
    "extra ArrayRecord with a new key": "records",
    "forged first MetricRecord": "records",
    "ConfigRecord where arrays belong": "expected ArrayRecord",
    "metric is a list": "is not a number",
    "metric is NaN": "is not finite",
    "missing metric": "metrics missing",
    "string dtype": "expected a float",
    "corrupt array bytes": "cannot be decoded",
    "header declaring 4 TB": "has shape (1000000000000,)",
    "truncated array bytes": "needs",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_reply_is_rejected_with_node_and_reason(kind):
    good1, good2 = _tensors(1), _tensors(3)
    script = [{1: train_content(good1, 10), 2: train_content(good2, 10), 7: _bad(kind)}]
    replies, merged, log = _round(script, examples=lambda node: 10)
    assert [r.node for r in replies] == [1, 2]  # the bad reply is not merged
    for k in SHAPES:
        torch.testing.assert_close(merged[k], (good1[k] + good2[k]) / 2)
        assert merged[k].dtype == torch.float32 and torch.isfinite(merged[k]).all()
    assert set(merged) == set(SHAPES)
    (rejected,) = log.rejected
    assert "node 7" in rejected and BAD[kind] in rejected, rejected


def test_a_float16_or_float64_reply_is_cast_to_the_global_dtype():
    half = {k: v.half() for k, v in _tensors(1).items()}
    double = {k: v.double() for k, v in _tensors(3).items()}
    script = [{1: train_content(half, 10), 2: train_content(double, 10)}]
    replies, merged, _ = _round(script)
    assert all(t.dtype == torch.float32 for r in replies for t in r.arrays.values())
    assert all(t.dtype == torch.float32 for t in merged.values())


def test_failures_and_timeouts_are_named_and_the_rest_merged():
    script = [
        {
            1: train_content(_tensors(1), 10),
            2: train_content(_tensors(3), 10),
            3: "error",
            4: "silent",
        }
    ]
    _, merged, log = _round(script)
    torch.testing.assert_close(merged[KEY], (_tensors(1)[KEY] + _tensors(3)[KEY]) / 2)
    assert log.timeouts == [4] and any("node 3" in f and "crashed" in f for f in log.failures)


def test_too_few_valid_replies_stop_with_a_clear_error():
    script = [{1: train_content(_tensors(1), 5), 2: "error"}]
    with pytest.raises(
        ExchangeFailed, match=r"only 1 valid replies, 2 needed.*after 1 attempts"
    ) as info:
        _round(script)
    assert info.value.log.attempts == 1 and info.value.log.failures


def test_flowers_unchecked_aggregation_is_not_reachable():
    with pytest.raises(NotImplementedError, match="checked replies"):
        _strategy().aggregate_train(1, [])
