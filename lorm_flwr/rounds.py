"""The federated run: handshake, tasks x rounds, task ends, checkpoints.

The one round loop of the project. Every message goes through
:func:`lorm_flwr.exchange.exchange`, every reply through the wire checks
(:func:`lorm_flwr.wire.decode_reply`), and merges see only checked replies.
One round of LoRM:

    strategy.instructions -> configure_train -> exchange(send, wait, count, decode)
      -> strategy.merge(checked replies) -> evaluate -> results row -> checkpoint
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from lorm_flwr import wire
from lorm_flwr.checkpoint import (
    Checkpoint,
    capture_rng,
    checkpoint_path,
    restore_rng,
    resume_point,
    save_checkpoint,
)
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.continual import pool_personal
from lorm_flwr.data.scenario import Scenario
from lorm_flwr.evaluation import evaluate_global
from lorm_flwr.exchange import ExchangeFailed, ExchangeLog, exchange
from lorm_flwr.export import export_adapter
from lorm_flwr.layout import group_of
from lorm_flwr.limits import check_message_sizes
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.results import (
    RoundRow,
    RunRecorder,
    check_output_dir,
    provenance,
    run_folder,
)
from lorm_flwr.runtime import initial_tensors, model_of, scenario_of
from lorm_flwr.seeds import participants_seed
from lorm_flwr.strategies.base import Gathered, LoraStrategy, Merged, Tensors

__all__ = ["FederatedRun", "handshake", "run_federated", "train_exchange", "wait_for_nodes"]

log = logging.getLogger("flwr.lorm")

NODE_WAIT_SECONDS = 300.0
# A node's first reply waits for its ClientApp to start (imports, data, model): far longer
# than a round's reply may take on a warm node, so the handshake has its own timeout.
HELLO_TIMEOUT_SECONDS = 600.0


def wait_for_nodes(grid: Grid, count: int, key: str = "min-clients") -> list[int]:
    """The connected nodes once there are ``count``; after ``NODE_WAIT_SECONDS``, an error
    naming the run-config ``key`` that asked for them."""
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} SuperNodes connected after {NODE_WAIT_SECONDS:.0f} s; {key}={count}"
            )
        time.sleep(1.0)


def _hello(
    grid: Grid, cfg: RunConfig, nodes: list[int]
) -> tuple[list[tuple[int, int, int]], ExchangeLog]:
    def messages() -> list[Message]:
        return [Message(RecordDict(), dst_node_id=n, message_type=wire.QUERY_HELLO) for n in nodes]

    def decode(msg: Message) -> tuple[int, int, int]:
        pid, num = wire.decode_hello(msg)
        return msg.metadata.src_node_id, pid, num

    # Every partition must answer, but a node listed and gone (a SuperNode restarted
    # under a new id) is only a timeout, not a reason to stop.
    return exchange(
        grid, messages, decode, kind="hello", min_replies=min(cfg.min_clients, len(nodes)),
        retries=cfg.round_retries, timeout=HELLO_TIMEOUT_SECONDS,
    )  # fmt: skip


def _federation_size(cfg: RunConfig, replies: list[tuple[int, int, int]]) -> int:
    totals = {num for _, _, num in replies}
    if len(totals) != 1:
        raise RuntimeError(f"nodes disagree on num-partitions: {sorted(totals)}")
    num = totals.pop()
    if cfg.num_clients and num != cfg.num_clients:
        raise ConfigError(
            f"num-clients={cfg.num_clients}, but the federation has {num} partitions: start "
            f"{cfg.num_clients} clients (simulation: flwr run . --federation-config "
            f'"num-supernodes={cfg.num_clients}"; deployment: {cfg.num_clients} SuperNodes with '
            f"--node-config 'partition-id=K num-partitions={cfg.num_clients}'), or run with "
            f"num-clients={num} (num-clients=0 takes whatever the federation has)"
        )
    return num


def handshake(grid: Grid, cfg: RunConfig) -> tuple[dict[int, int], ExchangeLog]:
    """Ask every node for its partition: node id -> partition id, ``0..N-1`` once each.

    The first replies tell the federation's size (a mismatch with ``num-clients`` stops
    here, at once); while fewer nodes than partitions are connected (a deployment still
    starting), it waits for the rest and asks again.
    """
    nodes = wait_for_nodes(grid, cfg.min_clients)
    replies, hello = _hello(grid, cfg, nodes)
    num = _federation_size(cfg, replies)
    if len(nodes) < num:
        nodes = wait_for_nodes(grid, num, key=f"num-partitions (num-clients={cfg.num_clients})")
        replies, again = _hello(grid, cfg, nodes)
        num = _federation_size(cfg, replies)
        hello.merge(again)
    mapping = {node: pid for node, pid, _ in replies}
    pids = sorted(mapping.values())
    if len(pids) != num or pids != list(range(num)):
        missing = (
            sorted(set(range(num)) - set(pids))
            if num <= 10 * len(pids)
            else f"{num - len(set(pids))}"
        )
        raise RuntimeError(
            f"partition ids {pids} of num-partitions={num} are not 0..N-1 once each "
            f"(missing: {missing}; failures: {hello.failures})"
        )
    return mapping, hello


class FederatedRun:
    """Tasks x rounds of one strategy over the nodes found by the handshake."""

    def __init__(
        self,
        grid: Grid,
        cfg: RunConfig,
        strategy: LoraStrategy,
        scenario: Scenario,
        recorder: RunRecorder,
        partition_of: dict[int, int],
        start: float,
    ) -> None:
        self.grid, self.cfg, self.strategy = grid, cfg, strategy
        self.scenario, self.recorder, self.partition_of = scenario, recorder, partition_of
        self.start = start

    # ------------------------------------------------------------ helpers
    def order(self, node: int) -> int:
        """Replies are merged in partition order, so float sums never depend on arrival."""
        return self.partition_of.get(node, node)

    def shard_size(self, node: int, task: int) -> int:
        if node not in self.partition_of:
            raise wire.PayloadError(f"node {node}: not among the nodes of the handshake")
        return len(self.scenario.shards[task][self.partition_of[node]])

    def test_sizes(self, node: int, task: int) -> list[int]:
        if node not in self.partition_of:
            raise wire.PayloadError(f"node {node}: not among the nodes of the handshake")
        pid = self.partition_of[node]
        return [len(self.scenario.test_shards[k][pid]) for k in range(task + 1)]

    def _exchange(self, messages: Callable[[], list[Message]], decode, kind: str, fold=None):
        return exchange(
            self.grid, messages, decode, kind=kind, min_replies=self.cfg.min_clients,
            retries=self.cfg.round_retries, timeout=self.cfg.round_timeout, order=self.order,
            fold=fold,
        )  # fmt: skip

    def participants(self, task: int, round_in_task: int) -> set[int] | None:
        """The nodes a round trains on: ``clients-per-round`` partitions drawn with the run's
        seed (by partition, so every run draws the same clients); None: every node."""
        k = self.cfg.clients_per_round
        nodes = sorted(self.partition_of, key=self.order)
        if k <= 0 or k >= len(nodes):
            return None
        rng = np.random.default_rng(participants_seed(self.cfg.seed, task, round_in_task))
        chosen = rng.choice(len(nodes), size=k, replace=False)
        return {nodes[i] for i in chosen}

    def trained_on(self, task: int) -> list[int]:
        """The nodes asked to train in any round of ``task`` (all without clients-per-round),
        in partition order; read from the results rows, so a resumed run agrees."""
        nodes = sorted(self.partition_of, key=self.order)
        if self.cfg.clients_per_round <= 0:
            return nodes
        asked: set[int] = set()
        for row in self.recorder.rounds:
            if row["task"] == task:
                asked.update(row.get("participants", self.partition_of.values()))
        return [n for n in nodes if self.partition_of[n] in asked]

    # -------------------------------------------------------------- rounds
    def train_round(self, task: int, round_in_task: int, tensors: Tensors) -> Tensors:
        strategy, cfg = self.strategy, self.cfg
        started = time.perf_counter()
        try:
            participants = self.participants(task, round_in_task)
            replies, merged, train, merge_seconds = train_exchange(
                self.grid, strategy, tensors, round_in_task,
                examples=lambda node: self.shard_size(node, task), order=self.order,
                nodes=participants,
            )  # fmt: skip
        except ExchangeFailed as exc:
            exc.where = {"task": task, "round_in_task": round_in_task}
            raise
        row = RoundRow.from_exchange(task, round_in_task, train)
        row.merge_seconds = merge_seconds
        # Messages out, clients' work, replies in, checks and folds: the round less its merge.
        row.extra["exchange_seconds"] = time.perf_counter() - started - merge_seconds
        if cfg.clients_per_round > 0:  # the partitions asked to train (all when the draw is all)
            asked = participants if participants is not None else self.partition_of
            row.extra["participants"] = sorted(self.partition_of[n] for n in asked)
        weights = [r.num_examples for r in replies]
        row.train_loss = sum(
            w * r.metrics[wire.TRAIN_LOSS] for w, r in zip(weights, replies)
        ) / max(sum(weights), 1)
        for key in (wire.TRAIN_SECONDS, wire.GRAMS_SECONDS):
            values = [r.metrics[key] for r in replies]
            name = key.replace("-", "_")
            row.extra[f"client_{name}_sum"] = sum(values)
            row.extra[f"client_{name}_max"] = max(values)
        row.extra.update(_changes(strategy, tensors, merged.tensors))
        row.extra.update(merged.report)
        new = merged.tensors
        evaluating = time.perf_counter()
        if strategy.local_groups:
            row.personalised = self.evaluate_personal(task, round_in_task, new, row)
            row.accuracy = row.personalised.get("accuracy_weighted", float("nan"))
            row.per_task_accuracy = list(row.personalised.get("per_task_weighted", []))
        else:
            model = strategy.round_model(new)
            ev = evaluate_global(
                cfg, self.scenario, task, model.tensors, rank=model.rank, alpha=model.alpha
            )
            row.accuracy, row.per_task_accuracy = ev.accuracy, ev.per_task
        row.extra["evaluate_seconds"] = time.perf_counter() - evaluating
        row.elapsed_seconds = time.perf_counter() - self.start
        self.recorder.add_round(row)
        log.info(
            "lorm-flwr: task %d/%d round %d/%d: %s accuracy on seen classes %.3f, "
            "train loss %.3f, %d B down, %d B up",
            task + 1, self.scenario.num_tasks, round_in_task + 1, cfg.rounds_per_task,
            "global" if strategy.has_global_model else "personalised", row.accuracy,
            row.train_loss, row.bytes_down, row.bytes_up,
        )  # fmt: skip
        return new

    def evaluate_personal(
        self, task: int, round_in_task: int, tensors: Tensors, row: RoundRow
    ) -> dict:
        """Global parts + each client's own parts, on its own test split (FedSA)."""
        arrays = wire.tensors_to_arrays(self.strategy.shared(tensors))

        def messages() -> list[Message]:
            return list(
                self.strategy.configure_evaluate(
                    round_in_task + 1, arrays, ConfigRecord(), self.grid
                )
            )

        def decode(msg: Message) -> tuple[list[int], list[int]]:
            return wire.decode_evaluation(
                msg, task, self.test_sizes(msg.metadata.src_node_id, task)
            )

        try:
            counts, evaluation = self._exchange(messages, decode, "evaluate")
        except ExchangeFailed as exc:
            row.add(exc.log)  # the round's training exchange and the failed evaluation
            exc.where = row.to_dict()
            raise
        row.add(evaluation)
        return pool_personal(counts)

    # ------------------------------------------------------------ task end
    def end_task(self, task: int, tensors: Tensors) -> None:
        """LoRM's statistics exchange, then evaluate, fill the matrix row, export the adapter."""
        strategy, cfg = self.strategy, self.cfg
        started = time.perf_counter()
        exchanges: list[ExchangeLog] = []
        nodes = self.trained_on(task)

        def query(record_on: Tensors, plan: wire.Instructions) -> Gathered:
            spec = strategy.reply_spec(plan)
            content = RecordDict(
                {wire.ARRAYS: wire.tensors_to_arrays(record_on), wire.CONFIG: plan.to_config()}
            )

            def messages() -> list[Message]:
                return [
                    Message(content, dst_node_id=n, message_type=wire.QUERY_TASK_GRAMS)
                    for n in nodes
                ]

            def decode(msg: Message) -> wire.Reply:
                size = self.shard_size(msg.metadata.src_node_id, task)
                return wire.decode_reply(msg, spec, num_examples=size)

            try:
                replies, entry = self._exchange(messages, decode, "task-grams", fold=Gathered)
            except ExchangeFailed as exc:
                exc.where = {"task": task, "round_in_task": cfg.rounds_per_task}
                raise
            exchanges.append(entry)
            return replies

        final = strategy.end_task(task, tensors, query)
        if strategy.has_global_model:
            ev = evaluate_global(
                cfg, self.scenario, task, final.tensors, rank=final.rank, alpha=final.alpha
            )
            per_task, summary = ev.per_task, {
                "accuracy": ev.accuracy, "correct": ev.correct, "total": ev.total,
                "adapter_rank": final.rank,
            }  # fmt: skip
            if cfg.validation_fraction > 0:  # for choosing settings; the test split reports
                val = evaluate_global(cfg, self.scenario, task, final.tensors, rank=final.rank,
                                      alpha=final.alpha, split="validation")  # fmt: skip
                summary["validation"] = {"accuracy": val.accuracy, "per_task": val.per_task,
                                         "correct": val.correct, "total": val.total}  # fmt: skip
            model = model_of(cfg, rank=final.rank, alpha=final.alpha)
            metrics = {f"accuracy on classes seen after task {task}": ev.accuracy,
                        "accuracy per task": ev.per_task}  # fmt: skip
            tasks = [list(t) for t in self.scenario.tasks]
            for where in (
                self.recorder.folder / "adapters" / f"task-{task}",
                self.recorder.folder / "adapter",
            ):
                export_adapter(model, final.tensors, where, cfg, tasks, metrics)
        else:
            # No global model: the clients' own models, evaluated on their own test splits.
            personal = self.recorder.rounds[-1]["personalised"]
            per_task = personal["per_task_weighted"]
            summary = {
                "accuracy": personal["accuracy_weighted"],
                "accuracy_unweighted": personal["accuracy_unweighted"],
                "correct": personal["correct"], "total": personal["total"],
            }  # fmt: skip
        for entry in exchanges:
            summary[entry.kind] = entry.to_dict()
        # The statistics exchange, the cross-task merge, evaluation and the adapter export.
        summary["seconds"] = time.perf_counter() - started
        self.recorder.end_task(task, per_task, summary)
        log.info(
            "lorm-flwr: after task %d/%d: accuracy on seen classes %.3f, per task %s",
            task + 1, self.scenario.num_tasks, summary["accuracy"], [round(a, 3) for a in per_task],
        )  # fmt: skip


