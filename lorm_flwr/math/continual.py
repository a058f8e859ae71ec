"""Continual-learning bookkeeping: the round schedule and the accuracy-matrix metrics.

Pure Python/numpy; no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "average_forgetting",
    "factor_of_round",
    "final_average_accuracy",
    "pool_personal",
    "reference_forgetting",
]


def factor_of_round(round_in_task: int) -> str:
    """LoRM's alternation inside a task: round 0 trains ``"B"``, round 1 ``"A"``, ...

    ``round_in_task`` counts from 0 at the start of every task.
    """
    if round_in_task < 0:
        raise ValueError(f"round_in_task must be >= 0, got {round_in_task}")
    return "B" if round_in_task % 2 == 0 else "A"


def final_average_accuracy(correct: int, total: int) -> float:
    """All correct over all test samples of the seen classes after the last task."""
    return correct / total if total else float("nan")


def average_forgetting(acc: Sequence[Sequence[float]]) -> float:
    """``mean_k (max_{t<T-1} a[t][k] - a[T-1][k])`` over tasks ``k < T-1``.

    ``acc[t][k]`` is the accuracy on task k's classes after training task t
    (defined for ``k <= t``). NaN for a single task: nothing can be forgotten.
    This is the definition in algorithms.md; :func:`reference_forgetting` gives the
    LoRM reference code's variant.
    """
    a = np.asarray(acc, dtype=float)
    T = a.shape[0]
    if T < 2:
        return float("nan")
    drops = [np.nanmax(a[k : T - 1, k]) - a[T - 1, k] for k in range(T - 1)]
    return float(np.mean(drops))


def reference_forgetting(acc: Sequence[Sequence[float]]) -> float:
    """The LoRM reference code's ``mean_k (a[k][k] - a[T-1][k])`` over all T tasks."""
    a = np.asarray(acc, dtype=float)
    T = a.shape[0]
    return float(np.mean([a[k, k] - a[T - 1, k] for k in range(T)]))


def pool_personal(counts: Sequence[tuple[Sequence[int], Sequence[int]]]) -> dict:
    """Personalised accuracy over clients from each client's (correct, total) per seen task.

    ``accuracy_weighted`` pools every sample (sample-weighted over clients);
    ``accuracy_unweighted`` is the mean of the clients' own accuracies (clients
    without test samples left out).
    """
    seen = len(counts[0][0]) if counts else 0
    correct, total, per_client = [0] * seen, [0] * seen, []
    for c, t in counts:
        correct = [a + b for a, b in zip(correct, c)]
        total = [a + b for a, b in zip(total, t)]
        if sum(t):
            per_client.append(sum(c) / sum(t))
    if not per_client:
        return {}
    return {
        "accuracy_weighted": sum(correct) / max(sum(total), 1),
        "accuracy_unweighted": sum(per_client) / len(per_client),
        "per_task_weighted": [c / t if t else float("nan") for c, t in zip(correct, total)],
        "per_client": per_client,
        "correct": sum(correct),
        "total": sum(total),
    }
