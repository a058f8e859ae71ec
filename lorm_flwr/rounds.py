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
from lorm_flwr.exchange import (
    ExchangeFailed,
    ExchangeLog,
    FixedNodes,
    exchange,
    live_nodes,
)
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
    return live_nodes(grid, count, NODE_WAIT_SECONDS, key)


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
    """The federation's num-partitions: ``num-clients`` when any node claims it, else the
    count most nodes claim (a node that claims another is rejected by the caller).

    When no node claims ``num-clients`` the federation is not the one the run asked
    for, and the run stops at once with the remedy; nodes that disagree with no
    majority stop it too, naming what each claims.
    """
    claims: dict[int, list[int]] = {}
    for node, _, num in replies:
        claims.setdefault(num, []).append(node)
    if cfg.num_clients and cfg.num_clients in claims:
        return cfg.num_clients
    ranked = sorted(claims, key=lambda num: -len(claims[num]))
    if len(ranked) > 1 and len(claims[ranked[0]]) == len(claims[ranked[1]]):
        said = "; ".join(f"nodes {sorted(claims[num])}: {num}" for num in sorted(claims))
        raise RuntimeError(f"nodes disagree on num-partitions with no majority ({said})")
    num = ranked[0]
    if cfg.num_clients:
        raise ConfigError(
            f"num-clients={cfg.num_clients}, but the federation has {num} partitions: start "
            f"{cfg.num_clients} clients (simulation: flwr run . --federation-config "
            f'"num-supernodes={cfg.num_clients}"; deployment: {cfg.num_clients} SuperNodes with '
            f"--node-config 'partition-id=K num-partitions={cfg.num_clients}'), or run with "
            f"num-clients={num} (num-clients=0 takes whatever the federation has)"
        )
    return num


def _consistent(
    cfg: RunConfig, replies: list[tuple[int, int, int]], hello: ExchangeLog
) -> tuple[dict[int, int], int]:
    """Node id -> partition id of the nodes whose hello fits the federation, and its size.

    A node that claims another num-partitions, or a partition another node claims too
    (which of them is right cannot be told), is rejected and named in ``hello`` and
    the log; it gets no message of this run.
    """
    num = _federation_size(cfg, replies)
    claimed: dict[int, list[int]] = {}
    for node, pid, n in replies:
        if n == num:
            claimed.setdefault(pid, []).append(node)
    mapping: dict[int, int] = {}
    for node, pid, n in replies:
        if n != num:
            reason = f"num-partitions={n}, but the federation has {num} partitions"
        elif len(claimed[pid]) > 1:
            reason = f"partition-id={pid} is claimed by nodes {sorted(claimed[pid])} too"
        else:
            mapping[node] = pid
            continue
        hello.rejected.append(f"hello, node {node}: {reason}")
        hello.failed_nodes.append(node)
        log.warning("hello: rejected node %d: %s", node, reason)
    return mapping, num


