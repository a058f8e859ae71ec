"""The end of a task: LoRM's statistics exchange, the cross-task merge, evaluation, the
accuracy-matrix row and the adapter export (or, for FedSA, the clients' own models)."""

from __future__ import annotations

import logging
import time

from flwr.app import Message, RecordDict

from lorm_flwr import wire
from lorm_flwr.models.export import export_adapter
from lorm_flwr.runtime import model_of
from lorm_flwr.server.evaluation import evaluate_global
from lorm_flwr.server.exchange import (
    ExchangeFailed,
    ExchangeLog,
)
from lorm_flwr.server.rounds import FederatedRun
from lorm_flwr.server.strategies.base import Gathered, TaskModel, Tensors

__all__ = ["end_task"]

log = logging.getLogger("flwr.lorm")


def end_task(run: FederatedRun, task: int, tensors: Tensors) -> None:
    """LoRM's statistics exchange, then evaluate, fill the matrix row, export the adapter.

    With a global model, all after the cross-task merge (evaluation, export, the row and
    the checkpoint) is put off until the next task's messages are out
    (:meth:`FederatedRun.later`): the next task trains on its own fresh factors.
    """
    strategy, cfg = run.strategy, run.cfg
    started, put_off = time.perf_counter(), run.pending_seconds
    exchanges: list[ExchangeLog] = []
    nodes = run.trained_on(task)

    def query(record_on: Tensors, plan: wire.Instructions) -> Gathered:
        spec = strategy.reply_spec(plan)
        content = RecordDict(
            {wire.ARRAYS: wire.tensors_to_arrays(record_on), wire.CONFIG: plan.to_config()}
        )

        def messages() -> list[Message]:
            return [
                Message(content, dst_node_id=n, message_type=wire.QUERY_TASK_GRAMS) for n in nodes
            ]

        def decode(msg: Message) -> wire.Reply:
            size = run.shard_size(msg.metadata.src_node_id, task)
            return wire.decode_reply(msg, spec, num_examples=size)

        try:
            replies, entry = run._exchange(messages, decode, "task-grams", fold=Gathered)
        except ExchangeFailed as exc:
            exc.where = {"task": task, "round_in_task": cfg.rounds_per_task}
            raise
        exchanges.append(entry)
        return replies

    final = strategy.end_task(task, tensors, query)
    # The statistics exchange and the cross-task merge, less the last round's work done
    # meanwhile (counted in its row); evaluation and export are added below.
    query_and_fold_seconds = time.perf_counter() - started - (run.pending_seconds - put_off)
    checkpoint = run.checkpoint(task + 1, 0, tensors) if run.checkpoint else None

    def finish() -> None:
        began = time.perf_counter()
        if strategy.has_global_model:
            per_task, summary = _evaluate_and_export(run, task, final)
        else:
            # No global model: the clients' own models, evaluated on their own test splits.
            personal = run.recorder.rounds[-1]["personalised"]
            per_task = personal["per_task_weighted"]
            summary = {
                "accuracy": personal["accuracy_weighted"],
                "accuracy_unweighted": personal["accuracy_unweighted"],
                "correct": personal["correct"], "total": personal["total"],
            }  # fmt: skip
        for entry in exchanges:
            summary[entry.kind] = entry.to_dict()
        # The statistics exchange, the cross-task merge, evaluation and the adapter export.
        summary["seconds"] = query_and_fold_seconds + time.perf_counter() - began
        run.recorder.end_task(task, per_task, summary)
        log.info(
            "lorm-flwr: after task %d/%d: accuracy on seen classes %.3f, per task %s",
            task + 1, run.scenario.num_tasks, summary["accuracy"],
            [round(a, 3) for a in per_task],
        )  # fmt: skip
        if checkpoint is not None:
            checkpoint(run.recorder.task_end[-1])

    if strategy.has_global_model:
        run.later(finish)
    else:  # it reads the last round's row: that round's work first
        run.flush()
        finish()


def _evaluate_and_export(run: FederatedRun, task: int, final: TaskModel) -> tuple[list, dict]:
    """The task's final global model: its accuracy (and validation accuracy), and the
    adapter written as ``adapters/task-<task>`` and ``adapter``."""
    cfg = run.cfg
    ev = evaluate_global(cfg, run.scenario, task, final.tensors, rank=final.rank, alpha=final.alpha)
    summary = {
        "accuracy": ev.accuracy, "correct": ev.correct, "total": ev.total,
        "adapter_rank": final.rank,
    }  # fmt: skip
    if cfg.validation_fraction > 0:  # for choosing settings; the test split reports
        val = evaluate_global(cfg, run.scenario, task, final.tensors, rank=final.rank,
                              alpha=final.alpha, split="validation")  # fmt: skip
        summary["validation"] = {"accuracy": val.accuracy, "per_task": val.per_task,
                                 "correct": val.correct, "total": val.total}  # fmt: skip
    model = model_of(cfg, rank=final.rank, alpha=final.alpha)
    metrics = {f"accuracy on classes seen after task {task}": ev.accuracy,
               "accuracy per task": ev.per_task}  # fmt: skip
    tasks = [list(t) for t in run.scenario.tasks]
    for where in (
        run.recorder.folder / "adapters" / f"task-{task}",
        run.recorder.folder / "adapter",
    ):
        export_adapter(model, final.tensors, where, cfg, tasks, metrics)
    return ev.per_task, summary
