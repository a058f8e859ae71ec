"""FedIT: FedAvg of every LoRA factor and of the head, weighted by sample count.

``A = sum p_i A_i`` and ``B = sum p_i B_i``: inexact for the product (``B A`` is
not ``sum p_i B_i A_i``), which is the point of comparing against it.
"""

from __future__ import annotations

import torch
from flwr.app import Message
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from lorm_flwr import protocol as P
from lorm_flwr.strategies.base import LoraStrategy


class FedIT(LoraStrategy):
    name = "fedit"

    def merge(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        # Flower's own weighted average (by the ``num-examples`` metric) of what was sent;
        # the rest (frozen or client-local parts) keeps its current value.
        merged = aggregate_arrayrecords([m.content for m in replies], P.MET_NUM_EXAMPLES)
        return {**current, **P.arrays_to_tensors(merged)}
