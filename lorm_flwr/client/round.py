"""What one client does in a round, on plain tensors (the ClientApp wraps it in messages).

Client side only: nothing here imports the server's strategies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lorm_flwr import wire
from lorm_flwr.client.gram import layer_grams
from lorm_flwr.client.products import gram_products
from lorm_flwr.config import RunConfig
from lorm_flwr.math.cross_task import mean_delta
from lorm_flwr.math.fold import batchnorm_folded
from lorm_flwr.models.adapters import (
    adapter_layout,
    get_tensors,
    group_of,
    head_layers,
    head_module_of_layer,
    merged_for_inference,
    set_tensors,
    set_trainable,
)
from lorm_flwr.models.layout import AdaptedLayer
from lorm_flwr.models.pointwise import pointwise_as_matmul
from lorm_flwr.runtime import (
    data_of,
    generation_scores,
    initial_tensors,
    input_spec,
    keep_client_heap_warm,
    model_of,
    scenario_of,
    set_threads,
    validation_shards_of,
)
from lorm_flwr.seeds import client_shuffle_seed, gram_pass_seed, task_grams_seed
from lorm_flwr.train import autocast, pick_device, predict, train_local

__all__ = ["ClientResult", "evaluate_personal", "input_grams", "task_grams", "train_round"]

PEFT_PREFIX = "base_model.model."


@dataclass
class ClientResult:
    """A round's outcome; the ClientApp sends what the reply spec asks of it."""

    tensors: dict[str, torch.Tensor]  # every adapter and head tensor after training
    grams: dict[str, torch.Tensor]  # the Gram statistics asked for (may be empty)
    num_examples: int
    train_loss: float
    train_seconds: float = 0.0
    grams_seconds: float = 0.0
    local: dict[str, torch.Tensor] | None = None  # the client's own parts, to keep


