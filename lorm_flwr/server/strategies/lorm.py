"""LoRM: exact closed-form alternating merge of LoRA factors, across clients and tasks.

Per task: B and A are reset (B = 0, A from a server seed); round 0 trains B, round
1 trains A, and so on, the head in every round. Each round the server solves the
least-squares merge of the trained factor from the clients' sums
(:func:`~lorm_flwr.math.merge.merge_from_sums`), and RegMean for the head. At the end of a task it queries every client's Grams
on the task's merged model and folds them into the cross-task merge
``Delta W = R S^+`` (:mod:`lorm_flwr.math.cross_task`), kept as factors of rank (t+1) r.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from lorm_flwr import wire
from lorm_flwr.math.continual import factor_of_round
from lorm_flwr.math.cross_task import TaskHistory, fold_task, mean_delta_factors, past_factors
from lorm_flwr.math.merge import merge_from_sums
from lorm_flwr.models.adapters import fresh_factors
from lorm_flwr.seeds import task_factors_seed
from lorm_flwr.server.strategies.base import (
    Gathered,
    LoraStrategy,
    Merged,
    RoundPlan,
    TaskModel,
    TaskQuery,
    Tensors,
)

__all__ = ["LoRM"]


class LoRM(LoraStrategy):
    task_grams = wire.GRAMS_TASK

    def __init__(self, cfg, layout) -> None:
        super().__init__(cfg, layout)
        self.history: dict[str, TaskHistory] = {l.name: TaskHistory() for l in layout.layers}

    def state_dict(self) -> dict[str, Any]:
        history = {k: vars(h) for k, h in self.history.items()}
        return {**super().state_dict(), "history": history}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.history = {k: TaskHistory(**h) for k, h in state["history"].items()}

    # --------------------------------------------------------------- tasks
    def begin_task(self, task: int, tensors: Tensors) -> Tensors:
        self.task = task
        fresh = fresh_factors(list(self.layout.layers), seed=task_factors_seed(self.cfg.seed, task))
        return {**tensors, **fresh}  # the head carries over

    def round_plan(self, round_in_task: int) -> RoundPlan:
        factor = factor_of_round(round_in_task)
        return RoundPlan(
            train_a=factor == "A",
            train_b=factor == "B",
            grams=wire.GRAMS_LORM_A if factor == "A" else wire.GRAMS_LORM_B,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's train messages; with ``lorm-round-grams=mean-delta`` after task 0 they
        also carry the past tasks' factors, for the clients' Grams on the mean-delta model."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.cfg.lorm_round_grams == "mean-delta" and self.task > 0:
            record = wire.past_tasks_record(
                {name: past_factors(h) for name, h in self.history.items()}
            )
            for message in messages:
                message.content[wire.PAST_TASKS] = record
        return messages

    def round_model(self, tensors: Tensors) -> TaskModel:
        """The model evaluated after a round: the task's merged adapter, or with
        ``round-eval-model=mean-delta`` the reference's mean of the past tasks' deltas and
        this one's (the head is the round's merged head in both)."""
        if self.cfg.round_eval_model != "mean-delta":
            return super().round_model(tensors)
        return self._mean_delta_model(tensors)

    # --------------------------------------------------------------- merge
    def merge(self, plan: wire.Instructions, replies: Gathered, current: Tensors) -> Merged:
        def anchor(t: torch.Tensor) -> torch.Tensor | None:
            return layer.matrix(t) if self.cfg.merge_anchor == "global" else None

        out = dict(current)
        for layer in self.layout.layers:
            if plan.grams == wire.GRAMS_LORM_A:  # A = (sum A_i G_i)(sum G_i)^+
                key, product, gram = layer.a_key, wire.AG, wire.G
            else:  # B = (sum B_i A G_i A^T)(sum A G_i A^T)^+
                key, product, gram = layer.b_key, wire.BAGA, wire.AGA
            cur = current[key]
            new = merge_from_sums(
                replies.total(wire.gram_key(layer.name, product)),
                replies.total(wire.gram_key(layer.name, gram)),
                self.cfg.merge_ridge,
                anchor(cur),
            )
            out[key] = new.reshape(cur.shape).to(cur.dtype)
        out.update(self.merge_head(replies, current, self.cfg.merge_anchor == "global"))
        return Merged(out)

    # ------------------------------------------------------------ task end
    def end_task(self, task: int, tensors: Tensors, query: TaskQuery) -> TaskModel:
        """Gather each client's Grams on the task's model and fold the task in."""
        record_on, rank, alpha = self._gram_model(tensors)
        replies = query(
            record_on, wire.Instructions(task=task, grams=self.task_grams, rank=rank, alpha=alpha)
        )
        out = dict(tensors)
        rank = 0
        keep = task == 0 and self.cfg.lorm_first_task == "keep"
        for layer in self.layout.layers:
            g_t = replies.total(wire.gram_key(layer.name, wire.G))  # fp64, over the clients
            scaled_b = layer.scaling * layer.matrix(tensors[layer.b_key]).double()
            self.history[layer.name], b_cat, a_cat = fold_task(
                self.history[layer.name],
                scaled_b,
                layer.matrix(tensors[layer.a_key]),
                g_t,
                self.cfg.merge_ridge,
            )
            out[layer.a_key], out[layer.b_key] = layer.stored(a_cat, b_cat)
            rank = a_cat.shape[0]
        if keep:  # the reference evaluates task 0's own merged adapter, W0 + s B_0 A_0
            return TaskModel(dict(tensors), rank=self.cfg.lora_rank, alpha=self.cfg.lora_alpha)
        return TaskModel(out, rank=rank, alpha=float(rank))

    def _gram_model(self, tensors: Tensors) -> tuple[Tensors, int, float]:
        """The model clients record end-of-task Grams on.

        Default: the task's merged model ``W0 + s B_t A_t``. With
        ``lorm-reference-grams`` (the reference code): the mean delta over tasks,
        ``W0 + (sum_{k<=t} s B_k A_k) / (t+1)``, as a rank-(t+1) r adapter.
        """
        if not self.cfg.lorm_reference_grams:
            return tensors, self.cfg.lora_rank, self.cfg.lora_alpha
        model = self._mean_delta_model(tensors)
        return model.tensors, model.rank, model.alpha

    def _mean_delta_model(self, tensors: Tensors) -> TaskModel:
        """``W0 + (sum_{k<t} s B_k A_k + s B_t A_t) / (t+1)``, a rank-(t+1) r adapter, for
        the current task t's factors in ``tensors`` and the past tasks in the history."""
        out = dict(tensors)
        rank = self.cfg.lora_rank
        for layer in self.layout.layers:
            a, b = mean_delta_factors(
                self.history[layer.name],
                layer.scaling * layer.matrix(tensors[layer.b_key]).double(),
                layer.matrix(tensors[layer.a_key]).double(),
            )
            out[layer.a_key], out[layer.b_key] = layer.stored(a, b)
            rank = a.shape[0]
        return TaskModel(out, rank=rank, alpha=float(rank))  # alpha = rank: scaling 1, in B
