"""LoRM: exact closed-form alternating merge of LoRA factors, across clients and tasks.

Per task: B and A are reset (B = 0, A from a server seed); round 0 trains B, round
1 trains A, and so on, the head in every round. Each round the server solves the
least-squares merge of the trained factor from the clients' sums
(:func:`~lorm_flwr.merge.merge_lora_a_from_sums` / ``merge_lora_b_from_sums``),
and RegMean for the head. At the end of a task it queries every client's Grams
on the task's merged model and folds them into the cross-task merge
``Delta W = R S^+``, kept as low-rank factors of rank (t+1) r.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from lorm_flwr import protocol as P
from lorm_flwr.continual import factor_of_round
from lorm_flwr.lorm import matrix
from lorm_flwr.merge import (
    cross_task_factors,
    gram_sum,
    merge_lora_a_from_sums,
    merge_lora_b_from_sums,
)
from lorm_flwr.models.adapters import fresh_factors
from lorm_flwr.strategies.base import (
    AggregationFailed,
    LoraStrategy,
    RoundPlan,
    TaskModel,
    stat_total,
)

__all__ = ["LoRM"]


@dataclass
class _TaskFactors:
    """What the server keeps per adapted layer across tasks (never a dense delta)."""

    scaled_bs: list[torch.Tensor] = field(default_factory=list)  # s B_t, (d, r)
    a_mats: list[torch.Tensor] = field(default_factory=list)  # A_t, (r, k)
    a_grams: list[torch.Tensor] = field(default_factory=list)  # A_t G_t, (r, k)
    gram_total: torch.Tensor | None = None  # S = sum_t G_t, (k, k) or (k,)


class LoRM(LoraStrategy):
    name = "lorm"
    task_stats = P.STATS_GRAMS

    def __init__(self, cfg, layout) -> None:
        super().__init__(cfg, layout)
        self.history: dict[str, _TaskFactors] = {l.name: _TaskFactors() for l in layout.layers}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": {k: asdict(h) for k, h in self.history.items()}}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.history = {k: _TaskFactors(**h) for k, h in state["history"].items()}

    # --------------------------------------------------------------- tasks
    def begin_task(self, task: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.task = task
        fresh = fresh_factors(list(self.layout.layers), seed=self.cfg.seed * 7_919 + task)
        return {**tensors, **fresh}  # the head carries over

    def round_plan(self, round_in_task: int) -> RoundPlan:
        factor = factor_of_round(round_in_task)
        return RoundPlan(
            train_a=factor == "A",
            train_b=factor == "B",
            stats=P.STATS_LORM_A if factor == "A" else P.STATS_LORM_B,
        )

    # ------------------------------------------------------------- replies
    def expected_reply(self, plan: RoundPlan) -> dict[str, tuple[int, ...]]:
        return {self.layout.head_bias: self.layout.shapes[self.layout.head_bias]}

    def check_reply(self, msg: Message) -> None:
        super().check_reply(msg)
        self.check_stats(msg, self.round_plan(self.rounds[-1].round_in_task).stats)

    # --------------------------------------------------------------- merge
    def merge(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        kind = self.round_plan(self.rounds[-1].round_in_task).stats
        def total(key: str) -> torch.Tensor:
            return stat_total(replies, key)  # fp64 sum over clients

        def anchor(t: torch.Tensor) -> torch.Tensor | None:
            return matrix(t) if self.cfg.merge_anchor == "global" else None

        ridge = self.cfg.merge_ridge
        out = dict(current)
        for layer in self.layout.layers:
            if kind == P.STATS_LORM_A:
                key, cur = layer.a_key, current[layer.a_key]
                new = merge_lora_a_from_sums(
                    total(P.stat_key(layer.name, P.STAT_AG)),
                    total(P.stat_key(layer.name, P.STAT_G)),
                    ridge,
                    anchor(cur),
                )
            else:
                key, cur = layer.b_key, current[layer.b_key]
                new = merge_lora_b_from_sums(
                    total(P.stat_key(layer.name, P.STAT_BAGA)),
                    total(P.stat_key(layer.name, P.STAT_AGA)),
                    ridge,
                    anchor(cur),
                )
            out[key] = new.reshape(cur.shape).to(cur.dtype)
        out.update(self.merge_head(replies, weights, current, self.cfg.merge_anchor == "global"))
        return out

    # ------------------------------------------------------------ task end
    def end_task(self, task: int, grid: Grid, tensors: dict[str, torch.Tensor]) -> TaskModel:
        record_on, rank, alpha = self._gram_model(task, tensors)
        nodes = sorted(grid.get_node_ids())
        config = ConfigRecord({P.CFG_TASK: task, P.CFG_RANK: rank, P.CFG_ALPHA: float(alpha)})
        content = RecordDict({P.ARRAYS: P.tensors_to_arrays(record_on), P.CONFIG: config})
        messages = [
            Message(content, dst_node_id=n, message_type=P.QUERY_TASK_STATS) for n in nodes
        ]
        replies = sorted(
            grid.send_and_receive(messages, timeout=self.cfg.round_timeout),
            key=lambda m: self.partition_of.get(m.metadata.src_node_id, m.metadata.src_node_id),
        )  # partition order: sums independent of arrival order
        expected = self.expected_stats(self.task_stats)
        grams: list[dict[str, torch.Tensor]] = []
        failures = []
        for r in replies:
            node = r.metadata.src_node_id
            try:
                if r.has_error():
                    raise P.PayloadError(f"node {node}: {r.error.reason}")
                g = P.check_tensors(node, r.content[P.STATS], expected)
                for key, t in g.items():
                    P.check_gram(node, key, t)
                grams.append(g)
            except P.PayloadError as exc:
                failures.append(str(exc))
        if len(grams) < self.cfg.min_clients:
            raise AggregationFailed(
                f"end of task {task}: only {len(grams)} valid statistics replies, "
                f"min-clients={self.cfg.min_clients}; {failures}"
            )
        return self._fold_task(tensors, grams)

    def _gram_model(
        self, task: int, tensors: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, float]:
        """The model clients record end-of-task Grams on.

        Default: the task's merged model ``W0 + s B_t A_t``. With
        ``lorm-reference-grams`` (the reference code): ``W0 + (sum_{k<=t} s B_k A_k) / (t+1)``,
        i.e. ``(t * mean_past + s B_t A_t) / (t + 1)``.
        """
        r = self.cfg.lora_rank
        if not self.cfg.lorm_reference_grams:
            return tensors, r, self.cfg.lora_alpha
        out = dict(tensors)
        for layer in self.layout.layers:
            h = self.history[layer.name]
            bs = h.scaled_bs + [layer.scaling * matrix(tensors[layer.b_key])]
            as_ = h.a_mats + [matrix(tensors[layer.a_key])]
            b = torch.cat(bs, dim=1) / (task + 1)
            a = torch.cat(as_, dim=0)
            out[layer.a_key], out[layer.b_key] = self._shape(layer, a, b)
        rank = r * (task + 1)
        return out, rank, float(rank)  # alpha = rank: scaling 1, folded into B

    @staticmethod
    def _shape(layer, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer.is_conv:
            return a[:, :, None, None].float(), b[:, :, None, None].float()
        return a.float(), b.float()

    def _fold_task(
        self, tensors: dict[str, torch.Tensor], grams: list[dict[str, torch.Tensor]]
    ) -> TaskModel:
        """``R += s B_t A_t G_t``, ``S += G_t``; return the factors of ``R S^+``."""
        out = dict(tensors)
        rank = 0
        for layer in self.layout.layers:
            h = self.history[layer.name]
            g_t = gram_sum([g[P.stat_key(layer.name, P.STAT_G)] for g in grams])  # fp64
            a_t = matrix(tensors[layer.a_key]).double()
            h.scaled_bs.append(layer.scaling * matrix(tensors[layer.b_key]).double())
            h.a_mats.append(a_t)
            h.a_grams.append(a_t * g_t.unsqueeze(0) if g_t.dim() == 1 else a_t @ g_t)
            h.gram_total = g_t if h.gram_total is None else h.gram_total + g_t
            b_cat, a_cat = cross_task_factors(
                h.scaled_bs, h.a_grams, h.gram_total, self.cfg.merge_ridge
            )
            out[layer.a_key], out[layer.b_key] = self._shape(layer, a_cat, b_cat)
            rank = a_cat.shape[0]
        return TaskModel(out, rank=rank, alpha=float(rank))
