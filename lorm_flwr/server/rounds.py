"""A training round: who is asked (the seeded draw, a retry's redraw), the exchange,
the merge, evaluation and the round's results row.

Every message goes through :func:`lorm_flwr.server.exchange.exchange`, every reply
through the wire checks (:func:`lorm_flwr.wire.decode_reply`), and merges see only
checked replies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.data.scenario import Scenario
from lorm_flwr.math.continual import pool_personal
from lorm_flwr.models.layout import group_of
from lorm_flwr.runtime import validation_shards_of
from lorm_flwr.seeds import participants_seed
from lorm_flwr.server.evaluation import evaluate_global
from lorm_flwr.server.exchange import (
    ExchangeFailed,
    ExchangeLog,
    FixedNodes,
    exchange,
    live_nodes,
)
from lorm_flwr.server.results import (
    RoundRow,
    RunRecorder,
)
from lorm_flwr.server.strategies.base import Gathered, LoraStrategy, Merged, TaskModel, Tensors

__all__ = ["FederatedRun", "train_exchange"]

log = logging.getLogger("flwr.lorm")


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
        # With ``overlap`` (the run sets it), a round's evaluation, results row and
        # checkpoint wait in ``pending`` and run while the clients train the next round
        # (or compute the task's statistics): the server's work then fills a core
        # the clients leave idle instead of keeping them all waiting. Personalised
        # evaluation asks the clients themselves, so it is never put off.
        self.overlap = False
        self.pending: list[Callable[[], None]] = []
        self.pending_seconds = 0.0  # spent in :meth:`flush`, so far
        self.unrecorded: list[RoundRow] = []  # rows of rounds whose work is pending
        # This point's checkpoint (task, round in task, tensors) -> its writer, which
        # takes the results row that gets its seconds (set by the run; None: none).
        self.checkpoint: Callable[[int, int, Tensors], Callable[[dict], None]] | None = None

    # ------------------------------------------------------------ helpers
    def later(self, work: Callable[[], None]) -> None:
        """Do ``work`` once the next exchange's messages are out (``overlap``), else now."""
        if self.overlap:
            self.pending.append(work)
        else:
            work()

    def flush(self) -> None:
        """The work put off by :meth:`later`, in the order it was put off."""
        while self.pending:
            work = self.pending.pop(0)  # a failing one is not run again
            began = time.perf_counter()
            try:
                work()
            except BaseException:
                # Nor the rest: each checkpoint holds the rows before it, and one written
                # without the failed row would replace a good checkpoint with one that
                # cannot be resumed.
                self.pending.clear()
                raise
            finally:
                self.pending_seconds += time.perf_counter() - began

    def order(self, node: int) -> int:
        """Replies are merged in partition order, so float sums never depend on arrival."""
        return self.partition_of.get(node, node)

    def shard_size(self, node: int, task: int) -> int:
        if node not in self.partition_of:
            raise wire.PayloadError(f"node {node}: not among the nodes of the handshake")
        return len(self.scenario.shards[task][self.partition_of[node]])

    def test_sizes(self, node: int, task: int, split: str = "test") -> list[int]:
        """The sizes of a node's shares of ``split`` for tasks ``0..task``."""
        if node not in self.partition_of:
            raise wire.PayloadError(f"node {node}: not among the nodes of the handshake")
        pid = self.partition_of[node]
        shards = (
            validation_shards_of(self.cfg, self.scenario.num_clients)
            if split == "validation"
            else self.scenario.test_shards
        )
        return [len(shards[k][pid]) for k in range(task + 1)]

    def _exchange(self, messages: Callable[[], list[Message]], decode, kind: str, fold=None):
        return exchange(
            self.grid, messages, decode, kind=kind, min_replies=self.cfg.min_clients,
            retries=self.cfg.round_retries, timeout=self.cfg.round_timeout, order=self.order,
            fold=fold, meanwhile=self.flush,
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
        with the same failures redraws the same). When too few such nodes are left, the
        rest come from the live nodes that failed before, in partition order: they may
        have recovered, and a retry that can only ask the survivors cannot succeed."""
        members = set(live) & set(self.partition_of)
        kept = (asked - failed) & members  # a drawn node no longer connected got no message
        fresh = sorted((n for n in members if n not in failed and n not in asked), key=self.order)
        need = min(self.cfg.clients_per_round - len(kept), len(fresh))
        seed = participants_seed(self.cfg.seed, task, round_in_task)
        chosen = np.random.default_rng([seed, attempt]).choice(len(fresh), size=need, replace=False)
        drawn = kept | {fresh[i] for i in chosen}
        again = sorted(members - drawn, key=self.order)  # failed before: the last resort
        return drawn | set(again[: max(self.cfg.clients_per_round - len(drawn), 0)])

    def trained_on(self, task: int) -> list[int]:
        """The nodes whose training replies were merged in any round of ``task`` (all nodes
        without clients-per-round), in partition order; read from the results rows (and
        the rows of rounds whose evaluation is still pending), so a resumed run agrees."""
        nodes = sorted(self.partition_of, key=self.order)
        if self.cfg.clients_per_round <= 0:
            return nodes
        asked: set[int] = set()
        rows = self.recorder.rounds + [r.to_dict() for r in self.unrecorded]
        for row in rows:
            if row["task"] == task:
                asked.update(row.get("participants", self.partition_of.values()))
        return [n for n in nodes if self.partition_of[n] in asked]

    # -------------------------------------------------------------- rounds
    def train_round(self, task: int, round_in_task: int, tensors: Tensors) -> Tensors:
        strategy, cfg = self.strategy, self.cfg
        started, put_off = time.perf_counter(), self.pending_seconds
        draws: list[set[int]] = []  # the nodes asked, attempt by attempt
        drawn = self.participants(task, round_in_task)  # None: every node of the hello

        def draw(failed: frozenset[int], live: list[int]) -> set[int]:
            if not draws:
                chosen = drawn if drawn is not None else set(self.partition_of)
            elif drawn is not None:  # a retry asks others in place of the failed
                chosen = self.redraw(task, round_in_task, draws[-1], failed, live, len(draws) + 1)
            else:  # everyone, again
                chosen = draws[-1]
            draws.append(chosen)
            return chosen

        try:
            replies, merged, train, merge_seconds = train_exchange(
                self.grid, strategy, tensors, round_in_task,
                examples=lambda node: self.shard_size(node, task), order=self.order,
                nodes=draw, members=set(self.partition_of), meanwhile=self.flush,
            )  # fmt: skip
        except ExchangeFailed as exc:
            exc.where = {"task": task, "round_in_task": round_in_task}
            raise
        row = RoundRow.from_exchange(task, round_in_task, train)
        row.merge_seconds = merge_seconds
        # Messages out, clients' work, replies in, checks and folds: the round less its
        # merge and less the previous round's work done meanwhile (counted in its row).
        overlapped = self.pending_seconds - put_off
        row.extra["exchange_seconds"] = time.perf_counter() - started - merge_seconds - overlapped
        if cfg.clients_per_round > 0:  # the partitions that trained: their replies were merged
            row.extra["participants"] = sorted(self.partition_of[r.node] for r in replies)
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
        model = None if strategy.local_groups else strategy.round_model(new)

        def snapshot() -> Callable[[dict], None] | None:
            return self.checkpoint(task, round_in_task + 1, new) if self.checkpoint else None

        # The checkpoint's states as they are now, before the next round's messages
        # (Flower's sampling draws from Python's random). Personalised: after the
        # clients' evaluation, which samples too.
        write_checkpoint = snapshot() if model is not None else None

        def finish() -> None:
            self._evaluate_round(task, round_in_task, new, model, row)
            self.recorder.add_round(row)
            self.unrecorded = [r for r in self.unrecorded if r is not row]
            log.info(
                "lorm-flwr: task %d/%d round %d/%d: %s accuracy on seen classes %.3f, "
                "train loss %.3f, %d B down, %d B up",
                task + 1, self.scenario.num_tasks, round_in_task + 1, cfg.rounds_per_task,
                "global" if strategy.has_global_model else "personalised", row.accuracy,
                row.train_loss, row.bytes_down, row.bytes_up,
            )  # fmt: skip
            write = write_checkpoint if model is not None else snapshot()
            if write is not None:
                write(self.recorder.rounds[-1])

        self.unrecorded.append(row)
        if model is None:  # personalised: the clients evaluate, before they train again
            finish()
        else:
            self.later(finish)
        return new

    def _evaluate_round(
        self, task: int, round_in_task: int, new: Tensors, model: TaskModel | None, row: RoundRow
    ) -> None:
        """Fill ``row`` with the round's accuracy: the global ``model``'s, or (None) each
        client's own, pooled; its seconds and the run's elapsed time."""
        cfg = self.cfg
        evaluating = time.perf_counter()
        if model is None:
            row.personalised = self.evaluate_personal(task, round_in_task, new, row)
            row.accuracy = row.personalised.get("accuracy_weighted", float("nan"))
            row.per_task_accuracy = list(row.personalised.get("per_task_weighted", []))
        else:
            ev = evaluate_global(
                cfg, self.scenario, task, model.tensors, rank=model.rank, alpha=model.alpha
            )
            row.accuracy, row.per_task_accuracy = ev.accuracy, ev.per_task
            if ev.loss is not None:
                row.extra["heldout_loss"] = ev.loss
        if cfg.generation:
            row.extra["exact_match"] = row.accuracy
        if cfg.select_round == "best-validation":  # the same model on the validation split
            row.extra["validation_accuracy"] = self.validation_accuracy(
                task, round_in_task, new, row, model
            )
        row.extra["evaluate_seconds"] = time.perf_counter() - evaluating
        row.elapsed_seconds = time.perf_counter() - self.start

    def validation_accuracy(
        self, task: int, round_in_task: int, tensors: Tensors, row: RoundRow,
        model: TaskModel | None = None,
    ) -> float:  # fmt: skip
        """The round's model (FedSA: each client's own) on the validation split."""
        if self.strategy.local_groups:
            pooled = self.evaluate_personal(task, round_in_task, tensors, row, split="validation")
            return float(pooled.get("accuracy_weighted", float("nan")))
        model = model if model is not None else self.strategy.round_model(tensors)
        return evaluate_global(
            self.cfg, self.scenario, task, model.tensors, rank=model.rank, alpha=model.alpha,
            split="validation",
        ).accuracy  # fmt: skip

    def evaluate_personal(
        self, task: int, round_in_task: int, tensors: Tensors, row: RoundRow, split: str = "test"
    ) -> dict:
        """Global parts + each client's own parts, on its own share of ``split`` (FedSA)."""
        arrays = wire.tensors_to_arrays(self.strategy.shared(tensors))
        last = task == self.scenario.num_tasks - 1 and round_in_task == self.cfg.rounds_per_task - 1
        # The run's last evaluation: each client also writes its own adapter.
        export = self.recorder.folder.name if last and split == "test" else ""
        if export and not wire.is_folder_name(export):  # a renamed folder, resumed
            log.warning("lorm-flwr: the clients' own adapters are not written: the run folder's "
                        "name %r is not a bare name (letters, digits, ._-)", export)  # fmt: skip
            export = ""
        config = wire.Instructions(task, export_to=export, split=split)

        def messages() -> list[Message]:
            live = live_nodes(
                self.grid, self.cfg.min_clients, self.cfg.round_timeout, among=self.partition_of
            )
            sent = self.strategy.configure_evaluate(
                round_in_task + 1, arrays, config.to_config(), FixedNodes(self.grid, live)
            )
            return [m for m in sent if m.metadata.dst_node_id in self.partition_of]

        def decode(msg: Message) -> tuple[list[int], list[int]]:
            return wire.decode_evaluation(
                msg, task, self.test_sizes(msg.metadata.src_node_id, task, split)
            )

        try:
            counts, evaluation = self._exchange(messages, decode, "evaluate")
        except ExchangeFailed as exc:
            row.add(exc.log)  # the round's training exchange and the failed evaluation
            exc.where = row.to_dict()
            raise
        row.add(evaluation)
        return pool_personal(counts)


