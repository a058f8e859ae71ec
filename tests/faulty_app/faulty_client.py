"""The app's own ClientApp handlers, behind a mod that makes partition 0 a bad client.

Partition 0 answers every training round with a malformed reply, a different kind
each round (NaN tensors, an extra NaN record, a forged sample count, a metric that
is a list, a record of the wrong type, a packed record whose layout lies about its
length), and LoRM's end-of-task query with NaN Grams; the others answer normally.
Replies are corrupted as built (unpacked) and packed again, as the wire has them. Used by
tests/test_bad_client.py through a copy of the app whose clientapp is this module.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from harness.local_federation import ROOT
from lorm_flwr.wire.keys import PACKED_LAYOUT
from lorm_flwr.wire.packing import pack_content, unpack_content

# The checkout's client_app.py itself (an installed copy of it could be stale).
_spec = importlib.util.spec_from_file_location("lorm_flwr_client_app", ROOT / "client_app.py")
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)

CORRUPTIONS = ("nan", "extra-record", "forged-count", "list-metric", "wrong-type", "bad-layout")


def _nan_record(record: ArrayRecord) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(np.full(v.numpy().shape, np.nan, dtype=np.float32)) for k, v in record.items()}
    )


def corrupt(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if int(context.node_config["partition-id"]) != 0 or reply.has_error():
        return reply
    content = unpack_content(reply.content)
    if msg.metadata.message_type == "query.task_grams":  # LoRM's end of task: NaN Grams
        content["grams"] = _nan_record(content["grams"])
        reply.content = pack_content(content)
        return reply
    if msg.metadata.message_type != "train":
        return reply
    count = int(context.state["bad-replies"]["n"]) if "bad-replies" in context.state else 0
    context.state["bad-replies"] = ConfigRecord({"n": count + 1})
    kind = CORRUPTIONS[count % len(CORRUPTIONS)]
    first = next(name for name in content if isinstance(content[name], ArrayRecord))
    metrics = dict(content["metrics"])
    if kind == "nan":
        content[first] = _nan_record(content[first])
    elif kind == "extra-record":
        content["more"] = _nan_record(content[first])
    elif kind == "forged-count":
        content["metrics"] = MetricRecord({**metrics, "num-examples": 10**15})
    elif kind == "list-metric":
        content["metrics"] = MetricRecord({**metrics, "train-loss": [0.1, 0.2]})
    elif kind == "wrong-type":
        content[first] = ConfigRecord({"x": 1})
    reply.content = pack_content(content)
    if kind == "bad-layout":  # the first packed record's layout claims a byte more per array
        name = next(n for n in reply.content if n.endswith(PACKED_LAYOUT))
        layout = reply.content[name]
        reply.content[name] = ConfigRecord(
            {**{k: layout[k] for k in layout}, "nbytes": [n + 1 for n in layout["nbytes"]]}
        )
    return reply


app = ClientApp(mods=[corrupt])
app.train()(real.train)
app.evaluate()(real.evaluate)
app.query("hello")(real.hello)
app.query("task_grams")(real.task_grams_query)