def handshake(grid: Grid, cfg: RunConfig) -> tuple[dict[int, int], ExchangeLog, int]:
    """Ask every node for its partition: node id -> partition id, once each in ``0..N-1``;
    the hello's log; the federation's size ``N``.

    The first replies tell the federation's size (a mismatch with ``num-clients`` stops
    here, at once); while fewer nodes than partitions are connected (a deployment still
    starting), it waits for the rest and asks again. A node whose hello does not fit
    (another num-partitions, a partition claimed twice) is rejected and named; the run
    goes on without it, and without partitions no node answered for, while at least
    ``min-clients`` nodes remain.
    """
    nodes = wait_for_nodes(grid, cfg.min_clients)
    replies, hello = _hello(grid, cfg, nodes)
    num = _federation_size(cfg, replies)
    if len(nodes) < num:
        nodes = wait_for_nodes(grid, num, key=f"num-partitions (num-clients={cfg.num_clients})")
        replies, again = _hello(grid, cfg, nodes)
        hello.merge(again)
    mapping, num = _consistent(cfg, replies, hello)
    missing = sorted(set(range(num)) - set(mapping.values()))
    shown = missing if len(missing) <= 20 else f"{len(missing)} partitions"
    if len(mapping) < cfg.min_clients:
        raise RuntimeError(
            f"only {len(mapping)} nodes answered the hello with a partition of num-partitions="
            f"{num} once each, min-clients={cfg.min_clients} needed (missing: {shown}; "
            f"failures: {hello.failures}; rejected: {hello.rejected})"
        )
    if missing:
        log.warning(
            "hello: no node answered for partitions %s of %d; the run goes on with %d clients "
            "(min-clients=%d): those shards are not trained",
            shown, num, len(mapping), cfg.min_clients,
        )  # fmt: skip
    return mapping, hello, num


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

    def redraw(
        self, task: int, round_in_task: int, asked: set[int], failed: frozenset[int],
        live: list[int], attempt: int,
    ) -> set[int]:  # fmt: skip
        """A retry's draw: the nodes of the failed draw ``asked`` that answered, and in place
        of each that failed (``failed``: in any attempt), a live node never asked that has
        not failed, drawn with the run's seed and the attempt (by partition, so every run
        with the same failures redraws the same). When fewer are left, all of them."""
        kept = (asked - failed) & set(live)  # a drawn node no longer connected got no message
        pool = sorted(
            (n for n in set(live) & set(self.partition_of) if n not in failed and n not in asked),
            key=self.order,
        )
        need = min(self.cfg.clients_per_round - len(kept), len(pool))
        seed = participants_seed(self.cfg.seed, task, round_in_task)
        chosen = np.random.default_rng([seed, attempt]).choice(len(pool), size=need, replace=False)
        return kept | {pool[i] for i in chosen}

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
        draws: list[set[int]] = []  # the nodes asked, attempt by attempt

        def draw(failed: frozenset[int], live: list[int]) -> set[int]:
            if not draws:
                chosen = self.participants(task, round_in_task) or set(self.partition_of)
            elif cfg.clients_per_round > 0:  # a retry asks others in place of the failed
                chosen = self.redraw(task, round_in_task, draws[-1], failed, live, len(draws) + 1)
            else:  # everyone, again
                chosen = draws[-1]
            draws.append(chosen)
            return chosen

        try:
            replies, merged, train, merge_seconds = train_exchange(
                self.grid, strategy, tensors, round_in_task,
                examples=lambda node: self.shard_size(node, task), order=self.order,
                nodes=draw,
            )  # fmt: skip
        except ExchangeFailed as exc:
            exc.where = {"task": task, "round_in_task": round_in_task}
            raise
        participants = draws[-1]
        row = RoundRow.from_exchange(task, round_in_task, train)
        row.merge_seconds = merge_seconds
        # Messages out, clients' work, replies in, checks and folds: the round less its merge.
        row.extra["exchange_seconds"] = time.perf_counter() - started - merge_seconds
        if cfg.clients_per_round > 0:  # the partitions asked to train (the last attempt's)
            row.extra["participants"] = sorted(self.partition_of[n] for n in participants)
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
            live = live_nodes(self.grid, self.cfg.min_clients, self.cfg.round_timeout)
            sent = self.strategy.configure_evaluate(
                round_in_task + 1, arrays, ConfigRecord(), FixedNodes(self.grid, live)
            )
            return [m for m in sent if m.metadata.dst_node_id in self.partition_of]

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
    nodes: set[int] | Callable[[frozenset[int], list[int]], set[int]] | None = None,
) -> tuple[Gathered, Merged, ExchangeLog, float]:
    """One training round of the current task: send, check, merge.

    ``nodes``: train on these nodes only (partial participation); a function
    ``nodes(failed, live)`` of the nodes that failed earlier attempts and the nodes
    connected now, called once per attempt, to ask others in a retry; None: every node
    connected. Before each attempt it waits, up to ``round-timeout``, for ``min-clients``
    nodes to be connected, and fails the round when they are not.
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
    entry = ExchangeLog(kind="train")

    def messages() -> list[Message]:
        live = live_nodes(grid, cfg.min_clients, cfg.round_timeout)
        chosen = nodes(frozenset(entry.failed_nodes), live) if callable(nodes) else nodes
        # Flower's sampling sees the nodes just checked, so it never waits on its own.
        sent = strategy.configure_train(
            round_in_task + 1, arrays, ConfigRecord(), FixedNodes(grid, live)
        )
        return [m for m in sent if chosen is None or m.metadata.dst_node_id in chosen]

    def decode(msg: Message) -> wire.Reply:
        return wire.decode_reply(msg, spec, dtype, num_examples=examples(msg.metadata.src_node_id))

    gathered, log_ = exchange(
        grid, messages, decode, kind="train", min_replies=cfg.min_clients,
        retries=cfg.round_retries, timeout=cfg.round_timeout, order=order, fold=Gathered,
        entry=entry,
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
    """The whole federated run; results and a checkpoint are written after every round.

    The run folder exists from the start: a run that fails at any point after it, the
    hello included, leaves ``results.json`` with ``status: failed`` and the error (a
    resumed run: the results its checkpoint holds, with the new error). Only a resume
    refused before any work leaves the folder it names as it was.
    """
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
    try:
        _run(grid, cfg, checkpoint, recorder)
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


def _run(grid: Grid, cfg: RunConfig, checkpoint: Checkpoint | None, recorder: RunRecorder) -> None:
    """The hello, the scenario, then tasks x rounds from the start or the checkpoint."""
    # The server's model first (cached): a lora-rank or max-length the backbone cannot
    # hold stops the run here, before any node is asked anything.
    layout = model_layout(model_of(cfg))
    partition_of, hello, num_clients = handshake(grid, cfg)
    recorder.handshakes.append(
        {**hello.to_dict(), "partitions": {str(n): p for n, p in partition_of.items()}}
    )
    if cfg.clients_per_round > len(partition_of):
        raise ConfigError(
            f"clients-per-round={cfg.clients_per_round} is more than the {len(partition_of)} "
            "clients of this federation"
        )
    scenario = scenario_of(cfg, num_clients)  # impossible splits stop here
    recorder.tasks = [list(t) for t in scenario.tasks]
    recorder.shard_sizes = scenario.shard_sizes()
    log.info(
        "lorm-flwr: %s on %s, %d clients, %d tasks %s, shard sizes %s",
        cfg.strategy, cfg.dataset, num_clients, scenario.num_tasks,
        recorder.tasks, recorder.shard_sizes,
    )  # fmt: skip
    strategy = strategy_class(cfg.strategy)(cfg, layout)
    if cfg.validation_fraction > 0 and not strategy.has_global_model:
        log.warning(
            "lorm-flwr: validation-fraction=%s holds the samples out of training (so the data "
            "match other strategies' runs), but %s has no global model to score on them: its "
            "evaluation stays personalised, on each client's test split",
            cfg.validation_fraction, cfg.strategy,
        )  # fmt: skip
    recorder.message_bytes = check_message_sizes(strategy, cfg.max_message_bytes)  # too big stops
    if checkpoint is None:
        recorder.accuracy_kind = (
            "global" if strategy.has_global_model else "personalised, sample-weighted over clients"
        )
        tensors = dict(initial_tensors(cfg))  # the same seeded start as every client's
        first_task, first_round, elapsed = 0, 0, 0.0
    else:
        saved_shards = checkpoint.recorder.get("shard_sizes", recorder.shard_sizes)
        if saved_shards != recorder.shard_sizes:
            raise ConfigError(
                f"resume-from: the checkpoint was made with shards {saved_shards}, "
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
    start = time.perf_counter() - elapsed
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, start)

    def save(task: int, round_in_task: int, current: Tensors) -> None:
        save_checkpoint(recorder.folder, Checkpoint(
            config=cfg.to_dict(), task=task, round_in_task=round_in_task, tensors=current,
            strategy=strategy.state_dict(),
            recorder={**recorder.state(), "shard_sizes": recorder.shard_sizes},
            rng=capture_rng(), elapsed_seconds=time.perf_counter() - start,
        ))  # fmt: skip

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
    recorder.finish(start)
