"""RegMean on LoRA: the closed-form merge of each layer's whole delta ``s B_i A_i``.

Clients train A and B, then send ``s B_i A_i G_i`` and ``G_i`` per adapted layer
(and ``W_i G_i``, ``G_i`` for the head). The server solves
``Delta W = (sum Delta_i G_i)(sum G_i)^+`` and re-factors it to rank r by
truncated SVD for the next round, logging the relative truncation error.
"""

from __future__ import annotations

from lorm_flwr import wire
from lorm_flwr.math.merge import merge_from_sums, truncate_to_rank
from lorm_flwr.server.strategies.base import (
    Gathered,
    LoraStrategy,
    Merged,
    RoundPlan,
    Tensors,
)

__all__ = ["RegMean"]


class RegMean(LoraStrategy):
    def round_plan(self, round_in_task: int) -> RoundPlan:
        return RoundPlan(train_a=True, train_b=True, grams=wire.GRAMS_REGMEAN)

    def merge(self, plan: wire.Instructions, replies: Gathered, current: Tensors) -> Merged:
        out = dict(current)
        errors = []
        for layer in self.layout.layers:
            delta = merge_from_sums(
                replies.total(wire.gram_key(layer.name, wire.DG)),
                replies.total(wire.gram_key(layer.name, wire.G)),
                self.cfg.merge_ridge,
            )  # (d, k): the exact RegMean delta, before truncation
            b, a, err = truncate_to_rank(delta, layer.rank, layer.scaling)
            errors.append(err)
            out[layer.a_key] = a.reshape(current[layer.a_key].shape).to(current[layer.a_key].dtype)
            out[layer.b_key] = b.reshape(current[layer.b_key].shape).to(current[layer.b_key].dtype)
        out.update(self.merge_head(replies, current))
        report = {
            "truncation_error_max": max(errors, default=0.0),
            "truncation_error_mean": sum(errors) / max(len(errors), 1),
        }
        return Merged(out, report)
