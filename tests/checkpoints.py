"""Valid checkpoints for a config, as the server itself would save them (no federation)."""

from __future__ import annotations

import torch

from lorm_flwr.config import RunConfig
from lorm_flwr.math.cross_task import TaskHistory, fold_task
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.checkpoint import Checkpoint, capture_rng

# The small model other tests use for speed.
SMALL = {"dataset": "digits", "backbone": "vit-tiny", "image_size": 16, "lora_rank": 2}


def small_config(**overrides) -> RunConfig:
    return RunConfig(**{**SMALL, **overrides})


def valid_checkpoint(cfg: RunConfig, task: int = 0, round_in_task: int = 1) -> Checkpoint:
    """The checkpoint a run of ``cfg`` saves with ``round_in_task`` rounds of ``task`` done:
    the run's starting tensors, a strategy state with one history entry per task done
    (LoRM), one results row per round done and the process's RNG states."""
    layout = model_layout(model_of(cfg))
    strategy = strategy_class(cfg.strategy)(cfg, layout)
    strategy.task = task - 1 if round_in_task == 0 and task > 0 else task
    gen = torch.Generator().manual_seed(0)
    for name in getattr(strategy, "history", {}):
        layer = next(layer for layer in layout.layers if layer.name == name)
        k, r, d = layer.d_in, layer.rank, layer.d_out
        history = TaskHistory()
        for _ in range(task):
            x = torch.randn(k, 2 * k, dtype=torch.float64, generator=gen)
            gram = x @ x.T if cfg.gram_alpha != 0 else (x * x).sum(1)
            b = torch.randn(d, r, dtype=torch.float64, generator=gen)
            a = torch.randn(r, k, dtype=torch.float64, generator=gen)
            history, _, _ = fold_task(history, b, a, gram)
        strategy.history[name] = history
    n, r = cfg.num_tasks, cfg.rounds_per_task
    rounds = [(t, i) for t in range(task) for i in range(r)] + [
        (task, i) for i in range(round_in_task)
    ]
    recorder = {
        "rounds": [{"task": t, "round_in_task": i, "train_loss": 1.0} for t, i in rounds],
        "accuracy_matrix": [[0.5] * (t + 1) + [None] * (n - t - 1) for t in range(task)],
        "task_end": [{"task": t} for t in range(task)],
        "accuracy_kind": "global",
        "resumed": [],
        "handshakes": [],
        "provenance": {"flower_run_ids": [1]},
        "shard_sizes": [[10, 10] for _ in range(n)],
    }
    return Checkpoint(
        config=cfg.to_dict(),
        task=task,
        round_in_task=round_in_task,
        tensors=dict(initial_tensors(cfg)),  # shared with the cache: clone before editing one
        strategy=strategy.state_dict(),
        recorder=recorder,
        rng=capture_rng(),
        elapsed_seconds=0.0,
    )
