"""Shared Flower strategy logic: task-aware configs, reply checks, byte accounting.

Every strategy subclasses :class:`LoraStrategy` (itself Flower's ``FedAvg``) and
overrides :meth:`round_plan` (what trains, what statistics come back) and
:meth:`merge` (the aggregation). Task boundaries are driven by the ServerApp
through :meth:`begin_task` and :meth:`end_task`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from lorm_flwr import protocol as P
from lorm_flwr.config import RunConfig
from lorm_flwr.lorm import expected_stats
from lorm_flwr.merge import merge_lora_a_from_sums, weighted_mean
from lorm_flwr.models.adapters import HEAD, AdaptedLayer, group_of

log = logging.getLogger("flwr.lorm")

__all__ = [
    "AggregationFailed",
    "RoundFailed",
    "LoraStrategy",
    "ModelLayout",
    "RoundLog",
    "RoundPlan",
    "TaskModel",
    "stat_total",
    "with_retries",
]


class AggregationFailed(RuntimeError):
    """Too few valid replies to merge a round."""


class RoundFailed(RuntimeError):
    """A round still had too few valid replies after every retry; the run stops."""


@dataclass(frozen=True)
class ModelLayout:
    """What the server knows of the model: adapted layers, head keys, tensor shapes."""

    layers: tuple[AdaptedLayer, ...]
    head_weight: str
    head_bias: str
    shapes: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class RoundPlan:
    """One round's instructions to the clients."""

    train_a: bool
    train_b: bool
    train_head: bool = True
    stats: str = P.STATS_NONE


@dataclass(frozen=True)
class TaskModel:
    """The model evaluated and exported after a task: adapter tensors at ``rank``/``alpha``."""

    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float


@dataclass
class RoundLog:
    task: int
    round_in_task: int
    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    failures: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)  # nodes that did not reply in time
    attempts: int = 1
    train_loss: float = float("nan")
    num_examples: int = 0
    merge_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    personal: dict[str, object] = field(default_factory=dict)


T = TypeVar("T")


def with_retries(action: Callable[[int], T], retries: int) -> T:
    """``action(attempt)`` for attempt 1, 2, ... until it does not raise
    :class:`AggregationFailed`; after ``retries`` retries, :class:`RoundFailed`."""
    for attempt in range(1, retries + 2):
        try:
            return action(attempt)
        except AggregationFailed as exc:
            if attempt > retries:
                raise RoundFailed(
                    f"{exc}; gave up after {attempt} attempts (round-retries={retries})"
                ) from exc
            log.warning("%s; retrying (attempt %d of %d)", exc, attempt + 1, retries + 1)
    raise AssertionError("unreachable")


def stat_total(replies: list[Message], key: str) -> torch.Tensor:
    """``sum_i`` of statistic ``key`` over the replies, in float64 and in reply order.

    Each reply's tensor is decoded only when it is added and dropped right after, so
    the merge holds the replies (as Flower hands them over) plus one running sum,
    never a second decoded copy of every reply.
    """
    total: torch.Tensor | None = None
    for m in replies:
        t = torch.from_numpy(m.content[P.STATS][key].numpy()).to(torch.float64)
        total = t if total is None else total.add_(t)
    assert total is not None, "no replies to sum"
    return total


