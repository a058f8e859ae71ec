"""Build Flower messages and a scripted Grid outside a run (test helpers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorm_flwr import wire
from lorm_flwr.math.symmetric import pack_upper

# Messages read the run and node ids of the current task; give them dummy ones.
TaskIdentity.run_id = 1
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1


def train_content(
    tensors: dict[str, torch.Tensor] | None,
    num_examples: int,
    grams: dict[str, torch.Tensor] | None = None,
    *,
    packed: bool = True,
    **metrics: float,
) -> RecordDict:
    """A client's train reply as the ClientApp builds it (``tensors=None``: no arrays record).

    Square symmetric statistics (``G``, ``AGA``) travel as their upper triangle, as the
    client sends them; ``packed=False`` sends them as given.
    """
    values = {wire.NUM_EXAMPLES: num_examples, wire.TRAIN_LOSS: 0.5, wire.TRAIN_SECONDS: 1.0,
              wire.GRAMS_SECONDS: 0.1, **metrics}  # fmt: skip
    content = RecordDict({wire.METRICS: wire.metrics_record(values)})
    if tensors is not None:
        content[wire.ARRAYS] = wire.tensors_to_arrays(tensors)
    if grams is not None:
        if packed:
            grams = {k: pack_upper(v) if _symmetric(k, v) else v for k, v in grams.items()}
        content[wire.GRAMS] = wire.tensors_to_arrays(grams)
    return content


def echo_node(scenario, first_node: int) -> Callable[[Message], RecordDict]:
    """A healthy node that sends back the tensors it got, with its shard's size (node
    ``first_node + p`` holds partition p)."""

    def reply(message: Message) -> RecordDict:
        from lorm_flwr.wire.packing import unpack_content

        pid = message.metadata.dst_node_id - first_node
        content = unpack_content(message.content)
        task = wire.Instructions.from_config(content[wire.CONFIG]).task
        tensors = wire.arrays_to_tensors(content[wire.ARRAYS])
        return train_content(tensors, len(scenario.shards[task][pid]))

    return reply


def _symmetric(key: str, t: torch.Tensor) -> bool:
    return (
        key.rsplit("|", 1)[-1] in wire.SYMMETRIC_PARTS and t.dim() == 2 and t.shape[0] == t.shape[1]
    )


# What a scripted node does with a message: reply with this content, fail, or stay silent.
Behaviour = RecordDict | Callable[[Message], RecordDict] | str


class ScriptedGrid:
    """A Grid whose nodes answer as scripted, one script entry per attempt (the last repeats).

    A script entry maps node -> content (or a function of the request returning one),
    ``"error"`` (an error reply) or ``"silent"`` (no reply: a timeout).

    Replies come back through ``push_messages``/``pull_messages`` in ``arrival`` order
    (default: reversed, so that exchanges must reorder them), one per pull; time is a
    fake clock that ``sleep`` advances, so a timeout costs no real time.
    """

    def __init__(
        self, nodes: list[int], script: list[dict[int, Behaviour]], arrival: str = "reversed"
    ) -> None:
        self.nodes, self.script, self.calls = list(nodes), list(script), 0
        self.sent: list[list[Message]] = []
        self.arrival = arrival
        self.now = 0.0
        self._replies: dict[str, Message] = {}
        self._ids = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def push_messages(self, messages):
        messages = list(messages)
        replies = self.send_and_receive(messages)
        ids = []
        for m in messages:
            self._ids += 1
            ids.append(f"m{self._ids}")
        by_node = {m.metadata.dst_node_id: i for m, i in zip(messages, ids)}
        if self.arrival == "reversed":
            replies = replies[::-1]
        for r in replies:
            r.metadata.__dict__["_reply_to_message_id"] = by_node[r.metadata.src_node_id]
            self._replies[by_node[r.metadata.src_node_id]] = r
        self._order = [by_node[r.metadata.src_node_id] for r in replies]
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        for i in self._order:
            if i in wanted and i in self._replies:
                return [self._replies.pop(i)]
        return []

    def send_and_receive(self, messages, timeout=None):
        behaviour = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        self.sent.append(list(messages))
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            what = behaviour.get(node, "silent")
            if what == "silent":
                continue
            if what == "error":
                replies.append(Message(Error(code=0, reason=f"node {node} crashed"), reply_to=m))
                continue
            content = what(m) if callable(what) else what
            replies.append(Message(content, reply_to=m))
        return replies


def reply_to(node: int, content: RecordDict) -> Message:
    """A reply from ``node`` (outside any exchange)."""
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
