"""What every strategy shares: the round's instructions, the reply spec, the Flower glue.

A strategy is Flower's ``FedAvg`` (its node sampling and message building) plus:

- :meth:`LoraStrategy.round_plan`: what trains in a round and which Gram
  statistics come back;
- :meth:`LoraStrategy.merge`: the aggregation, on replies that the wire checks
  passed (:class:`~lorm_flwr.wire.Reply`), never on raw messages;
- :meth:`LoraStrategy.begin_task` / :meth:`LoraStrategy.end_task` at task boundaries.

The round loop that sends, checks and counts lives in :mod:`lorm_flwr.server.rounds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.merge import regmean_head
from lorm_flwr.models.layout import ModelLayout, group_of
from lorm_flwr.seeds import round_seed

__all__ = [
    "Gathered",
    "LoraStrategy",
    "Merged",
    "RoundPlan",
    "TaskModel",
    "TaskQuery",
]

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundPlan:
    """What trains in a round and which Gram statistics the clients send back."""

    train_a: bool
    train_b: bool
    train_head: bool = True
    grams: str = wire.GRAMS_NONE


@dataclass(frozen=True)
class TaskModel:
    """The model evaluated and exported after a task: adapter tensors at ``rank``/``alpha``."""

    tensors: Tensors
    rank: int
    alpha: float


@dataclass(frozen=True)
class Merged:
    """A merge's new global tensors, and figures worth logging (e.g. truncation errors)."""

    tensors: Tensors
    report: dict[str, float] = field(default_factory=dict)


# The end-of-task query: (tensors to record on, instructions) -> the valid replies, gathered.
TaskQuery = Callable[[Tensors, wire.Instructions], "Gathered"]


class Gathered:
    """A round's (or a task end's) checked replies, folded in as they arrive in partition
    order (:func:`lorm_flwr.server.exchange.exchange` ``fold``).

    Each Gram statistic is added to a float64 running sum and dropped from its reply
    at once, so the server holds one set of sums however many clients reply; the
    rest of each reply (tensors, metrics: an adapter's size at most) is kept. The
    sums are taken in the same order in every run: results repeat bit for bit.
    """

    def __init__(self) -> None:
        self.replies: list[wire.Reply] = []  # without their Gram statistics
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, reply: wire.Reply) -> None:
        for key, t in reply.grams.items():
            t = t.to(torch.float64)
            if key in self.sums:
                self.sums[key].add_(t)
            else:
                self.sums[key] = t
        self.replies.append(dataclasses.replace(reply, grams={}))

    def result(self) -> Gathered:
        return self

    # A sequence of the (light) replies, in partition order.
    def __iter__(self):
        return iter(self.replies)

    def __len__(self) -> int:
        return len(self.replies)

    def __getitem__(self, i: int) -> wire.Reply:
        return self.replies[i]

    def total(self, key: str) -> torch.Tensor:
        """``sum_i`` of Gram statistic ``key`` over the replies, float64."""
        if key not in self.sums:
            raise ValueError(f"no replies to sum for {key}")
        return self.sums[key]


