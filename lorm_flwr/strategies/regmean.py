"""RegMean on LoRA: the closed-form merge of each layer's whole delta ``s B_i A_i``.

Clients train A and B, then send ``s B_i A_i G_i`` and ``G_i`` per adapted layer
(and ``W_i G_i``, ``G_i`` for the head). The server solves
``Delta W = (sum Delta_i G_i)(sum G_i)^+`` and re-factors it to rank r by
truncated SVD for the next round, logging the relative truncation error.
"""

from __future__ import annotations

import torch
from flwr.app import Message

from lorm_flwr import protocol as P
from lorm_flwr.merge import merge_lora_a_from_sums
from lorm_flwr.strategies.base import LoraStrategy, RoundPlan, stat_total

__all__ = ["RegMean", "truncate"]


def truncate(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``delta: (d, k)`` with ``scaling * B @ A ~= delta``.

    Returns ``B: (d, rank)``, ``A: (rank, k)`` and the relative Frobenius error.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)
    b = u[:, :rank] * root  # (d, r)
    a = root[:, None] * vh[:rank]  # (r, k)
    total = float(torch.linalg.vector_norm(s))
    error = float(torch.linalg.vector_norm(s[rank:])) / total if total > 0 else 0.0
    return b, a, error


class RegMean(LoraStrategy):
    name = "regmean"

    def round_plan(self, round_in_task: int) -> RoundPlan:
        return RoundPlan(train_a=True, train_b=True, stats=P.STATS_REGMEAN)

    def expected_reply(self, plan: RoundPlan) -> dict[str, tuple[int, ...]]:
        return {self.layout.head_bias: self.layout.shapes[self.layout.head_bias]}

    def check_reply(self, msg: Message) -> None:
        super().check_reply(msg)
        self.check_stats(msg, P.STATS_REGMEAN)

    def merge(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        def total(key: str) -> torch.Tensor:
            return stat_total(replies, key)

        out = dict(current)
        errors = []
        for layer in self.layout.layers:
            delta = merge_lora_a_from_sums(
                total(P.stat_key(layer.name, P.STAT_DG)),
                total(P.stat_key(layer.name, P.STAT_G)),
                self.cfg.merge_ridge,
            )  # (d, k): the exact RegMean delta, before truncation
            b, a, err = truncate(delta, layer.rank, layer.scaling)
            errors.append(err)
            out[layer.a_key] = a.reshape(current[layer.a_key].shape).to(current[layer.a_key].dtype)
            out[layer.b_key] = b.reshape(current[layer.b_key].shape).to(current[layer.b_key].dtype)
        out.update(self.merge_head(replies, weights, current))
        self.rounds[-1].extra["truncation_error_max"] = max(errors, default=0.0)
        self.rounds[-1].extra["truncation_error_mean"] = sum(errors) / max(len(errors), 1)
        return out
