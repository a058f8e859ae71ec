"""FedSA-LoRA: only A is shared and averaged; each client keeps its own B and head.

Clients train A and B. B (and the head, unless ``fedsa-head=shared``) stays on
each client across rounds and tasks in Flower's ``context.state``; a client that
has none yet starts from the run's seeded initial values. The same class serves
``fedsa-rslora`` (peft rsLoRA scaling) and ``fedsa-vera`` (peft VeRA: the rank-side
vector lambda_d is shared, lambda_b kept local), chosen by the adapter registry.
"""

from __future__ import annotations

import torch
from flwr.app import Message

from lorm_flwr import protocol as P
from lorm_flwr.merge import weighted_mean
from lorm_flwr.strategies.base import LoraStrategy


class FedSA(LoraStrategy):
    name = "fedsa"

    def __init__(self, cfg, layout) -> None:
        # Read by LoraStrategy.__init__ (personalised evaluation), so set first.
        self.local_groups = frozenset({"B", "head"} if cfg.fedsa_head == "local" else {"B"})
        super().__init__(cfg, layout)

    def merge(
        self,
        replies: list[Message],
        weights: list[int],
        current: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        sent = [P.arrays_to_tensors(m.content[P.ARRAYS]) for m in replies]
        w = weights if self.cfg.fedsa_weighted else [1] * len(replies)
        merged = {k: weighted_mean([s[k] for s in sent], w) for k in sent[0]}
        return {**current, **merged}
