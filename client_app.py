"""Flower ClientApp: translates messages into calls to :mod:`lorm_flwr.client` and back."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lorm_flwr import protocol as P
from lorm_flwr.client import Instructions, evaluate_personal, task_grams, train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.limits import check_reply_size

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise KeyError(
            f"node config lacks {exc}; start the SuperNode with "
            "--node-config 'partition-id=K num-partitions=N'"
        ) from None


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    pid, num = _partition(context)
    metrics = MetricRecord({P.MET_PARTITION_ID: pid, P.MET_NUM_PARTITIONS: num})
    return Message(RecordDict({P.METRICS: metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    c = msg.content[P.CONFIG]
    plan = Instructions(
        task=int(c[P.CFG_TASK]),
        round_in_task=int(c[P.CFG_ROUND_IN_TASK]),
        train_a=bool(c[P.CFG_TRAIN_A]),
        train_b=bool(c[P.CFG_TRAIN_B]),
        train_head=bool(c[P.CFG_TRAIN_HEAD]),
        stats=str(c[P.CFG_STATS]),
        seed=int(c[P.CFG_SEED]),
        local=frozenset(g for g in str(c.get(P.CFG_LOCAL, "")).split(",") if g),
    )
    result = train_round(
        cfg, pid, num, P.arrays_to_tensors(msg.content[P.ARRAYS]), plan, _local(context)
    )
    if result.local is not None:
        # The client's own parts (FedSA's B and head) stay here, across rounds and tasks.
        context.state[P.LOCAL_STATE] = P.tensors_to_arrays(result.local)
    content = RecordDict(
        {
            P.ARRAYS: P.tensors_to_arrays(result.tensors),
            P.METRICS: P.reply_metrics(
                result.num_examples,
                **{
                    P.MET_TRAIN_LOSS: result.train_loss,
                    P.MET_TRAIN_SECONDS: result.train_seconds,
                    P.MET_STATS_SECONDS: result.stats_seconds,
                },
            ),
        }
    )
    if result.stats:
        content[P.STATS] = P.tensors_to_arrays(result.stats)
    check_reply_size(content, cfg)
    return Message(content, reply_to=msg)


def _local(context: Context) -> dict | None:
    if P.LOCAL_STATE in context.state:
        return P.arrays_to_tensors(context.state[P.LOCAL_STATE])
    return None


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation: global parts + this client's own parts, on its test split."""
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    task = int(msg.content[P.CONFIG][P.CFG_TASK])
    correct, total = evaluate_personal(
        cfg, pid, num, P.arrays_to_tensors(msg.content[P.ARRAYS]), _local(context), task
    )
    values: dict[str, int | float] = {P.MET_NUM_EXAMPLES: max(sum(total), 1)}
    for k, (c, t) in enumerate(zip(correct, total)):
        values[P.MET_CORRECT.format(k)] = c
        values[P.MET_TOTAL.format(k)] = t
    return Message(RecordDict({P.METRICS: MetricRecord(values)}), reply_to=msg)


@app.query("task_stats")
def task_stats(msg: Message, context: Context) -> Message:
    """End of task: Grams of the adapted layers' inputs on the model sent, on this task's data."""
    cfg = RunConfig.from_mapping(context.run_config)
    pid, num = _partition(context)
    c = msg.content[P.CONFIG]
    stats, n = task_grams(
        cfg,
        pid,
        num,
        P.arrays_to_tensors(msg.content[P.ARRAYS]),
        task=int(c[P.CFG_TASK]),
        rank=int(c[P.CFG_RANK]),
        alpha=float(c[P.CFG_ALPHA]),
    )
    content = RecordDict({P.STATS: P.tensors_to_arrays(stats), P.METRICS: P.reply_metrics(n)})
    return Message(content, reply_to=msg)
