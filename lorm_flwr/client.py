"""What one client does in a round, on plain tensors (the ClientApp wraps it in messages)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import get_tensors, set_tensors, set_trainable
from lorm_flwr.runtime import data_of, input_spec, model_of, scenario_of, set_threads
from lorm_flwr.train import pick_device, train_local

__all__ = ["ClientResult", "Instructions", "train_round"]


@dataclass(frozen=True)
class Instructions:
    task: int
    round_in_task: int
    train_a: bool
    train_b: bool
    train_head: bool
    stats: str
    seed: int


@dataclass
class ClientResult:
    tensors: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float


def train_round(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_tensors: dict[str, torch.Tensor],
    plan: Instructions,
) -> ClientResult:
    """Load the global tensors, train on this client's shard of the task, report back."""
    set_threads(cfg)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside [0, {num_partitions})")
    data = data_of(cfg)
    scenario = scenario_of(cfg, num_partitions)
    if not 0 <= plan.task < scenario.num_tasks:
        raise ValueError(f"task {plan.task} outside [0, {scenario.num_tasks})")
    shard = scenario.shards[plan.task][partition_id]
    model = model_of(cfg)
    set_tensors(model, global_tensors)
    set_trainable(model, train_a=plan.train_a, train_b=plan.train_b, train_head=plan.train_head)
    stats = train_local(
        model,
        data.train_x[shard],
        data.train_y[shard],
        task_classes=scenario.tasks[plan.task],
        inputs=input_spec(cfg),
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        device=pick_device(cfg.device),
        seed=plan.seed * 1_000 + partition_id,
    )
    return ClientResult(
        tensors=get_tensors(model),
        stats={},
        num_examples=stats.num_examples,
        train_loss=stats.loss,
    )
