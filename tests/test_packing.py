"""One array per record on the wire (lorm_flwr.wire.packing): exact round trip, far fewer Flower
objects, and every malformed packed record rejected with its name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from lorm_flwr import wire
from lorm_flwr.server.exchange import exchange
from lorm_flwr.wire.packing import PackingError, pack_content, unpack_content
from tests.messages import ScriptedGrid, train_content


def _arrays() -> ArrayRecord:
    return ArrayRecord(
        {
            "w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
            "scalar": Array(np.array(2.5)),
            "half": Array(torch.linspace(-1, 1, 5, dtype=torch.float16)),
            "ints": Array(np.array([[1, -2]], dtype=np.int64)),
            "empty": Array(np.zeros((0, 3), dtype=np.float32)),
        }
    )


def test_round_trip_is_bit_exact_and_keeps_names_order_and_other_records():
    arrays, single = _arrays(), ArrayRecord({"only": Array(np.ones(2))})
    metrics = MetricRecord({"num-examples": 3})
    content = RecordDict({"arrays": arrays, "single": single, "metrics": metrics})
    packed = pack_content(content)
    assert list(packed.keys()) == ["arrays", "arrays" + wire.PACKED_LAYOUT, "single", "metrics"]
    assert list(packed["arrays"].keys()) == [wire.PACKED]
    assert packed["single"] is single and packed["metrics"] is metrics  # nothing to gain
    back = unpack_content(packed)
    assert list(back.keys()) == ["arrays", "single", "metrics"]
    assert list(back["arrays"].keys()) == list(arrays.keys())
    for key, array in arrays.items():
        got = back["arrays"][key]
        assert (got.dtype, got.shape, got.stype, got.data) == (
            array.dtype, array.shape, array.stype, array.data)  # fmt: skip
        assert got.object_id == array.object_id
        np.testing.assert_array_equal(got.numpy(), array.numpy())
    assert wire.record_bytes(back) == wire.record_bytes(content)


def test_only_scalars_round_trip():
    content = RecordDict({"s": ArrayRecord({"a": Array(np.array(1.0)), "b": Array(np.array(2))})})
    back = unpack_content(pack_content(content))
    assert back["s"]["a"].numpy() == 1.0 and back["s"]["b"].numpy() == 2


def test_unpacked_content_passes_through_unchanged():
    content = train_content({"a": torch.ones(2, 3), "b": torch.zeros(4)}, 7)
    back = unpack_content(content)
    assert list(back.keys()) == list(content.keys())
    assert all(back[k] is content[k] for k in content)


def test_a_message_of_many_arrays_becomes_a_few_flower_objects():
    # The default model's train reply is about 140 arrays; every one was an object (plus
    # its chunk) on each hop of a deployment.
    tensors = {f"layer{i}.lora_A.weight": torch.randn(4, 16) for i in range(140)}
    content = train_content(tensors, 10)

    def objects(c: RecordDict) -> int:
        return len(get_all_nested_objects(Message(c, dst_node_id=1, message_type="train")))

    assert objects(content) > 280
    assert objects(pack_content(content)) <= 8


def test_a_reserved_record_name_is_refused_when_packing():
    with pytest.raises(PackingError, match="reserved"):
        pack_content(RecordDict({"x" + wire.PACKED_LAYOUT: MetricRecord({"a": 1})}))


def _packed() -> RecordDict:
    return pack_content(RecordDict({"arrays": _arrays()}))


def _with_layout(**change) -> RecordDict:
    packed = _packed()
    layout = packed["arrays" + wire.PACKED_LAYOUT]
    fields = {k: layout[k] for k in layout}
    fields.update(change)
    packed["arrays" + wire.PACKED_LAYOUT] = ConfigRecord(fields)
    return packed


def _with_blob(data: bytes) -> RecordDict:
    """The packed record's bytes replaced (its metadata says what the layout expects)."""
    packed = _packed()
    total = sum(packed["arrays" + wire.PACKED_LAYOUT]["nbytes"])
    blob = Array(dtype="uint8", shape=(total,), stype="numpy.ndarray", data=data)
    packed["arrays"] = ArrayRecord({wire.PACKED: blob})
    return packed


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (lambda: RecordDict({"x" + wire.PACKED_LAYOUT: _packed()["arrays.layout"]}), "no record"),
        (
            lambda: RecordDict({"arrays": _arrays(), "arrays.layout": _packed()["arrays.layout"]}),
            "one 'packed'",
        ),
        (
            lambda: RecordDict(
                {"arrays": _packed()["arrays"], "arrays.layout": MetricRecord({"keys": 1})}
            ),
            "ConfigRecord",
        ),
        (lambda: _with_layout(keys=["w", "w", "a", "b", "c"]), "malformed"),
        (lambda: _with_layout(nbytes=[1000] * 5), "holds .* bytes"),
        (lambda: _with_layout(ndims=[2, 0, 1, 2, 3]), "dims do not match"),
        (lambda: _with_layout(ndims=[2, 0, 1, -2, 2]), "malformed"),
        (lambda: _with_layout(dtypes=["float32"]), "malformed"),
        (
            lambda: RecordDict(
                {
                    "arrays": ArrayRecord({wire.PACKED: Array(np.zeros(3, dtype=np.float32))}),
                    "arrays.layout": _packed()["arrays.layout"],
                }
            ),
            "uint8",
        ),
        (lambda: _with_blob(b"not a numpy header" + bytes(400)), "cannot be read"),
        (lambda: _with_blob(_packed()["arrays"][wire.PACKED].data[:-1]), "does not match"),
    ],
)
def test_a_malformed_packed_record_is_named(content, reason):
    with pytest.raises(PackingError, match=reason):
        unpack_content(content())