class LoraStrategy(FedAvg):
    """FedAvg's sampling and loop, with tasks, validation and byte accounting.

    ``local_groups`` names the parts (``"A"``, ``"B"``, ``"head"``) that clients
    keep to themselves: they are never sent nor received, and a strategy with local
    parts has no global model, so it is evaluated on the clients (personalised).
    """

    name = "base"
    local_groups: frozenset[str] = frozenset()
    # Statistics a strategy gathers at each task end (LoRM's Grams), if any.
    task_stats: str = P.STATS_NONE

    def __init__(self, cfg: RunConfig, layout: ModelLayout) -> None:
        super().__init__(
            fraction_train=1.0,
            # Personalised evaluation runs on the clients; otherwise evaluation is
            # centralised on the server.
            fraction_evaluate=1.0 if self.local_groups else 0.0,
            min_train_nodes=cfg.min_clients,
            min_evaluate_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            weighted_by_key=P.MET_NUM_EXAMPLES,
            arrayrecord_key=P.ARRAYS,
            configrecord_key=P.CONFIG,
        )
        self.cfg = cfg
        self.layout = layout
        self.task = 0
        self.rounds: list[RoundLog] = []
        # node id -> partition id, set by the ServerApp. Replies are merged in
        # partition order, so float sums do not depend on arrival order.
        self.partition_of: dict[int, int] = {}
        self._sent: dict[str, torch.Tensor] = {}

    @property
    def has_global_model(self) -> bool:
        return not self.local_groups

    def _without_local(self, arrays: ArrayRecord) -> ArrayRecord:
        if not self.local_groups:
            return arrays
        tensors = P.arrays_to_tensors(arrays)
        return P.tensors_to_arrays(
            {k: v for k, v in tensors.items() if group_of(k) not in self.local_groups}
        )

    # ---------------------------------------------------------------- tasks
    def begin_task(self, task: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Called before task ``task``'s first round; returns the tensors to start from."""
        self.task = task
        return tensors

    def end_task(self, task: int, grid: Grid, tensors: dict[str, torch.Tensor]) -> TaskModel:
        """Called after the task's last round; returns the model to evaluate and export."""
        return TaskModel(tensors, self.cfg.lora_rank, self.cfg.lora_alpha)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this strategy (tensors, lists, numbers only)."""
        return {"task": self.task, "rounds": [asdict(r) for r in self.rounds]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task = int(state["task"])
        self.rounds = [RoundLog(**r) for r in state["rounds"]]

    # -------------------------------------------------------------- the loop
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
        on_round_end: Callable[[int, ArrayRecord], None] | None = None,
    ) -> Result:
        """Flower's round loop (train, client evaluation, server evaluation), plus:

        - ``first_round``: continue a task from a checkpoint;
        - retries: a round with fewer than ``min-clients`` valid replies is sent
          again, up to ``round-retries`` times, then :class:`RoundFailed` stops the run;
        - ``on_round_end(server_round, arrays)`` after each round (the checkpoint).
        """
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        result.arrays = arrays
        for server_round in range(first_round, num_rounds + 1):
            arrays, metrics = self._train_with_retries(grid, server_round, arrays, train_config, timeout)
            result.arrays = arrays
            result.train_metrics_clientapp[server_round] = metrics
            evaluate_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            if evaluate_messages:
                replies = list(grid.send_and_receive(evaluate_messages, timeout=timeout))
                self._count_timeouts(evaluate_messages, replies, "evaluate")
                personal = self.aggregate_evaluate(server_round, replies)
                if personal is not None:
                    result.evaluate_metrics_clientapp[server_round] = personal
            if evaluate_fn is not None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[server_round] = res
            if on_round_end is not None:
                on_round_end(server_round, arrays)
        return result

    def _train_with_retries(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        earlier: list[RoundLog] = []

        def attempt_round(attempt: int) -> tuple[ArrayRecord, MetricRecord]:
            messages = list(self.configure_train(server_round, arrays, config, grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            self._count_timeouts(messages, replies, "train")
            entry = self.rounds[-1]
            entry.attempts = attempt
            for old in earlier:  # what the failed attempts cost and why they failed
                entry.bytes_down += old.bytes_down
                entry.bytes_up += old.bytes_up
                entry.failures[:0] = [f"attempt {old.attempts}: {f}" for f in old.failures]
                entry.rejected[:0] = [f"attempt {old.attempts}: {r}" for r in old.rejected]
                entry.timeouts[:0] = old.timeouts
            try:
                return self.aggregate_train(server_round, replies)
            except AggregationFailed:
                if attempt <= self.cfg.round_retries:  # the next attempt's entry absorbs it;
                    earlier[:] = [self.rounds.pop()]  # the last one stays on record
                raise

        return with_retries(attempt_round, self.cfg.round_retries)

    def _count_timeouts(self, sent: list[Message], replies: list[Message], phase: str) -> None:
        """Nodes sent a message that did not answer within the timeout."""
        answered = {r.metadata.src_node_id for r in replies}
        missing = sorted({m.metadata.dst_node_id for m in sent} - answered)
        if missing:
            entry = self.rounds[-1]
            entry.timeouts.extend(missing)
            entry.failures.extend(f"{phase}, node {n}: no reply (timeout)" for n in missing)
            log.warning("task %d round %d: no %s reply from nodes %s (timeout)",
                        self.task, entry.round_in_task, phase, missing)  # fmt: skip

    # ------------------------------------------------------------ per round
    def round_plan(self, round_in_task: int) -> RoundPlan:
        return RoundPlan(train_a=True, train_b=True)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_in_task = server_round - 1
        plan = self.round_plan(round_in_task)
        config = ConfigRecord(dict(config))
        config[P.CFG_TASK] = self.task
        config[P.CFG_ROUND_IN_TASK] = round_in_task
        config[P.CFG_TRAIN_A] = plan.train_a
        config[P.CFG_TRAIN_B] = plan.train_b
        config[P.CFG_TRAIN_HEAD] = plan.train_head
        config[P.CFG_STATS] = plan.stats
        config[P.CFG_SEED] = self.cfg.seed * 100_003 + self.task * 1_009 + round_in_task
        if self.local_groups:  # (Flower cannot count the bytes of an empty string)
            config[P.CFG_LOCAL] = ",".join(sorted(self.local_groups))
        self._sent = P.arrays_to_tensors(arrays)
        outgoing = self._without_local(arrays)
        messages = list(super().configure_train(server_round, outgoing, config, grid))
        entry = RoundLog(task=self.task, round_in_task=round_in_task)
        entry.bytes_down = sum(P.record_bytes(m.content) for m in messages)
        self.rounds.append(entry)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        entry = self.rounds[-1]
        good: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                entry.failures.append(f"node {node}: {msg.error.reason}")
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            entry.bytes_up += P.record_bytes(msg.content)
            try:
                self.check_reply(msg)
            except P.PayloadError as exc:
                entry.rejected.append(str(exc))
                log.warning("round %d: rejected reply: %s", server_round, exc)
                continue
            good.append(msg)
        good.sort(key=lambda m: self.partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id))
        entry.replies = len(good)
        if len(good) < self.cfg.min_clients:
            raise AggregationFailed(
                f"task {self.task} round {entry.round_in_task}: only {len(good)} valid "
                f"replies, min-clients={self.cfg.min_clients}; failures: "
                f"{entry.failures + entry.rejected}"
            )
        weights = [P.num_examples(m) for m in good]
        entry.num_examples = sum(weights)
        entry.train_loss = sum(
            w * float(m.content[P.METRICS].get(P.MET_TRAIN_LOSS, 0.0)) for w, m in zip(weights, good)
        ) / max(sum(weights), 1)
        for key in (P.MET_TRAIN_SECONDS, P.MET_STATS_SECONDS):
            values = [float(m.content[P.METRICS].get(key, 0.0)) for m in good]
            entry.extra[f"client_{key.replace('-', '_')}_sum"] = sum(values)
            entry.extra[f"client_{key.replace('-', '_')}_max"] = max(values)
        start = time.perf_counter()
        merged = self.merge(good, weights, dict(self._sent))
        entry.merge_seconds = time.perf_counter() - start
        self._log_changes(entry, merged)
        metrics = MetricRecord({P.MET_TRAIN_LOSS: entry.train_loss, P.MET_NUM_EXAMPLES: entry.num_examples})
        return P.tensors_to_arrays(merged), metrics

    def _log_changes(self, entry: RoundLog, merged: dict[str, torch.Tensor]) -> None:
        """Largest absolute change of A, B and head this round (shows the schedule)."""
        groups = {
            "change_a": [l.a_key for l in self.layout.layers],
            "change_b": [l.b_key for l in self.layout.layers],
            "change_head": [self.layout.head_weight, self.layout.head_bias],
        }
        for name, keys in groups.items():
            diffs = [
                float((merged[k].double() - self._sent[k].double()).abs().max())
                for k in keys
                if k in merged and k in self._sent
            ]
            entry.extra[name] = max(diffs, default=0.0)

    # -------------------------------------------------- personalised evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.local_groups:
            return []
        config = ConfigRecord(dict(config))
        config[P.CFG_TASK] = self.task
        messages = list(
            super().configure_evaluate(server_round, self._without_local(arrays), config, grid)
        )
        self.rounds[-1].bytes_down += sum(P.record_bytes(m.content) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum per-task counts over clients: sample-weighted and unweighted means."""
        entry = self.rounds[-1]
        seen = self.task + 1
        correct, total, per_client = [0] * seen, [0] * seen, []
        for msg in replies:
            if msg.has_error():
                entry.failures.append(f"evaluate, node {msg.metadata.src_node_id}: {msg.error.reason}")
                continue
            entry.bytes_up += P.record_bytes(msg.content)
            m = msg.content[P.METRICS]
            c = [int(m.get(P.MET_CORRECT.format(k), 0)) for k in range(seen)]
            t = [int(m.get(P.MET_TOTAL.format(k), 0)) for k in range(seen)]
            correct = [a + b for a, b in zip(correct, c)]
            total = [a + b for a, b in zip(total, t)]
            if sum(t):
                per_client.append(sum(c) / sum(t))
        if not per_client:
            return None
        weighted = sum(correct) / max(sum(total), 1)
        unweighted = sum(per_client) / len(per_client)
        entry.personal = {
            "accuracy_weighted": weighted,
            "accuracy_unweighted": unweighted,
            "per_task_weighted": [c / t if t else float("nan") for c, t in zip(correct, total)],
            "per_client": per_client,
            "correct": sum(correct),
            "total": sum(total),
        }
        return MetricRecord({"personalised-accuracy": weighted})

    # ------------------------------------------------------------- to override
    def expected_reply(self, plan: RoundPlan) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of a reply's ``arrays`` record under ``plan``: what trained,
        less what stays on the clients."""
        trained = {g for g, on in (("A", plan.train_a), ("B", plan.train_b), ("head", plan.train_head)) if on}
        sent = trained - self.local_groups
        return {k: s for k, s in self.layout.shapes.items() if group_of(k) in sent}

    def check_reply(self, msg: Message) -> None:
        node = msg.metadata.src_node_id
        P.check_num_examples(node, msg)
        if P.ARRAYS not in msg.content:
            raise P.PayloadError(f"node {node}: reply has no '{P.ARRAYS}' record")
        plan = self.round_plan(self.rounds[-1].round_in_task)
        P.check_tensors(node, msg.content[P.ARRAYS], self.expected_reply(plan))

    def merge(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --------------------------------------- helpers of the Gram-based merges
    def expected_stats(self, kind: str) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of a valid ``stats`` record of kind ``kind``."""
        return expected_stats(
            kind, list(self.layout.layers), HEAD, self.layout.shapes[self.layout.head_weight],
            self.cfg.gram_alpha, self.cfg.head_gram_alpha,
        )  # fmt: skip

    def check_stats(self, msg: Message, kind: str) -> None:
        """A reply's statistics: exact keys and shapes, finite, and Grams that can be X X^T."""
        node = msg.metadata.src_node_id
        if P.STATS not in msg.content:
            raise P.PayloadError(f"node {node}: reply has no '{P.STATS}' record")
        for key, t in P.check_tensors(node, msg.content[P.STATS], self.expected_stats(kind)).items():
            if key.endswith("|" + P.STAT_G) or key.endswith("|" + P.STAT_AGA):
                P.check_gram(node, key, t)

    def merge_head(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
        anchor: bool = False,
    ) -> dict[str, torch.Tensor]:
        """RegMean of the head from ``W_i G_i`` and ``G_i``; sample-weighted mean of its bias."""
        w = current[self.layout.head_weight]
        weight = merge_lora_a_from_sums(
            stat_total(replies, P.stat_key(HEAD, P.STAT_WG)),
            stat_total(replies, P.stat_key(HEAD, P.STAT_G)),
            self.cfg.merge_ridge,
            w if anchor else None,
        )
        biases = [P.arrays_to_tensors(m.content[P.ARRAYS])[self.layout.head_bias] for m in replies]
        return {
            self.layout.head_weight: weight.to(w.dtype),
            self.layout.head_bias: weighted_mean(biases, weights),
        }