def client_tensors(
    cfg: RunConfig,
    global_tensors: dict[str, torch.Tensor],
    local_tensors: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """This client's model: initial tensors, overridden by its own parts, then the global ones.

    A client that has no local parts yet starts them from the run's seeded initial
    values, the same on every client.
    """
    tensors = dict(initial_tensors(cfg))
    tensors.update(local_tensors or {})
    tensors.update(global_tensors)
    return tensors


def _load(
    cfg: RunConfig,
    model,
    global_tensors: dict[str, torch.Tensor],
    local_tensors: dict[str, torch.Tensor] | None,
) -> None:
    """Load :func:`client_tensors` into ``model``."""
    set_tensors(model, client_tensors(cfg, global_tensors, local_tensors))


def train_round(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_tensors: dict[str, torch.Tensor],
    plan: wire.Instructions,
    local_tensors: dict[str, torch.Tensor] | None = None,
    past: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> ClientResult:
    """Load the global tensors, train on this client's shard of the task, report back.

    ``past`` (LoRM, ``lorm-round-grams=mean-delta``, task t > 0): the past tasks'
    merged factors per layer (:func:`lorm_flwr.wire.decode_past_tasks`); the Grams are
    then recorded on ``W0 + (sum_{k<t} s B_k A_k + s B_i A_i) / (t+1)``, as the
    reference code does, instead of on the trained model.
    """
    set_threads(cfg)
    keep_client_heap_warm()
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside [0, {num_partitions})")
    data = data_of(cfg)
    scenario = scenario_of(cfg, num_partitions)
    if not 0 <= plan.task < scenario.num_tasks:
        raise ValueError(f"task {plan.task} outside [0, {scenario.num_tasks})")
    shard = scenario.shards[plan.task][partition_id]
    model = model_of(cfg)
    _load(cfg, model, global_tensors, local_tensors)
    set_trainable(model, train_a=plan.train_a, train_b=plan.train_b, train_head=plan.train_head)
    start = time.perf_counter()
    seed = client_shuffle_seed(plan.seed, partition_id)
    stats = train_local(
        model,
        data.train_x[shard],
        data.train_y[shard],
        task_classes=scenario.tasks[plan.task],
        inputs=input_spec(cfg, train=True),
        epochs=cfg.local_epochs,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr={"A": cfg.lr_of("A"), "B": cfg.lr_of("B"), "head": cfg.lr},
        warmup_steps=cfg.warmup_steps,
        model_dropout=cfg.model_dropout,
        objective="causal-lm" if cfg.generation else "classification",
        weight_decay=cfg.weight_decay,
        optimizer=cfg.optimizer,
        precision=cfg.precision,
        device=pick_device(cfg.device),
        seed=seed,
    )
    train_seconds = time.perf_counter() - start
    tensors = get_tensors(model)
    grams: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    if plan.grams in wire.PRODUCT_KINDS:
        layers = adapter_layout(model)
        # A LoRM B-round needs only A G A^T (r x r) per layer: record the codes' Gram.
        codes = plan.grams == wire.GRAMS_LORM_B
        projections = (
            {ly.name: AdaptedLayer.matrix(tensors[ly.a_key]) for ly in layers} if codes else None
        )
        record_on = model if past is None else _mean_delta_model(cfg, layers, tensors, past)
        inputs = input_grams(
            cfg, record_on, data.train_x[shard], with_head=True, projections=projections,
            seed=gram_pass_seed(seed),
        )  # fmt: skip
        grams = gram_products(plan.grams, tensors, inputs, layers, head_layers(model), codes=codes)
    local = {k: v for k, v in tensors.items() if group_of(k) in plan.local}
    return ClientResult(
        tensors, grams, stats.num_examples, stats.loss, train_seconds,
        time.perf_counter() - start if grams else 0.0, local=local or None,
    )  # fmt: skip


def evaluate_personal(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_tensors: dict[str, torch.Tensor],
    local_tensors: dict[str, torch.Tensor] | None,
    task: int,
    split: str = "test",
) -> tuple[list[int], list[int]]:
    """Global parts + this client's own parts, on its share of the ``split`` (``test`` or
    ``validation``) of the seen classes.

    Returns correct and total counts per seen task (class-incremental argmax over
    all seen classes).
    """
    set_threads(cfg)
    keep_client_heap_warm()
    data = data_of(cfg)
    scenario = scenario_of(cfg, num_partitions)
    seen = scenario.seen_classes(task)
    if split == "validation":
        shards, x, y = (
            validation_shards_of(cfg, num_partitions),
            data.validation_x,
            data.validation_y,
        )
    else:
        shards, x, y = scenario.test_shards, data.test_x, data.test_y
    idx = np.concatenate([shards[t][partition_id] for t in range(task + 1)])
    model = model_of(cfg)
    _load(cfg, model, global_tensors, local_tensors)
    if cfg.generation:  # one task: exact matches of the generated answers
        exact = generation_scores(cfg, model, x[idx]).exact
        return [int(exact.sum())], [len(idx)]
    preds = predict(
        model, x[idx], seen_classes=seen, inputs=input_spec(cfg),
        batch_size=cfg.eval_batch_size, device=pick_device(cfg.device), precision=cfg.precision,
    )  # fmt: skip
    labels = y[idx]
    correct, total = [], []
    for classes in scenario.tasks[: task + 1]:
        mask = np.isin(labels, list(classes))
        correct.append(int((preds[mask] == labels[mask]).sum()))
        total.append(int(mask.sum()))
    return correct, total


def _mean_delta_model(
    cfg: RunConfig,
    layers: list[AdaptedLayer],
    tensors: dict[str, torch.Tensor],
    past: dict[str, tuple[torch.Tensor, torch.Tensor]],
):
    """The reference's model for a round's Grams at task t > 0: the mean of the past tasks'
    deltas and this client's, a LoRA of rank (t+1) r with scaling 1 (folded into B)."""
    out = dict(tensors)
    for layer in layers:
        past_b, past_a = past[layer.name]
        scaled_b = layer.scaling * layer.matrix(tensors[layer.b_key]).float()
        a_cat, b_cat = mean_delta(past_b, past_a, scaled_b, layer.matrix(tensors[layer.a_key]))
        out[layer.a_key], out[layer.b_key] = layer.stored(a_cat, b_cat)
    rank = next(iter(past.values()))[1].shape[0] + cfg.lora_rank  # (t+1) r
    model = model_of(cfg, rank=rank, alpha=float(rank))
    set_tensors(model, out)
    return model


def input_grams(
    cfg: RunConfig,
    model,
    images,
    *,
    with_head: bool,
    projections: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Smoothed input Grams of every adapted layer (and the head) over ``images``.

    With ``augment`` the pass sees the training augmentation, ``gram-passes`` times
    over ``images``, drawn from ``seed`` (the reference's ``regmean_rounds``).

    The pass runs with the adapters merged into the base weights (one op per
    layer instead of three), BatchNorm folded into the convolutions before it,
    and 1x1 convolutions on small maps run as matrix products (CPU);
    ``projections`` as in :func:`layer_grams`.
    """
    targets = {
        layer.name: (model.get_submodule(PEFT_PREFIX + layer.name), layer.is_conv)
        for layer in adapter_layout(model)
    }
    alphas = {name: cfg.gram_alpha for name in targets}
    heads = head_layers(model) if with_head else []
    for head in heads:
        targets[head.name] = (head_module_of_layer(model, head), False)
        alphas[head.name] = cfg.head_gram_alpha
    device = pick_device(cfg.device)
    spec = input_spec(cfg, train=True)
    if model.training:  # eval() walks every module: only when needed (the fold requires it)
        model.eval()
    probe = input_spec(cfg)(images[:1], device)  # shapes only: no augmentation drawn
    if cfg.augment:
        torch.manual_seed(seed)
        images = np.concatenate([images] * cfg.gram_passes)
    with (
        merged_for_inference(model),
        batchnorm_folded(model, probe),
        pointwise_as_matmul(model),
        autocast(device, cfg.precision),
    ):
        grams, _ = layer_grams(
            model,
            targets,
            images,
            inputs=spec,
            batch_size=cfg.eval_batch_size,
            device=device,
            alphas=alphas,
            projections=projections,
            unmasked=frozenset(h.name for h in heads),  # one pooled vector per sample
        )
    return grams


def task_grams(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    tensors: dict[str, torch.Tensor],
    plan: wire.Instructions,
) -> tuple[dict[str, torch.Tensor], int]:
    """End-of-task statistics: each adapted layer's Gram on this client's task data.

    ``tensors`` is the model to record on, an adapter of ``plan.rank``/``plan.alpha``.
    """
    set_threads(cfg)
    keep_client_heap_warm()
    data = data_of(cfg)
    shard = scenario_of(cfg, num_partitions).shards[plan.task][partition_id]
    model = model_of(cfg, rank=plan.rank or None, alpha=plan.alpha if plan.rank else None)
    set_tensors(model, tensors)
    seed = task_grams_seed(cfg.seed, plan.task, partition_id)
    grams = input_grams(cfg, model, data.train_x[shard], with_head=False, seed=seed)
    stats = {wire.gram_key(name, wire.G): g.float() for name, g in grams.items()}
    return stats, len(shard)