def test_the_server_rejects_a_malformed_packed_reply_and_names_the_node():
    def bad(m: Message) -> RecordDict:
        content = pack_content(train_content({"a": torch.ones(2), "b": torch.ones(3)}, 5))
        del content[wire.ARRAYS + wire.PACKED_LAYOUT]
        content["arrays" + wire.PACKED_LAYOUT] = MetricRecord({"keys": 1})
        return content

    def good(m: Message) -> RecordDict:
        return pack_content(train_content({"a": torch.ones(2), "b": torch.ones(3)}, 5))

    def decode(msg: Message) -> list[str]:
        return list(msg.content[wire.ARRAYS].keys())

    def messages():
        content = train_content({"a": torch.ones(2), "b": torch.ones(3)}, 1)
        return [Message(content, dst_node_id=n, message_type="train") for n in (1, 2)]

    grid = ScriptedGrid([1, 2], [{1: good, 2: bad}])
    values, log = exchange(grid, messages, decode, kind="train", min_replies=1, retries=0,
                           timeout=1)  # fmt: skip
    assert values == [["a", "b"]]  # node 1's reply, unpacked before its decode
    assert len(log.rejected) == 1 and log.rejected[0].startswith("train, node 2: layout of")
    # both messages went out packed, sharing one packed content
    sent = grid.sent[0]
    assert all(list(m.content[wire.ARRAYS].keys()) == [wire.PACKED] for m in sent)
    assert sent[0].content is sent[1].content


def test_layouts_declaring_more_elements_than_bytes_are_refused():
    with pytest.raises(PackingError, match="more elements than bytes"):
        unpack_content(_with_layout(dims=[2**40, 4, 5, 1, 2, 0, 3]))


def test_any_array_layout_round_trips_through_flower_serialisation():
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    record = ArrayRecord(
        {
            "fortran": Array(np.asfortranarray(base)),
            "strided": Array(base[:, ::2]),
            "raw": Array(dtype="float32", shape=(2,), stype="custom", data=b"\x00" * 8),
        }
    )
    scalars = ArrayRecord({"a": Array(np.array(1.5)), "b": Array(np.array(7, dtype=np.int8))})
    content = RecordDict({"arrays": record, "scalars": scalars})
    back = unpack_content(recorddict_from_proto(recorddict_to_proto(pack_content(content))))
    for name in ("arrays", "scalars"):
        for key, array in content[name].items():
            got = back[name][key]
            assert (got.dtype, got.shape, got.stype, got.data) == (
                array.dtype, array.shape, array.stype, array.data)  # fmt: skip
    np.testing.assert_array_equal(back["arrays"]["strided"].numpy(), base[:, ::2])


def test_client_handlers_see_unpacked_messages_and_send_packed_replies():
    from lorm_flwr.client.handlers import _on_the_wire

    two = {"a": torch.ones(2), "b": torch.zeros(3)}
    request = Message(pack_content(train_content(two, 1)), dst_node_id=1, message_type="train")
    packed = request.content
    seen = []

    def handler(msg: Message, context) -> Message:
        seen.append(list(msg.content[wire.ARRAYS].keys()))
        return Message(train_content(two, 4), reply_to=msg)

    reply = _on_the_wire(handler)(request, None)
    assert seen == [["a", "b"]]  # the handler got the arrays by name
    assert list(reply.content[wire.ARRAYS].keys()) == [wire.PACKED]  # and its reply left packed
    assert request.content is packed  # the caller's message is left as it came

    def failing(msg: Message, context) -> Message:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _on_the_wire(failing)(request, None)
    assert request.content is packed

    def error(msg: Message, context) -> Message:
        return Message(Error(code=1, reason="no"), reply_to=msg)

    assert _on_the_wire(error)(request, None).error.reason == "no"  # errors pass as they are


def test_a_layout_of_a_layout_is_refused():
    content = _packed()
    content["arrays" + wire.PACKED_LAYOUT * 2] = ConfigRecord({"anything": "x" * 1000})
    with pytest.raises(PackingError, match="describes another layout"):
        unpack_content(content)


def test_a_reply_carrying_a_layout_of_a_layout_is_rejected_named_and_counted():
    """Such a record was dropped unseen and its bytes were missing from ``bytes_up``."""
    extra = ConfigRecord({"padding": "x" * 5000})

    def smuggling(m: Message) -> RecordDict:
        content = pack_content(train_content({"a": torch.ones(2), "b": torch.ones(3)}, 5))
        content[wire.ARRAYS + wire.PACKED_LAYOUT * 2] = extra
        return content

    def decode(msg: Message) -> list[str]:
        return list(msg.content[wire.ARRAYS].keys())

    def messages():
        content = train_content({"a": torch.ones(2), "b": torch.ones(3)}, 1)
        return [Message(content, dst_node_id=1, message_type="train")]

    grid = ScriptedGrid([1], [{1: smuggling}])
    values, log = exchange(grid, messages, decode, kind="train", min_replies=0, retries=0,
                           timeout=1)  # fmt: skip
    assert values == []
    assert len(log.rejected) == 1 and log.rejected[0].startswith("train, node 1: layout")
    assert "another layout" in log.rejected[0]
    assert log.bytes_up >= extra.count_bytes()  # everything the reply carried is counted
