"""The non-federated references: one process, all clients' data pooled (no Flower).

- ``joint``: every task's training data at once, cross-entropy over all classes;
  the ceiling of the LoRM paper's table ("Joint").
- ``joint-incremental``: the pooled data with the tasks still in sequence, the
  same loss as the federated clients (current task's logits only). It separates
  what federation costs from what incremental learning costs.

Each sample is seen ``rounds-per-task x local-epochs`` times, as in the federated
runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from lorm_flwr.config import RunConfig
from lorm_flwr.data.scenario import Scenario
from lorm_flwr.models.adapters import get_tensors, set_tensors, set_trainable
from lorm_flwr.models.export import export_adapter
from lorm_flwr.runtime import data_of, initial_tensors, input_spec, model_of, set_threads
from lorm_flwr.seeds import joint_phase_seed
from lorm_flwr.server.evaluation import evaluate_global
from lorm_flwr.server.results import (
    RoundRow,
    RunRecorder,
    check_output_dir,
    provenance,
    run_folder,
)
from lorm_flwr.server.tracking import check_tracking, start_tracking
from lorm_flwr.train import pick_device, train_local

__all__ = ["JOINT_STRATEGIES", "main_joint", "run_joint"]

log = logging.getLogger("flwr.lorm")

JOINT_STRATEGIES = ("joint", "joint-incremental")


def run_joint(
    cfg: RunConfig, scenario: Scenario, recorder: RunRecorder, report: Callable[[str], None]
) -> None:
    """Train centrally and record results in the federated runs' format."""
    set_threads(cfg)
    data = data_of(cfg)
    model = model_of(cfg)
    set_tensors(model, dict(initial_tensors(cfg)))
    set_trainable(model, train_a=True, train_b=True, train_head=True)
    start = time.perf_counter()
    phases = (
        [list(range(scenario.num_tasks))]
        if cfg.strategy == "joint"
        else [[t] for t in range(scenario.num_tasks)]
    )
    for phase, tasks in enumerate(phases):
        classes = [c for t in tasks for c in scenario.tasks[t]]
        idx = np.sort(np.concatenate([s for t in tasks for s in scenario.shards[t]]))
        t0 = time.perf_counter()
        stats = train_local(
            model, data.train_x[idx], data.train_y[idx], task_classes=classes,
            inputs=input_spec(cfg, train=True), epochs=cfg.rounds_per_task * cfg.local_epochs,
            steps=cfg.rounds_per_task * cfg.local_steps, warmup_steps=cfg.warmup_steps,
            model_dropout=cfg.model_dropout, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
            lr={"A": cfg.lr_of("A"), "B": cfg.lr_of("B"), "head": cfg.lr},
            optimizer=cfg.optimizer, precision=cfg.precision,
            device=pick_device(cfg.device), seed=joint_phase_seed(cfg.seed, phase),
            objective="causal-lm" if cfg.generation else "classification",
        )  # fmt: skip
        train_seconds = time.perf_counter() - t0
        last_task = tasks[-1]
        tensors = get_tensors(model)
        ev = evaluate_global(cfg, scenario, last_task, tensors)
        row = RoundRow(last_task, 0, train_loss=stats.loss, accuracy=ev.accuracy,
                       per_task_accuracy=ev.per_task, replies=0,
                       elapsed_seconds=time.perf_counter() - start)  # fmt: skip
        row.extra = {
            "client_train_seconds_sum": train_seconds,
            "client_train_seconds_max": train_seconds,
        }
        recorder.add_round(row)
        summary = {"accuracy": ev.accuracy, "correct": ev.correct, "total": ev.total,
                   "adapter_rank": cfg.lora_rank}  # fmt: skip
        if cfg.validation_fraction > 0:
            val = evaluate_global(cfg, scenario, last_task, tensors, split="validation")
            summary["validation"] = {"accuracy": val.accuracy, "per_task": val.per_task,
                                     "correct": val.correct, "total": val.total}  # fmt: skip
        recorder.end_task(last_task, ev.per_task, summary)
        recorder.track()
        metrics = {
            f"accuracy on classes seen after task {last_task}": ev.accuracy,
            "accuracy per task": ev.per_task,
        }
        export_adapter(
            model,
            tensors,
            recorder.folder / "adapter",
            cfg,
            [list(t) for t in scenario.tasks],
            metrics,
        )
        report(
            f"lorm-flwr: {cfg.strategy} phase {phase + 1}/{len(phases)} (tasks {tasks}): "
            f"accuracy on seen classes {ev.accuracy:.3f}"
        )


def main_joint(cfg: RunConfig, run_id: int | None = None) -> None:
    """``joint`` / ``joint-incremental`` in the ServerApp process, no federation.

    The pooled data is every client's shard, i.e. the whole training set of each
    task, so the split over clients does not matter; one client is assumed.
    """
    from lorm_flwr.runtime import scenario_of

    check_tracking(cfg)
    check_output_dir(cfg)
    scenario = scenario_of(cfg, 1)
    folder = run_folder(cfg)
    recorder = RunRecorder(cfg, folder, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    recorder.accuracy_kind = "global"
    recorder.provenance = provenance(run_id)
    log.info("lorm-flwr: %s (no federation), writing results to %s", cfg.strategy, folder)
    start = time.perf_counter()
    try:
        start_tracking(recorder)
        run_joint(cfg, scenario, recorder, lambda line: log.info("%s", line))
        recorder.finish(start)
    except BaseException:
        try:
            recorder.status = "failed"
            recorder.write()
        finally:
            recorder.stop_tracking(failed=True)
        raise
