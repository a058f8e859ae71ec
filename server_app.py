"""Flower ServerApp: drives tasks x rounds, evaluates, and writes the results.

Thin: the merges live in the strategies, the math in ``lorm_flwr.merge``, the
bookkeeping in ``lorm_flwr.results`` and ``lorm_flwr.continual``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from lorm_flwr import protocol as P
from lorm_flwr.checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_path,
    config_changes,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.continual import average_forgetting, final_average_accuracy, reference_forgetting
from lorm_flwr.evaluation import evaluate_global
from lorm_flwr.joint import JOINT_STRATEGIES, run_joint
from lorm_flwr.limits import check_message_sizes
from lorm_flwr.results import RunRecorder, export_adapter, run_folder
from lorm_flwr.runtime import initial_tensors, layout_of, model_of, scenario_of
from lorm_flwr.strategies import strategy_class
from lorm_flwr.strategies.base import with_retries

log = logging.getLogger("flwr.lorm")
app = ServerApp()

NODE_WAIT_SECONDS = 300.0


def _wait_for_nodes(grid: Grid, count: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} SuperNodes connected after {NODE_WAIT_SECONDS:.0f} s; "
                f"min-clients={count}"
            )
        time.sleep(1.0)


def _partitions(grid: Grid, nodes: list[int]) -> dict[int, int]:
    """Ask every node for its partition; all must agree on ``num-partitions``."""
    queries = [
        Message(RecordDict(), dst_node_id=n, message_type=P.QUERY_HELLO) for n in nodes
    ]
    replies = list(grid.send_and_receive(queries, timeout=600))
    mapping: dict[int, int] = {}
    totals = set()
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} failed to start: {r.error.reason}")
        m = r.content[P.METRICS]
        mapping[r.metadata.src_node_id] = int(m[P.MET_PARTITION_ID])
        totals.add(int(m[P.MET_NUM_PARTITIONS]))
    if len(totals) != 1:
        raise RuntimeError(f"nodes disagree on num-partitions: {sorted(totals)}")
    if sorted(mapping.values()) != list(range(totals.pop())):
        raise RuntimeError(f"partition ids {sorted(mapping.values())} are not 0..N-1 once each")
    return mapping


def _round_evaluator(cfg, scenario, task, strategy, recorder, start):
    """Flower's ``evaluate_fn`` for one task: evaluate, record, report progress."""

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None  # the task's starting model; evaluated at the previous task end
        stats = strategy.rounds[-1]
        entry = {
            "task": task,
            "round_in_task": server_round - 1,
            "train_loss": stats.train_loss,
            "bytes_down": stats.bytes_down,
            "bytes_up": stats.bytes_up,
            "replies": stats.replies,
            "failures": stats.failures,
            "rejected": stats.rejected,
            "merge_seconds": stats.merge_seconds,
            "elapsed_seconds": time.perf_counter() - start,
            **stats.extra,
        }
        if stats.personal:
            entry["personalised"] = stats.personal
        if strategy.has_global_model:
            ev = evaluate_global(cfg, scenario, task, P.arrays_to_tensors(arrays))
            entry["accuracy"], entry["per_task_accuracy"] = ev.accuracy, ev.per_task
        else:
            entry["accuracy"] = stats.personal.get("accuracy_weighted", float("nan"))
            entry["per_task_accuracy"] = stats.personal.get("per_task_weighted", [])
        recorder.add_round(entry)
        log.info(
            "lorm-flwr: task %d/%d round %d/%d: %s accuracy on seen classes %.3f, "
            "train loss %.3f, %d B down, %d B up",
            task + 1, scenario.num_tasks, server_round, cfg.rounds_per_task,
            "global" if strategy.has_global_model else "personalised", entry["accuracy"],
            stats.train_loss, stats.bytes_down, stats.bytes_up,
        )  # fmt: skip
        return MetricRecord({"accuracy": float(entry["accuracy"])})

    return evaluate_round