def train_exchange(
    grid: Grid,
    strategy: LoraStrategy,
    tensors: Tensors,
    round_in_task: int,
    *,
    examples: Callable[[int], int | None] = lambda node: None,
    order: Callable[[int], int] = lambda node: node,
    nodes: set[int] | Callable[[frozenset[int], list[int]], set[int]] | None = None,
    members: Collection[int] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[Gathered, Merged, ExchangeLog, float]:
    """One training round of the current task: send, check, merge.

    ``nodes``: train on these nodes only (partial participation); a function
    ``nodes(failed, live)`` of the nodes that failed earlier attempts and the nodes
    connected now, called once per attempt, to ask others in a retry; None: every node
    connected. Before each attempt it waits, up to ``round-timeout``, for ``min-clients``
    nodes (of ``members``, the nodes of the hello, when given) to be connected, and fails
    the round when they are not.
    ``examples(node)``: the sample count the node must report (its shard size), or
    None to accept any positive count. ``meanwhile``: the server's work to do once the
    messages are out (:func:`~lorm_flwr.server.exchange.exchange`). Returns the checked
    replies (in ``order``, their Gram statistics already summed and dropped: see
    :class:`~lorm_flwr.server.strategies.base.Gathered`), the merge, the exchange's log and
    the merge's seconds.
    """
    cfg = strategy.cfg
    plan = strategy.instructions(round_in_task)
    spec = strategy.reply_spec(plan)
    dtype = next(iter(tensors.values())).dtype  # every reply is cast to the global dtype
    arrays = wire.tensors_to_arrays(strategy.shared(tensors))
    entry = ExchangeLog(kind="train")

    def messages() -> list[Message]:
        live = live_nodes(grid, cfg.min_clients, cfg.round_timeout, among=members)
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
        entry=entry, meanwhile=meanwhile,
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
