"""The federated run: the run folder, the hello, tasks x rounds, task ends, checkpoints.

One round of LoRM::

    strategy.instructions -> configure_train -> exchange(send, wait, count, decode)
      -> strategy.merge(checked replies) -> [once the next round's messages are out]
      evaluate -> results row -> checkpoint

The rounds are :mod:`lorm_flwr.server.rounds`, the task ends
:mod:`lorm_flwr.server.task_end`, the hello :mod:`lorm_flwr.server.hello`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flwr.serverapp import Grid

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of, scenario_of
from lorm_flwr.server.checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_path,
    restore_rng,
    resume_point,
    save_checkpoint,
)
from lorm_flwr.server.evaluation import evaluate_global
from lorm_flwr.server.exchange import (
    ExchangeFailed,
)
from lorm_flwr.server.hello import handshake
from lorm_flwr.server.results import (
    RunRecorder,
    check_output_dir,
    mark_failed,
    provenance,
    run_folder,
)
from lorm_flwr.server.rounds import FederatedRun
from lorm_flwr.server.strategies.base import Tensors
from lorm_flwr.server.task_end import end_task
from lorm_flwr.server.tracking import check_tracking, start_tracking
from lorm_flwr.wire.limits import check_message_sizes, max_message_bytes

__all__ = ["run_federated"]

log = logging.getLogger("flwr.lorm")


def run_federated(grid: Grid, cfg: RunConfig, run_id: int | None = None) -> None:
    """The whole federated run; results and a checkpoint are written after every round.

    The run folder exists from the start: a run that fails at any point after it, the
    hello included, leaves ``results.json`` with ``status: failed`` and the error. A
    resumed run that fails before its first round marks the folder's existing
    ``results.json`` failed with the new error and keeps everything else in it (a
    completed run's stays as it is); once rounds run, it writes the results its
    checkpoint holds plus the new rounds. Only a resume refused before any work leaves
    the folder it names as it was.
    """
    started_at = time.time()  # for the start-up's timeline (benchmarks/default_run.py)
    check_tracking(cfg)  # a tracker that is not installed stops here, before any work
    checkpoint = resume_point(cfg)  # a resume it cannot honour stops here
    if checkpoint is None:
        check_output_dir(cfg)  # so does an output folder it cannot write
        folder = run_folder(cfg)
    else:
        folder = checkpoint_path(cfg.resume_from).parent
    recorder = RunRecorder(cfg, folder, tasks=[], shard_sizes=[])  # filled once the hello is done
    if checkpoint is not None:
        recorder.load_state(checkpoint.recorder)
    if recorder.provenance:  # a resume: one more Flower run, maybe on other code or versions
        now = provenance(run_id)
        recorder.provenance["flower_run_ids"].append(run_id)
        recorder.provenance.setdefault("resumed_with", []).append(
            {"commit": now["commit"], "versions": now["versions"]}
        )
    else:
        recorder.provenance = provenance(run_id)
    log.info("lorm-flwr: writing results to %s", folder)
    training: list[bool] = []  # set once the first round of this start begins
    try:
        _run(grid, cfg, checkpoint, recorder, training, started_at)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        try:
            if checkpoint is not None and not training:
                mark_failed(folder, error)  # the earlier results stay whole
            else:
                recorder.status, recorder.error = "failed", error
                if isinstance(exc, ExchangeFailed):  # the failed exchange and its round
                    recorder.failed_round = {
                        **exc.log.to_dict(), **exc.where, "failed_exchange": exc.log.kind,
                    }  # fmt: skip
                recorder.write()
        except OSError as write_error:  # never hide the run's own error behind this one
            log.error("lorm-flwr: could not write results.json: %s", write_error)
        finally:
            recorder.stop_tracking(failed=True)
        log.error(
            "lorm-flwr: run stopped: %s. Results so far are in %s; continue with "
            "--run-config \"resume-from='%s'\" (same other keys)",
            exc, folder, folder,
        )  # fmt: skip
        raise


def _run(
    grid: Grid, cfg: RunConfig, checkpoint: Checkpoint | None, recorder: RunRecorder,
    training: list[bool], started_at: float,
) -> None:  # fmt: skip
    """The hello, the scenario, then tasks x rounds from the start or the checkpoint."""
    # The server's model first (cached): a lora-rank or max-length the backbone cannot
    # hold stops the run here, before any node is asked anything.
    layout = model_layout(model_of(cfg))
    hello_at = time.time()
    partition_of, hello, num_clients = handshake(grid, cfg)
    # Where this start's time went before its first round (epoch seconds): the ServerApp
    # entered, the hello sent (after the server's model), answered, the loop's clock started.
    timeline = {"server_started_at": started_at, "hello_at": hello_at,
                "hello_done_at": time.time()}  # fmt: skip
    partitions = {str(n): p for n, p in partition_of.items()}
    recorder.handshakes.append({**hello.to_dict(), "partitions": partitions, "timeline": timeline})
    if cfg.clients_per_round > len(partition_of):  # partitions missing since the hello
        log.warning(
            "lorm-flwr: clients-per-round=%d, but %d clients answered the hello: every round "
            "asks all of them", cfg.clients_per_round, len(partition_of),
        )  # fmt: skip
    scenario = scenario_of(cfg, num_clients)  # impossible splits stop here
    recorder.tasks = [list(t) for t in scenario.tasks]
    shard_sizes = scenario.shard_sizes()
    log.info(
        "lorm-flwr: %s on %s, %d clients, %d tasks %s, shard sizes %s",
        cfg.strategy, cfg.dataset, num_clients, scenario.num_tasks,
        recorder.tasks, shard_sizes,
    )  # fmt: skip
    strategy = strategy_class(cfg.strategy)(cfg, layout)
    if cfg.validation_fraction > 0 and not strategy.has_global_model:
        log.warning(
            "lorm-flwr: validation-fraction=%s holds the samples out of training (so the data "
            "match other strategies' runs), but %s has no global model to score on them: its "
            "evaluation stays personalised, on each client's test split",
            cfg.validation_fraction, cfg.strategy,
        )  # fmt: skip
    recorder.message_bytes = check_message_sizes(strategy, max_message_bytes(cfg))  # too big stops
    if checkpoint is None:
        recorder.accuracy_kind = (
            "global" if strategy.has_global_model else "personalised, sample-weighted over clients"
        )
        tensors = dict(initial_tensors(cfg))  # the same seeded start as every client's
        first_task, first_round, elapsed = 0, 0, 0.0
        if cfg.generation:  # what training has to beat
            ev = evaluate_global(cfg, scenario, 0, tensors)
            recorder.untrained = {"exact_match": ev.accuracy, "heldout_loss": ev.loss}
            log.info("lorm-flwr: untrained model: exact match %.3f, held-out loss %.3f",
                     ev.accuracy, ev.loss)  # fmt: skip
    else:
        saved_shards = checkpoint.recorder.get("shard_sizes", shard_sizes)
        if saved_shards != shard_sizes:
            raise ConfigError(
                f"resume-from: the checkpoint was made with shards {saved_shards}, "
                f"this federation gives {shard_sizes}: start the same number of clients"
            )
        strategy.load_state_dict(checkpoint.strategy)
        restore_rng(checkpoint.rng)
        tensors = dict(checkpoint.tensors)
        first_task, first_round, elapsed = (
            checkpoint.task,
            checkpoint.round_in_task,
            checkpoint.elapsed_seconds,
        )
        recorder.resumed.append({"task": first_task, "round_in_task": first_round,
                                 "at": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
        log.info("lorm-flwr: resuming task %d round %d from %s", first_task, first_round,
                 checkpoint_path(cfg.resume_from))  # fmt: skip
    recorder.shard_sizes = shard_sizes  # checked against the checkpoint's, for a resume
    start = time.perf_counter() - elapsed
    timeline["loop_started_at"] = time.time()  # where results' wall_seconds starts counting
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, start)

    def checkpoint(task: int, round_in_task: int, current: Tensors) -> Callable[[dict], None]:
        """The checkpoint of this point: the strategy's and the RNGs' states are taken
        now, before the next round's messages change them; the returned writer adds the
        results so far, saves, and puts its seconds into ``row`` (the round's or task
        end's entry of the results, written with the next results; the checkpoint itself
        holds that row without them: after a resume it lacks the key), then tracks."""
        strategy_state, rng = _copied(strategy.state_dict()), capture_rng()

        def write(row: dict) -> None:
            saving = time.perf_counter()
            save_checkpoint(recorder.folder, Checkpoint(
                config=cfg.to_dict(), task=task, round_in_task=round_in_task, tensors=current,
                strategy=strategy_state,
                recorder={**recorder.state(), "shard_sizes": recorder.shard_sizes},
                rng=rng, elapsed_seconds=time.perf_counter() - start,
            ))  # fmt: skip
            row["checkpoint_seconds"] = time.perf_counter() - saving
            recorder.track()  # after the checkpoint: the tracker holds what a resume goes on from

        return write

    run.checkpoint = checkpoint
    run.overlap = True  # each round's evaluation and checkpoint while the next one trains

    # Opened last before training (a run stopped by its config opens no tracked run);
    # resumed: the same tracked run, first given what it missed.
    start_tracking(recorder)

    training.append(True)  # from here a failure writes this start's results
    try:
        for task in range(first_task, scenario.num_tasks):
            round0 = first_round if task == first_task else 0
            if round0 == 0:
                tensors = strategy.begin_task(task, tensors)
            else:
                strategy.task = task  # mid-task: the factors are the checkpoint's
            for round_in_task in range(round0, cfg.rounds_per_task):
                tensors = run.train_round(task, round_in_task, tensors)  # checkpoints itself
            end_task(run, task, tensors)
    except BaseException:
        # What was done is kept: the last round's or task end's evaluation, results and
        # checkpoint still run; an error there is logged, not raised over the run's own.
        try:
            run.flush()
        except Exception:
            log.exception("lorm-flwr: could not finish the work of the last round")
        raise
    run.flush()  # the last task end's evaluation, export, results and checkpoint
    recorder.finish(start)


def _copied(state: Any) -> Any:
    """``state`` with every dict and list copied (the tensors are shared: nothing changes
    a tensor in place), so that later changes to the strategy do not reach it."""
    if isinstance(state, dict):
        return {k: _copied(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_copied(v) for v in state]
    return state
