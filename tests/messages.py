"""Build Flower reply messages outside a run (test helper)."""

from __future__ import annotations

import torch
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorm_flwr import protocol as P

# Messages read the run and node ids of the current task; give them dummy ones.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1


def _request(node: int) -> Message:
    return Message(RecordDict(), dst_node_id=node, message_type="train")


def reply(node: int, tensors: dict[str, torch.Tensor], num_examples: int, stats=None) -> Message:
    content = RecordDict(
        {P.ARRAYS: P.tensors_to_arrays(tensors), P.METRICS: P.reply_metrics(num_examples, **{P.MET_TRAIN_LOSS: 0.5})}
    )
    if stats is not None:
        content[P.STATS] = P.tensors_to_arrays(stats)
    return Message(content, reply_to=_request(node))


def error_reply(node: int, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=_request(node))