class LoraStrategy(FedAvg):
    """``local_groups`` names the parts (``"A"``, ``"B"``, ``"head"``) that clients
    keep to themselves: they are never sent nor received, and a strategy with local
    parts has no global model, so it is evaluated on the clients (personalised).
    """

    local_groups: frozenset[str] = frozenset()
    # The statistics a strategy gathers at each task end (LoRM's Grams), if any.
    task_grams: str = wire.GRAMS_NONE

    def __init__(self, cfg: RunConfig, layout: ModelLayout) -> None:
        super().__init__(
            fraction_train=1.0,
            # Personalised evaluation runs on the clients; otherwise evaluation is
            # centralised on the server.
            fraction_evaluate=1.0 if self.local_groups else 0.0,
            min_train_nodes=cfg.min_clients,
            min_evaluate_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            arrayrecord_key=wire.ARRAYS,
            configrecord_key=wire.CONFIG,
        )
        self.cfg = cfg
        self.layout = layout
        self.task = 0

    @property
    def has_global_model(self) -> bool:
        return not self.local_groups

    # ------------------------------------------------------------ per round
    def round_plan(self, round_in_task: int) -> RoundPlan:
        return RoundPlan(train_a=True, train_b=True)

    def instructions(self, round_in_task: int) -> wire.Instructions:
        plan = self.round_plan(round_in_task)
        return wire.Instructions(
            task=self.task,
            round_in_task=round_in_task,
            train_a=plan.train_a,
            train_b=plan.train_b,
            train_head=plan.train_head,
            grams=plan.grams,
            seed=round_seed(self.cfg.seed, self.task, round_in_task),
            local=self.local_groups,
        )

    def reply_spec(self, plan: wire.Instructions) -> wire.ReplySpec:
        return wire.train_reply_spec(
            self.layout, plan, self.cfg.gram_alpha, self.cfg.head_gram_alpha
        )

    def shared(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors the server sends: all but the clients' own parts."""
        return {k: v for k, v in tensors.items() if group_of(k) not in self.local_groups}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's train messages for round ``server_round - 1`` of the current task."""
        config = ConfigRecord(
            {**dict(config), **dict(self.instructions(server_round - 1).to_config())}
        )
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Personalised evaluation (strategies with local parts only)."""
        if not self.local_groups:
            return []
        config = ConfigRecord(
            {**dict(config), **dict(wire.Instructions(task=self.task).to_config())}
        )
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Disabled: Flower's aggregation reads records no check has passed. Rounds run
        in :func:`lorm_flwr.server.run.run_federated`, which merges checked replies only."""
        raise NotImplementedError(
            f"{type(self).__name__} merges only checked replies: run it with lorm_flwr.server.rounds"
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Disabled for the same reason: personalised evaluation replies are checked and
        pooled in :mod:`lorm_flwr.server.rounds`."""
        raise NotImplementedError(
            f"{type(self).__name__} pools only checked replies: run it with lorm_flwr.server.rounds"
        )

    # ------------------------------------------------------------- to override
    def merge(self, plan: wire.Instructions, replies: Gathered, current: Tensors) -> Merged:
        """The new global tensors from ``current`` and the checked replies (partition order):
        ``replies.replies`` their tensors and metrics, ``replies.total(key)`` the sums of
        their Gram statistics."""
        raise NotImplementedError

    def round_model(self, tensors: Tensors) -> TaskModel:
        """The model evaluated after each round (the merged tensors themselves)."""
        return TaskModel(tensors, self.cfg.lora_rank, self.cfg.lora_alpha)

    # ---------------------------------------------------------------- tasks
    def begin_task(self, task: int, tensors: Tensors) -> Tensors:
        """Called before task ``task``'s first round; returns the tensors to start from."""
        self.task = task
        return tensors

    def end_task(self, task: int, tensors: Tensors, query: TaskQuery) -> TaskModel:
        """Called after the task's last round; returns the model to evaluate and export.

        ``query`` runs the end-of-task statistics exchange (only strategies with
        ``task_grams`` use it).
        """
        return TaskModel(tensors, self.cfg.lora_rank, self.cfg.lora_alpha)

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this strategy (tensors, lists, numbers only)."""
        return {"task": self.task}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task = int(state["task"])

    # --------------------------------------- helpers of the Gram-based merges
    def merge_head(self, replies: Gathered, current: Tensors, anchor: bool = False) -> Tensors:
        """RegMean of each head Linear from its ``W_i G_i`` and ``G_i``; sample-weighted
        mean of its bias."""
        out: Tensors = {}
        for head in self.layout.heads:
            w = current[head.weight_key]
            weight, bias = regmean_head(
                replies.total(wire.gram_key(head.name, wire.WG)),
                replies.total(wire.gram_key(head.name, wire.G)),
                [r.arrays[head.bias_key] for r in replies.replies],
                [r.num_examples for r in replies.replies],
                self.cfg.merge_ridge,
                w if anchor else None,
            )
            out[head.weight_key], out[head.bias_key] = weight.to(w.dtype), bias
        return out
