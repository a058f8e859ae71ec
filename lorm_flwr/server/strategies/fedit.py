"""FedIT: FedAvg of every LoRA factor and of the head, weighted by sample count.

``A = sum p_i A_i`` and ``B = sum p_i B_i``: inexact for the product (``B A`` is
not ``sum p_i B_i A_i``), which is the point of comparing against it.
"""

from __future__ import annotations

from lorm_flwr import wire
from lorm_flwr.math.merge import fedavg_mean
from lorm_flwr.server.strategies.base import Gathered, LoraStrategy, Merged, Tensors


class FedIT(LoraStrategy):
    def merge(self, plan: wire.Instructions, gathered: Gathered, current: Tensors) -> Merged:
        # FedAvg's arithmetic over what was sent; the rest (frozen or client-local
        # parts) keeps its current value.
        replies = gathered.replies
        weights = [r.num_examples for r in replies]
        merged = {
            k: fedavg_mean([r.arrays[k] for r in replies], weights) for k in replies[0].arrays
        }
        return Merged({**current, **merged})