def _end_task(cfg, scenario, task, grid, strategy, recorder, tensors) -> None:
    """Evaluate the model after the task, fill the accuracy-matrix row, export the adapter."""
    final_model = strategy.end_task(task, grid, tensors)
    if strategy.has_global_model:
        ev = evaluate_global(
            cfg, scenario, task, final_model.tensors, rank=final_model.rank, alpha=final_model.alpha
        )
        per_task, summary = ev.per_task, {
            "accuracy": ev.accuracy, "correct": ev.correct, "total": ev.total,
            "adapter_rank": final_model.rank,
        }  # fmt: skip
        model = model_of(cfg, rank=final_model.rank, alpha=final_model.alpha)
        export_adapter(model, final_model.tensors, recorder.folder / "adapters" / f"task-{task}")
        export_adapter(model, final_model.tensors, recorder.folder / "adapter")
    else:
        # No global model: the clients' own models, evaluated on their own test splits.
        personal = strategy.rounds[-1].personal
        per_task = personal["per_task_weighted"]
        summary = {
            "accuracy": personal["accuracy_weighted"],
            "accuracy_unweighted": personal["accuracy_unweighted"],
            "correct": personal["correct"], "total": personal["total"],
        }  # fmt: skip
    recorder.end_task(task, per_task, summary)
    log.info(
        "lorm-flwr: after task %d/%d: accuracy on seen classes %.3f, per task %s",
        task + 1, scenario.num_tasks, summary["accuracy"], [round(a, 3) for a in per_task],
    )  # fmt: skip


def _finish(recorder: RunRecorder, start: float) -> None:
    last = recorder.task_end[-1]
    recorder.final = {
        "final_average_accuracy": final_average_accuracy(last["correct"], last["total"]),
        "average_forgetting": average_forgetting(recorder.accuracy_matrix),
        "reference_forgetting": reference_forgetting(recorder.accuracy_matrix),
        "forgetting_definition": "mean over k<T-1 of max_{t<T-1} a[t][k] - a[T-1][k]",
        "bytes_down_total": sum(r["bytes_down"] for r in recorder.rounds),
        "bytes_up_total": sum(r["bytes_up"] for r in recorder.rounds),
        "wall_seconds": time.perf_counter() - start,
    }
    recorder.status = "completed"
    recorder.write()
    recorder.plot()
    log.info(
        "lorm-flwr: done. final average accuracy %.3f, average forgetting %.3f",
        recorder.final["final_average_accuracy"], recorder.final["average_forgetting"],
    )  # fmt: skip
    log.info("lorm-flwr: results in %s", recorder.folder)


