"""The ClientApp's message handlers: decode the server's instructions, call
:mod:`lorm_flwr.client.round`, and reply with exactly what :func:`lorm_flwr.wire.train_reply_spec`
declares. ``client_app.py`` runs them in its own process, or forwards each message to
the node's long-lived worker (:mod:`lorm_flwr.client.node_worker`), which runs them there.

Client code only: nothing here (or below it) imports the server's strategies.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict

from lorm_flwr import wire
from lorm_flwr.client.personal_adapter import write_personal_adapter
from lorm_flwr.client.round import evaluate_personal, task_grams, train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.runtime import model_of
from lorm_flwr.wire.limits import check_reply_size
from lorm_flwr.wire.packing import pack_content, unpack_content

log = logging.getLogger(__name__)


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise KeyError(
            f"node config lacks {exc}; start the SuperNode with "
            "--node-config 'partition-id=K num-partitions=N'"
        ) from None


def _reply(content: RecordDict, msg: Message, cfg: RunConfig) -> Message:
    check_reply_size(content, cfg)
    return Message(content, reply_to=msg)


def _local(context: Context) -> dict | None:
    """This client's own parts as they stand (FedSA's B and head), if it has any yet."""
    if wire.LOCAL_STATE in context.state:
        return wire.arrays_to_tensors(context.state[wire.LOCAL_STATE])
    return None


def _local_at_round_start(plan: wire.Instructions, context: Context) -> dict | None:
    """The local parts this round starts from, also when the server sends it again.

    A round the server retries (too few valid replies) must start where its first
    attempt started, not from what that attempt trained: the parts from before the
    round are kept under ``LOCAL_BEFORE`` until the next round begins.
    """
    state = context.state
    this_round = {"task": plan.task, "round-in-task": plan.round_in_task}
    if wire.LOCAL_ROUND in state and dict(state[wire.LOCAL_ROUND]) == this_round:
        return (
            wire.arrays_to_tensors(state[wire.LOCAL_BEFORE]) if wire.LOCAL_BEFORE in state else None
        )
    state[wire.LOCAL_ROUND] = ConfigRecord(this_round)
    if wire.LOCAL_STATE in state:
        state[wire.LOCAL_BEFORE] = state[wire.LOCAL_STATE]
    elif wire.LOCAL_BEFORE in state:
        del state[wire.LOCAL_BEFORE]
    return _local(context)


def hello(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    return Message(wire.hello_reply(*_partition(context)), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    plan = wire.Instructions.from_config(msg.content[wire.CONFIG])
    local = _local_at_round_start(plan, context) if plan.local else None
    layout = model_layout(model_of(cfg))
    past = wire.decode_past_tasks(msg.content, layout, plan.task)  # LoRM, mean-delta Grams
    result = train_round(
        cfg, pid, num, wire.arrays_to_tensors(msg.content[wire.ARRAYS]), plan, local, past
    )
    if result.local is not None:
        # The client's own parts (FedSA's B and head) stay here, across rounds and tasks.
        context.state[wire.LOCAL_STATE] = wire.tensors_to_arrays(result.local)
    spec = wire.train_reply_spec(layout, plan, cfg.gram_alpha, cfg.head_gram_alpha)
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.TRAIN_LOSS: result.train_loss,
        wire.TRAIN_SECONDS: result.train_seconds,
        wire.GRAMS_SECONDS: result.grams_seconds,
    }
    return _reply(wire.reply_content(spec, result.tensors, result.grams, metrics), msg, cfg)


def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation: global parts + this client's own parts, on its test split."""
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    plan = wire.Instructions.from_config(msg.content[wire.CONFIG])
    shared, local = wire.arrays_to_tensors(msg.content[wire.ARRAYS]), _local(context)
    correct, total = evaluate_personal(cfg, pid, num, shared, local, plan.task, plan.split)
    if plan.export_to:  # the run's last evaluation: keep this client's own model
        accuracy = sum(correct) / max(sum(total), 1)
        metrics = {"personalised accuracy on this client's test split": accuracy,
                   "partition": pid}  # fmt: skip
        try:
            write_personal_adapter(cfg, pid, num, shared, local, plan.export_to, metrics)
        except Exception:  # a full disk or a bad base must not cost the run its last evaluation
            log.exception("lorm-flwr: partition %d could not write its adapter", pid)
    return Message(wire.evaluation_reply(correct, total), reply_to=msg)


def task_grams_query(msg: Message, context: Context) -> Message:
    """End of task: Grams of the adapted layers' inputs on the model sent, on this task's data."""
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    plan = wire.Instructions.from_config(msg.content[wire.CONFIG])
    grams, n = task_grams(cfg, pid, num, wire.arrays_to_tensors(msg.content[wire.ARRAYS]), plan)
    spec = wire.train_reply_spec(
        model_layout(model_of(cfg)), plan, cfg.gram_alpha, cfg.head_gram_alpha
    )
    return _reply(wire.reply_content(spec, {}, grams, {wire.NUM_EXAMPLES: n}), msg, cfg)


def _on_the_wire(handler: Callable[[Message, Context], Message]):
    """``handler`` between the wire and the app: the server's records unpacked before it
    runs, its reply's packed after (:mod:`lorm_flwr.wire.packing`)."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        packed = msg.content
        msg.content = unpack_content(packed)
        try:
            reply = handler(msg, context)
        finally:  # the caller's message is left as it came
            msg.content = packed
        if not reply.has_error():
            reply.content = pack_content(reply.content)
        return reply

    return run


# message kind -> handler (the kinds client_app.py registers with Flower)
HANDLERS = {
    kind: _on_the_wire(handler)
    for kind, handler in {
        "hello": hello,
        "train": train,
        "evaluate": evaluate,
        "task_grams": task_grams_query,
    }.items()
}
