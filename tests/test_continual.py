"""Accuracy-matrix metrics and the round schedule, on hand-computed examples."""

from __future__ import annotations

import math

from lorm_flwr.math.continual import (
    average_forgetting,
    factor_of_round,
    final_average_accuracy,
    reference_forgetting,
)

ACC = [
    [0.9, None, None],
    [0.7, 0.8, None],
    [0.5, 0.6, 0.95],
]


def test_average_forgetting_uses_max_over_earlier_tasks():
    # task 0: max(0.9, 0.7) - 0.5 = 0.4; task 1: 0.8 - 0.6 = 0.2; task 2 excluded.
    acc = [[math.nan if v is None else v for v in row] for row in ACC]
    assert math.isclose(average_forgetting(acc), 0.3)


def test_reference_forgetting_is_diagonal_minus_last_over_all_tasks():
    acc = [[math.nan if v is None else v for v in row] for row in ACC]
    assert math.isclose(reference_forgetting(acc), (0.4 + 0.2 + 0.0) / 3)


def test_single_task_has_no_forgetting_and_final_accuracy_counts_samples():
    assert math.isnan(average_forgetting([[0.9]]))
    assert final_average_accuracy(30, 40) == 0.75


def test_schedule_alternates_b_then_a():
    assert [factor_of_round(r) for r in range(4)] == ["B", "A", "B", "A"]
