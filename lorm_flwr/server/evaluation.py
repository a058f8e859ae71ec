"""Centralised class-incremental evaluation of a global model (pure torch; no Flower)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorm_flwr.config import RunConfig
from lorm_flwr.data.scenario import Scenario
from lorm_flwr.models.adapters import set_tensors
from lorm_flwr.runtime import data_of, generation_scores, input_spec, model_of, warm_heap
from lorm_flwr.train import evaluate_accuracy, pick_device, predict

__all__ = ["EvalResult", "evaluate_global"]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # over the test samples of every seen class
    per_task: list[float]  # accuracy on each seen task's classes
    correct: int
    total: int
    loss: float | None = None  # generation: held-out loss on the response tokens


def evaluate_global(
    cfg: RunConfig,
    scenario: Scenario,
    task: int,
    tensors: dict[str, torch.Tensor],
    *,
    rank: int | None = None,
    alpha: float | None = None,
    split: str = "test",
) -> EvalResult:
    """Accuracy after task ``task``: argmax over all seen classes, no task id. For
    instruction data (one task): the exact-match rate of greedily generated answers, and
    the held-out loss.

    ``split``: ``test``, or ``validation`` (held out of the training data by
    ``validation-fraction``).
    """
    data = data_of(cfg)
    seen = scenario.seen_classes(task)
    if split == "test":
        x, y = data.test_x, data.test_y
    elif split == "validation" and data.validation_y is not None:
        x, y = data.validation_x, data.validation_y
    else:
        raise ValueError(f"no {split!r} split (validation needs validation-fraction > 0)")
    mask = np.isin(y, seen)
    images, labels = x[mask], y[mask]
    model = model_of(cfg, rank=rank, alpha=alpha)
    set_tensors(model, tensors)
    if cfg.generation:  # exact match of the generated final answers
        with warm_heap():
            scores = generation_scores(cfg, model, images)
        correct = int(scores.exact.sum())
        em = correct / max(len(images), 1)
        return EvalResult(em, [em], correct, len(images), scores.loss)
    with warm_heap():  # its activations only: the model's tensors were set before
        preds = predict(
            model,
            images,
            seen_classes=seen,
            inputs=input_spec(cfg),
            batch_size=cfg.eval_batch_size,
            device=pick_device(cfg.device),
            precision=cfg.precision,
        )
    overall, per_task = evaluate_accuracy(preds, labels, scenario.tasks[: task + 1])
    correct = int((preds == labels).sum())
    return EvalResult(overall, per_task, correct, len(labels))
