"""FFA-LoRA: A stays frozen at its shared seeded initial value; only B (and the head)
train and are averaged, weighted by sample count. Exact for the product, since
``B-bar A = sum p_i B_i A``."""

from __future__ import annotations

from lorm_flwr.server.strategies.base import RoundPlan
from lorm_flwr.server.strategies.fedit import FedIT


class FFA(FedIT):
    def round_plan(self, round_in_task: int) -> RoundPlan:
        return RoundPlan(train_a=False, train_b=True)