def _main_joint(cfg: RunConfig) -> None:
    """``joint`` / ``joint-incremental``: pooled data in this process, no federation.

    The pooled data is every client's shard, i.e. the whole training set of each
    task, so the split over clients does not matter; one client is assumed.
    """
    scenario = scenario_of(cfg, 1)
    folder = run_folder(cfg)
    recorder = RunRecorder(cfg, folder, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    recorder.accuracy_kind = "global"
    log.info("lorm-flwr: %s (no federation), writing results to %s", cfg.strategy, folder)
    start = time.perf_counter()
    try:
        run_joint(cfg, scenario, recorder, lambda line: log.info("%s", line))
    except BaseException:
        recorder.status = "failed"
        recorder.write()
        raise
    _finish(recorder, start)


def _dry_run(grid: Grid, cfg: RunConfig) -> None:
    """Print the plan (tasks, shards, message sizes) and stop; nothing is trained."""
    from lorm_flwr.plan import make_plan

    num_clients = 1 if cfg.strategy in JOINT_STRATEGIES else len(_wait_for_nodes(grid, cfg.min_clients))
    for line in make_plan(cfg, num_clients).lines():
        log.info("lorm-flwr: %s", line)


def _resume_point(cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint to continue from, checked against this run's config before any work."""
    if not cfg.resume_from:
        return None
    try:
        checkpoint = load_checkpoint(cfg.resume_from)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"resume-from={cfg.resume_from!r}: {exc}") from None
    changes = config_changes(checkpoint.config, cfg.to_dict())
    if changes:
        raise ConfigError(
            f"resume-from={cfg.resume_from!r}: the run config differs from the checkpoint's in "
            f"keys a resumed run must keep: {'; '.join(changes)}"
        )
    return checkpoint


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)  # bad values stop here
    if cfg.dry_run:
        _dry_run(grid, cfg)
        return
    if cfg.strategy in JOINT_STRATEGIES:
        _main_joint(cfg)
        return
    checkpoint = _resume_point(cfg)
    nodes = _wait_for_nodes(grid, cfg.min_clients)
    partitions = _partitions(grid, nodes)
    num_clients = len(partitions)
    scenario = scenario_of(cfg, num_clients)  # impossible splits stop here
    log.info(
        "lorm-flwr: %s on %s, %d clients, %d tasks %s, shard sizes %s",
        cfg.strategy, cfg.dataset, num_clients, scenario.num_tasks,
        [list(t) for t in scenario.tasks], scenario.shard_sizes(),
    )  # fmt: skip

    model = model_of(cfg)
    strategy = strategy_class(cfg.strategy)(cfg, layout_of(model))
    strategy.partition_of = partitions
    message_bytes = check_message_sizes(strategy, cfg.max_message_bytes)  # too big stops here
    tasks = [list(t) for t in scenario.tasks]
    if checkpoint is None:
        folder = run_folder(cfg)
        recorder = RunRecorder(cfg, folder, tasks, scenario.shard_sizes())
        recorder.message_bytes = message_bytes
        recorder.accuracy_kind = (
            "global" if strategy.has_global_model else "personalised, sample-weighted over clients"
        )
        tensors = dict(initial_tensors(cfg))  # the same seeded start as every client's
        first_task, first_round, elapsed = 0, 0, 0.0
    else:
        folder = checkpoint_path(cfg.resume_from).parent
        recorder = RunRecorder(cfg, folder, tasks, scenario.shard_sizes())
        recorder.load_state(checkpoint.recorder)
        if checkpoint.recorder.get("shard_sizes", recorder.shard_sizes) != recorder.shard_sizes:
            raise ConfigError(
                f"resume-from: the checkpoint was made with shards {checkpoint.recorder['shard_sizes']}, "
                f"this federation gives {recorder.shard_sizes}: start the same number of clients"
            )
        strategy.load_state_dict(checkpoint.strategy)
        restore_rng(checkpoint.rng)
        tensors = dict(checkpoint.tensors)
        first_task, first_round, elapsed = checkpoint.task, checkpoint.round_in_task, checkpoint.elapsed_seconds
        recorder.resumed.append({"task": first_task, "round_in_task": first_round,
                                 "at": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
        log.info("lorm-flwr: resuming task %d round %d from %s", first_task, first_round,
                 checkpoint_path(cfg.resume_from))  # fmt: skip
    log.info("lorm-flwr: writing results to %s", folder)
    start = time.perf_counter() - elapsed

    def save(task: int, round_in_task: int, current: dict) -> None:
        save_checkpoint(folder, Checkpoint(
            config=cfg.to_dict(), task=task, round_in_task=round_in_task, tensors=current,
            strategy=strategy.state_dict(),
            recorder={**recorder.state(), "shard_sizes": recorder.shard_sizes},
            rng=capture_rng(), elapsed_seconds=time.perf_counter() - start,
        ))  # fmt: skip

    try:
        for task in range(first_task, scenario.num_tasks):
            round0 = first_round if task == first_task else 0
            if round0 == 0:
                tensors = strategy.begin_task(task, tensors)
            else:
                strategy.task = task  # mid-task: the factors are the checkpoint's
            if round0 < cfg.rounds_per_task:
                evaluate_round = _round_evaluator(cfg, scenario, task, strategy, recorder, start)
                result = strategy.start(
                    grid=grid,
                    initial_arrays=P.tensors_to_arrays(tensors),
                    num_rounds=cfg.rounds_per_task,
                    timeout=cfg.round_timeout,
                    train_config=ConfigRecord(),
                    evaluate_fn=evaluate_round,
                    first_round=round0 + 1,
                    on_round_end=lambda rnd, arrays, t=task: save(t, rnd, P.arrays_to_tensors(arrays)),
                )
                tensors = P.arrays_to_tensors(result.arrays)
            with_retries(
                lambda _attempt: _end_task(cfg, scenario, task, grid, strategy, recorder, tensors),
                cfg.round_retries,
            )
            save(task + 1, 0, tensors)
    except BaseException as exc:
        recorder.status = "failed"
        recorder.error = f"{type(exc).__name__}: {exc}"
        if _unrecorded(strategy, recorder):
            recorder.failed_round = asdict(strategy.rounds[-1])
        recorder.write()
        log.error(
            "lorm-flwr: run stopped: %s. Results so far are in %s; continue with "
            "--run-config \"resume-from='%s'\" (same other keys)",
            exc, folder, folder,
        )  # fmt: skip
        raise

    _finish(recorder, start)


def _unrecorded(strategy, recorder) -> bool:
    """Whether the strategy's last round failed before the recorder saw it."""
    if not strategy.rounds:
        return False
    last = strategy.rounds[-1]
    return not recorder.rounds or (last.task, last.round_in_task) != (
        recorder.rounds[-1]["task"], recorder.rounds[-1]["round_in_task"]
    )