def train_exchange(
    grid: Grid,
    strategy: LoraStrategy,
    tensors: Tensors,
    round_in_task: int,
    *,
    examples: Callable[[int], int | None] = lambda node: None,
    order: Callable[[int], int] = lambda node: node,
    nodes: set[int] | None = None,
) -> tuple[Gathered, Merged, ExchangeLog, float]:
    """One training round of the current task: send, check, merge.

    ``nodes``: train on these nodes only (partial participation); None: every node
    Flower's sampling gives.
    ``examples(node)``: the sample count the node must report (its shard size), or
    None to accept any positive count. Returns the checked replies (in ``order``,
    their Gram statistics already summed and dropped: see
    :class:`~lorm_flwr.strategies.base.Gathered`), the merge, the exchange's log and
    the merge's seconds.
    """
    cfg = strategy.cfg
    plan = strategy.instructions(round_in_task)
    spec = strategy.reply_spec(plan)
    dtype = next(iter(tensors.values())).dtype  # every reply is cast to the global dtype
    arrays = wire.tensors_to_arrays(strategy.shared(tensors))

    def messages() -> list[Message]:
        sent = strategy.configure_train(round_in_task + 1, arrays, ConfigRecord(), grid)
        return [m for m in sent if nodes is None or m.metadata.dst_node_id in nodes]

    def decode(msg: Message) -> wire.Reply:
        return wire.decode_reply(msg, spec, dtype, num_examples=examples(msg.metadata.src_node_id))

    gathered, log_ = exchange(
        grid, messages, decode, kind="train", min_replies=cfg.min_clients,
        retries=cfg.round_retries, timeout=cfg.round_timeout, order=order, fold=Gathered,
    )  # fmt: skip
    begin = time.perf_counter()
    merged = strategy.merge(plan, gathered, tensors)
    return gathered, merged, log_, time.perf_counter() - begin


