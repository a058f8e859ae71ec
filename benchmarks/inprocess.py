"""Our clients and a server strategy in one process, for analyses that need the server's
state between rounds (benchmarks/reference_agreement.py, benchmarks/task_end_collapse.py).

The clients run the app's own code (``lorm_flwr.client.round``: local training, the Gram
passes, the end-of-task statistics) one after another; their replies reach the strategy
as the ServerApp would fold them (``Gathered``). No Flower message is built: what travels
is the same tensors, unencoded.
"""

from __future__ import annotations

import numpy as np
import torch

from lorm_flwr import wire
from lorm_flwr.client.round import input_grams, task_grams, train_round
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout, set_tensors
from lorm_flwr.runtime import data_of, input_spec, model_of, scenario_of
from lorm_flwr.server.strategies.base import Gathered
from lorm_flwr.train import pick_device, predict

__all__ = ["Clients", "accuracy_per_task", "as_factors", "energy"]


class Clients:
    """The run's clients: a round's replies and, on request, their raw input Grams."""

    def __init__(self, cfg: RunConfig, num_clients: int) -> None:
        self.cfg, self.n = cfg, num_clients
        self.scenario = scenario_of(cfg, num_clients)
        self.data = data_of(cfg)
        layers = model_layout(model_of(cfg)).layers
        self.names = {wire.gram_key(ly.name, wire.G): ly.name for ly in layers}

    def train(
        self, plan: wire.Instructions, tensors, *, raw_grams: bool = False
    ) -> tuple[Gathered, list[tuple]]:
        """Every client trains on its shard; ``raw`` holds ``(tensors, Grams, n)`` per client,
        the Grams (each adapted layer's and the head's, as an A-round records them, on the
        client's trained model) only with ``raw_grams``."""
        gathered, raw = Gathered(), []
        for k in range(self.n):
            result = train_round(self.cfg, k, self.n, tensors, plan)
            gathered.add(
                wire.Reply(k, arrays=result.tensors, grams=result.grams,
                           metrics={wire.NUM_EXAMPLES: result.num_examples})
            )  # fmt: skip
            grams = {}
            if raw_grams:
                model = model_of(self.cfg)
                set_tensors(model, result.tensors)
                shard = self.scenario.shards[plan.task][k]
                grams = input_grams(self.cfg, model, self.data.train_x[shard], with_head=True)
            raw.append((result.tensors, grams, result.num_examples))
        return gathered, raw

    def task_end(
        self, record_on, plan: wire.Instructions, cfg: RunConfig | None = None
    ) -> tuple[Gathered, list[tuple]]:
        """Every client's end-of-task Grams on ``record_on``; ``raw`` holds ``(Grams by layer
        name, n)`` per client. ``cfg`` (default: the run's) may change how they are recorded
        (e.g. more augmented passes) without changing the run."""
        gathered, raw = Gathered(), []
        for k in range(self.n):
            stats, n = task_grams(cfg or self.cfg, k, self.n, record_on, plan)
            gathered.add(wire.Reply(k, grams=stats, metrics={wire.NUM_EXAMPLES: n}))
            raw.append(({self.names[key]: g for key, g in stats.items()}, n))
        return gathered, raw

    def recording_query(self, captured: list):
        """A strategy's ``TaskQuery`` that runs :meth:`task_end` and appends each query's
        raw per-client Grams to ``captured``."""

        def query(record_on, plan: wire.Instructions) -> Gathered:
            gathered, raw = self.task_end(record_on, plan)
            captured.append(raw)
            return gathered

        return query


def energy(m: torch.Tensor, gram: torch.Tensor) -> float:
    """``tr(m G m^T) = ||m X||^2`` for the inputs X of Gram ``gram``, (k, k) or its diagonal
    (k,); ``m: (rows, k)``. In fp64."""
    m, g = m.double(), gram.double()
    return float(((m * g) if g.dim() == 1 else (m @ g)).mul(m).sum())


def accuracy_per_task(
    cfg: RunConfig, scenario, task: int, tensors, rank: int, alpha: float
) -> tuple[list[float], list[float]]:
    """Test accuracy on each task seen by ``task``: class-incremental (argmax over every
    seen class, as the app reports) and task-aware (argmax over the task's own classes)."""
    data = data_of(cfg)
    model = model_of(cfg, rank=rank, alpha=alpha)
    set_tensors(model, tensors)
    device = pick_device(cfg.device)
    incremental, aware = [], []
    seen = [c for t in scenario.tasks[: task + 1] for c in t]
    for classes in scenario.tasks[: task + 1]:
        mask = np.isin(data.test_y, classes)
        x, y = data.test_x[mask], data.test_y[mask]
        kwargs = {"inputs": input_spec(cfg), "batch_size": cfg.eval_batch_size, "device": device}
        incremental.append(float((predict(model, x, seen_classes=seen, **kwargs) == y).mean()))
        aware.append(float((predict(model, x, seen_classes=classes, **kwargs) == y).mean()))
    return incremental, aware


def as_factors(layer, delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense delta ``(d, k)`` of rank at most ``rank`` as stored factors of that rank
    (exact: truncated SVD, zero-padded past ``min(d, k)``)."""
    from lorm_flwr.math.merge import truncate_to_rank

    b, a, _ = truncate_to_rank(delta, rank, 1.0)
    short = rank - a.shape[0]
    a = torch.cat([a, a.new_zeros(short, a.shape[1])])
    b = torch.cat([b, b.new_zeros(b.shape[0], short)], dim=1)
    return layer.stored(a, b)
