"""The wire codec: instructions round-trip, and the replies the server must refuse
(personalised evaluation, end-of-task statistics, the hello handshake)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.symmetric import pack_upper
from lorm_flwr.models.layout import AdaptedLayer, HeadLayer, ModelLayout
from lorm_flwr.server.exchange import ExchangeFailed
from lorm_flwr.server.hello import handshake
from tests.messages import ScriptedGrid, reply_to

LAYER = AdaptedLayer(
    "l", "l.lora_A.weight", "l.lora_B.weight", d_in=3, d_out=4, rank=2, scaling=1.0, is_conv=False
)
LAYOUT = ModelLayout(
    (LAYER,), (HeadLayer("linear_head", "linear_head.weight", "linear_head.bias"),),
    {"l.lora_A.weight": (2, 3), "l.lora_B.weight": (4, 2), "linear_head.weight": (5, 4), "linear_head.bias": (5,)},
)  # fmt: skip


def test_instructions_round_trip_through_a_config_record():
    plan = wire.Instructions(task=3, round_in_task=1, train_a=True, train_head=True, grams=wire.GRAMS_LORM_A,
                             seed=12345, local=frozenset({"B", "head"}), rank=8, alpha=8.0)  # fmt: skip
    assert wire.Instructions.from_config(plan.to_config()) == plan
    bare = wire.Instructions(task=0)
    assert wire.Instructions.from_config(bare.to_config()) == bare
    with pytest.raises(wire.PayloadError, match="malformed"):
        wire.Instructions.from_config(ConfigRecord({"task": 1}))
    with pytest.raises(wire.PayloadError, match="unknown Gram statistics"):
        wire.Instructions.from_config(ConfigRecord({**dict(bare.to_config()), "grams": "all"}))


def test_each_plan_declares_the_reply_for_both_sides():
    lorm_a = wire.train_reply_spec(LAYOUT, wire.Instructions(0, 1, train_a=True, train_head=True,
                                                             grams=wire.GRAMS_LORM_A), 1.0, 0.0)  # fmt: skip
    assert dict(lorm_a.arrays) == {"linear_head.bias": (5,)}
    assert dict(lorm_a.grams) == {
        "l|AG": (2, 3),
        "l|G": (6,),  # the upper triangle of 3 x 3
        "linear_head|WG": (5, 4),
        "linear_head|G": (4,),
    }
    fedsa = wire.train_reply_spec(
        LAYOUT,
        wire.Instructions(
            0, train_a=True, train_b=True, train_head=True, local=frozenset({"B", "head"})
        ),
        1,
        1,
    )
    assert set(fedsa.arrays) == {"l.lora_A.weight"} and fedsa.grams is None
    task = wire.train_reply_spec(LAYOUT, wire.Instructions(0, grams=wire.GRAMS_TASK), 0.0, 1.0)
    assert (
        task.arrays is None
        and dict(task.grams) == {"l|G": (3,)}
        and task.metrics == (wire.NUM_EXAMPLES,)
    )


def _evaluation(**values) -> RecordDict:
    base = {
        wire.NUM_EXAMPLES: 9,
        "correct-task-0": 4,
        "total-task-0": 5,
        "correct-task-1": 3,
        "total-task-1": 4,
    }
    return RecordDict({wire.METRICS: MetricRecord({**base, **values})})


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"correct-task-0": 6}, "6 correct out of 5"),  # would record an accuracy above 1
        ({"correct-task-1": float("nan")}, "not finite"),
        ({"total-task-1": [1, 2]}, "not a number"),
        ({"correct-task-0": -1}, "is negative"),
        ({"total-task-0": 2.5}, "non-negative integer"),
        ({"total-task-0": 7, wire.NUM_EXAMPLES: 11}, "its test splits have [5, 4]"),
        ({"extra": 1}, "unexpected ['extra']"),
    ],
)
def test_bad_personalised_evaluation_replies_are_refused(values, reason):
    assert wire.decode_evaluation(reply_to(3, _evaluation()), 1, [5, 4]) == ([4, 3], [5, 4])
    with pytest.raises(wire.PayloadError, match="node 3") as info:
        wire.decode_evaluation(reply_to(3, _evaluation(**values)), 1, [5, 4])
    assert reason in str(info.value)


def test_an_end_of_task_reply_without_its_statistics_is_refused():
    spec = wire.train_reply_spec(LAYOUT, wire.Instructions(0, grams=wire.GRAMS_TASK), 1.0, 1.0)
    good = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6}),
                       wire.GRAMS: wire.tensors_to_arrays({"l|G": pack_upper(torch.eye(3))})})  # fmt: skip
    got = wire.decode_reply(reply_to(2, good), spec, num_examples=6).grams["l|G"]
    assert torch.equal(got, torch.eye(3))  # unpacked to the whole matrix
    full = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6}),
                       wire.GRAMS: wire.tensors_to_arrays({"l|G": torch.eye(3)})})  # fmt: skip
    with pytest.raises(wire.PayloadError, match=r"l\|G has shape \(3, 3\), expected \(6,\)"):
        wire.decode_reply(reply_to(2, full), spec)
    missing = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6})})
    with pytest.raises(
        wire.PayloadError,
        match=r"node 2: reply has records \['metrics'\], expected \['grams', 'metrics'\]",
    ):
        wire.decode_reply(reply_to(2, missing), spec)
    wrong_type = RecordDict(
        {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6}), wire.GRAMS: ConfigRecord({"a": 1})}
    )
    with pytest.raises(wire.PayloadError, match="'grams' is a ConfigRecord"):
        wire.decode_reply(reply_to(2, wrong_type), spec)
    negative = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 6}),
                           wire.GRAMS: ArrayRecord({"l|G": pack_upper(-torch.eye(3))})})  # fmt: skip
    with pytest.raises(wire.PayloadError, match="negative diagonal"):
        wire.decode_reply(reply_to(2, negative), spec)


def test_the_handshake_maps_nodes_to_partitions_and_refuses_bad_hellos():
    cfg = RunConfig(min_clients=2, num_clients=0, round_retries=0)
    grid = ScriptedGrid([7, 9], [{7: wire.hello_reply(1, 2), 9: wire.hello_reply(0, 2)}])
    mapping, log, num = handshake(grid, cfg)
    assert mapping == {7: 1, 9: 0} and num == 2 and log.replies == 2 and log.bytes_up > 0
    bad = RecordDict({wire.METRICS: MetricRecord({wire.PARTITION_ID: 5, wire.NUM_PARTITIONS: 2})})
    grid = ScriptedGrid([7, 9], [{7: wire.hello_reply(1, 2), 9: bad}])
    with pytest.raises(
        ExchangeFailed, match=r"node 9: partition-id=5 outside \[0, num-partitions=2\)"
    ):
        handshake(grid, cfg)
    # Two nodes claim partition 1: which is right cannot be told, so both are rejected.
    grid = ScriptedGrid([7, 9], [{7: wire.hello_reply(1, 2), 9: wire.hello_reply(1, 2)}])
    with pytest.raises(RuntimeError, match=r"only 0 nodes answered.*missing: \[0, 1\]") as info:
        handshake(grid, cfg)
    assert "hello, node 9: partition-id=1 is claimed by nodes [7, 9] too" in str(info.value)
    grid = ScriptedGrid(
        [7, 9, 11], [{7: wire.hello_reply(1, 3), 9: wire.hello_reply(0, 3), 11: "silent"}]
    )
    with pytest.raises(ExchangeFailed, match=r"node 11: no reply \(timeout\)"):
        handshake(grid, cfg.replace(min_clients=3))  # partition 2's node never answered
    # With min-clients=2 the run goes on without partition 2 (its shard is not trained).
    mapping, log, num = handshake(grid, cfg)
    assert mapping == {7: 1, 9: 0} and num == 3 and log.timeouts == [11]


def test_one_nodes_inconsistent_hello_is_rejected_and_named_and_the_run_goes_on():
    """A node claiming num-partitions=4 in a federation of 3 used to stop the whole run."""
    grid = ScriptedGrid(
        [7, 9, 11, 13],
        [{7: wire.hello_reply(0, 3), 9: wire.hello_reply(1, 3), 11: wire.hello_reply(2, 3),
          13: wire.hello_reply(3, 4)}],
    )  # fmt: skip
    mapping, log, num = handshake(grid, RunConfig(num_clients=3))
    assert mapping == {7: 0, 9: 1, 11: 2} and num == 3
    assert log.rejected == ["hello, node 13: num-partitions=4, but the federation has 3 partitions"]
    # Without num-clients the majority tells the federation's size.
    mapping, log, num = handshake(grid, RunConfig(num_clients=0))
    assert num == 3 and 13 not in mapping and log.failed_nodes == [13]
    # Too few left: the run stops, naming the rejected node.
    with pytest.raises(RuntimeError, match=r"only 3 nodes.*min-clients=4.*node 13: num-part"):
        handshake(grid, RunConfig(num_clients=3, min_clients=4))
    # No majority and no num-clients: the nodes and what each claims are named.
    tie = ScriptedGrid([7, 9], [{7: wire.hello_reply(0, 3), 9: wire.hello_reply(1, 4)}])
    with pytest.raises(RuntimeError, match=r"no majority \(nodes \[7\]: 3; nodes \[9\]: 4\)"):
        handshake(tie, RunConfig(num_clients=0, min_clients=1))


def test_the_handshake_waits_for_partitions_still_connecting():
    class Connecting(ScriptedGrid):
        def get_node_ids(self):  # node 9 connects after the first look
            self.looks = getattr(self, "looks", 0) + 1
            return [7] if self.looks == 1 else [7, 9]

    grid = Connecting([7, 9], [{7: wire.hello_reply(1, 2), 9: wire.hello_reply(0, 2)}])
    mapping, log, _ = handshake(grid, RunConfig(min_clients=1, num_clients=2))
    assert mapping == {7: 1, 9: 0} and log.attempts == 2 and grid.calls == 2


def test_a_stray_node_does_not_hide_a_partition_still_connecting():
    """A node of another federation (X) used to count towards the nodes waited for, so the
    partition still connecting (node 13) was never asked and its shard never trained."""

    class Connecting(ScriptedGrid):
        def get_node_ids(self):  # node 13 connects after the first look
            self.looks = getattr(self, "looks", 0) + 1
            return [7, 9, 99] if self.looks == 1 else [7, 9, 13, 99]

    script = {7: wire.hello_reply(0, 3), 9: wire.hello_reply(1, 3), 13: wire.hello_reply(2, 3),
              99: wire.hello_reply(0, 5)}  # fmt: skip
    grid = Connecting([7, 9, 13, 99], [script])
    mapping, log, num = handshake(grid, RunConfig(num_clients=3))
    assert mapping == {7: 0, 9: 1, 13: 2} and num == 3
    assert log.rejected == ["hello, node 99: num-partitions=5, but the federation has 3 partitions"]
    assert [m.metadata.dst_node_id for m in grid.sent[1]] == [13]  # only the newcomer asked


def test_instruction_flags_spelt_as_strings_decode_as_they_read():
    """``bool("false")`` is True: a ``"false"`` flag used to switch training on."""
    values = dict(wire.Instructions(task=0, train_a=True).to_config())
    spelt = ConfigRecord({**values, "train-a": "false", "train-b": "TRUE", "train-head": False})
    got = wire.Instructions.from_config(spelt)
    assert (got.train_a, got.train_b, got.train_head) == (False, True, False)
    with pytest.raises(wire.PayloadError, match="train-a='maybe' is not true or false"):
        wire.Instructions.from_config(ConfigRecord({**values, "train-a": "maybe"}))
    with pytest.raises(wire.PayloadError, match="train-b=1 is not true or false"):
        wire.Instructions.from_config(ConfigRecord({**values, "train-b": 1}))


@pytest.mark.parametrize("key", [wire.TRAIN_LOSS, wire.TRAIN_SECONDS, wire.GRAMS_SECONDS])
def test_a_train_reply_with_a_negative_loss_or_duration_is_refused(key):
    spec = wire.train_reply_spec(LAYOUT, wire.Instructions(0, grams=wire.GRAMS_TASK), 1.0, 1.0)
    spec = dataclasses.replace(spec, metrics=wire.TRAIN_METRICS)
    metrics = {wire.NUM_EXAMPLES: 6, wire.TRAIN_LOSS: 0.5, wire.TRAIN_SECONDS: 1.0,
               wire.GRAMS_SECONDS: 0.1}  # fmt: skip
    grams = wire.tensors_to_arrays({"l|G": pack_upper(torch.eye(3))})
    good = RecordDict({wire.METRICS: MetricRecord(metrics), wire.GRAMS: grams})
    assert wire.decode_reply(reply_to(2, good), spec).metrics[key] >= 0
    bad = RecordDict({wire.METRICS: MetricRecord({**metrics, key: -0.25}), wire.GRAMS: grams})
    with pytest.raises(wire.PayloadError, match=f"node 2: metric {key}=-0.25 is negative"):
        wire.decode_reply(reply_to(2, bad), spec)