def _changes(strategy: LoraStrategy, before: Tensors, after: Tensors) -> dict[str, float]:
    """Largest absolute change of A, B and head in a round (shows the schedule)."""
    out = {"change_a": 0.0, "change_b": 0.0, "change_head": 0.0}
    for key in strategy.layout.shapes:
        if key in after and key in before:
            name = f"change_{group_of(key).lower()}"
            out[name] = max(
                out[name], float((after[key].double() - before[key].double()).abs().max())
            )
    return out


def run_federated(grid: Grid, cfg: RunConfig, run_id: int | None = None) -> None:
    """The whole federated run; results and a checkpoint are written after every round."""
    checkpoint = resume_point(cfg)  # a resume it cannot honour stops here
    if checkpoint is None:
        check_output_dir(cfg)  # so does an output folder it cannot write
    partition_of, hello = handshake(grid, cfg)
    num_clients = len(partition_of)
    if cfg.clients_per_round > num_clients:
        raise ConfigError(
            f"clients-per-round={cfg.clients_per_round} is more than the {num_clients} clients "
            "of this federation"
        )
    scenario = scenario_of(cfg, num_clients)  # impossible splits stop here
    log.info(
        "lorm-flwr: %s on %s, %d clients, %d tasks %s, shard sizes %s",
        cfg.strategy, cfg.dataset, num_clients, scenario.num_tasks,
        [list(t) for t in scenario.tasks], scenario.shard_sizes(),
    )  # fmt: skip
    strategy = strategy_class(cfg.strategy)(cfg, model_layout(model_of(cfg)))
    if cfg.validation_fraction > 0 and not strategy.has_global_model:
        log.warning(
            "lorm-flwr: validation-fraction=%s holds the samples out of training (so the data "
            "match other strategies' runs), but %s has no global model to score on them: its "
            "evaluation stays personalised, on each client's test split",
            cfg.validation_fraction, cfg.strategy,
        )  # fmt: skip
    message_bytes = check_message_sizes(strategy, cfg.max_message_bytes)  # too big stops here
    tasks = [list(t) for t in scenario.tasks]
    if checkpoint is None:
        folder = run_folder(cfg)
        recorder = RunRecorder(cfg, folder, tasks, scenario.shard_sizes())
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
        first_task, first_round, elapsed = (
            checkpoint.task,
            checkpoint.round_in_task,
            checkpoint.elapsed_seconds,
        )
        recorder.resumed.append({"task": first_task, "round_in_task": first_round,
                                 "at": time.strftime("%Y-%m-%d %H:%M:%S")})  # fmt: skip
        log.info("lorm-flwr: resuming task %d round %d from %s", first_task, first_round,
                 checkpoint_path(cfg.resume_from))  # fmt: skip
    recorder.message_bytes = message_bytes
    if recorder.provenance:  # a resume: one more Flower run, maybe on other code or versions
        now = provenance(run_id)
        recorder.provenance["flower_run_ids"].append(run_id)
        recorder.provenance.setdefault("resumed_with", []).append(
            {"commit": now["commit"], "versions": now["versions"]}
        )
    else:
        recorder.provenance = provenance(run_id)
    recorder.handshakes.append(
        {**hello.to_dict(), "partitions": {str(n): p for n, p in partition_of.items()}}
    )
    log.info("lorm-flwr: writing results to %s", folder)
    start = time.perf_counter() - elapsed
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, start)

    def save(task: int, round_in_task: int, current: Tensors) -> None:
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
            for round_in_task in range(round0, cfg.rounds_per_task):
                tensors = run.train_round(task, round_in_task, tensors)
                save(task, round_in_task + 1, tensors)
            run.end_task(task, tensors)
            save(task + 1, 0, tensors)
    except BaseException as exc:
        recorder.status = "failed"
        recorder.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ExchangeFailed):  # the failed exchange, and the round it belongs to
            recorder.failed_round = {
                **exc.log.to_dict(),
                **exc.where,
                "failed_exchange": exc.log.kind,
            }
        recorder.write()
        log.error(
            "lorm-flwr: run stopped: %s. Results so far are in %s; continue with "
            "--run-config \"resume-from='%s'\" (same other keys)",
            exc, folder, folder,
        )  # fmt: skip
        raise
    recorder.finish(start)
