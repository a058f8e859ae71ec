"""FedSA-LoRA: only A is shared and averaged; each client keeps its own B and head.

Clients train A and B. B (and the head, unless ``fedsa-head=shared``) stays on
each client across rounds and tasks in Flower's ``context.state``; a client that
has none yet starts from the run's seeded initial values. The same class serves
``fedsa-rslora`` (peft rsLoRA scaling) and ``fedsa-vera`` (peft VeRA: the rank-side
vector lambda_d is shared, lambda_b kept local), chosen by the adapter registry.
"""

from __future__ import annotations

from lorm_flwr import wire
from lorm_flwr.math.merge import weighted_mean
from lorm_flwr.server.strategies.base import Gathered, LoraStrategy, Merged, Tensors


class FedSA(LoraStrategy):
    def __init__(self, cfg, layout) -> None:
        # Read by LoraStrategy.__init__ (personalised evaluation), so set first.
        self.local_groups = frozenset({"B", "head"} if cfg.fedsa_head == "local" else {"B"})
        super().__init__(cfg, layout)

    def merge(self, plan: wire.Instructions, gathered: Gathered, current: Tensors) -> Merged:
        replies = gathered.replies
        w = [r.num_examples for r in replies] if self.cfg.fedsa_weighted else [1] * len(replies)
        merged = {k: weighted_mean([r.arrays[k] for r in replies], w) for k in replies[0].arrays}
        return Merged({**current, **merged})
