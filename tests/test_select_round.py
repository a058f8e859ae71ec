"""``select-round=best-validation``: every round scored on a validation split carved from the
training data, and the round with the best validation accuracy reported with its test
accuracy and the last round's."""

from __future__ import annotations

import math

import pytest

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.server.results import selected_round
from tests.simulations import TINY, run_app


def test_best_validation_needs_a_validation_split():
    with pytest.raises(ConfigError, match="give validation-fraction > 0"):
        RunConfig.from_mapping({"select-round": "best-validation"})
    with pytest.raises(ConfigError, match="select-round"):
        RunConfig.from_mapping({"select-round": "best-test"})
    RunConfig.from_mapping({"select-round": "best-validation", "validation-fraction": 0.1})


def _row(task, r, val, test):
    return {"task": task, "round_in_task": r, "validation_accuracy": val, "accuracy": test}


def test_the_first_best_round_of_the_last_task_is_selected():
    rounds = [
        _row(0, 0, 0.99, 0.9),  # an earlier task's round never counts (fewer classes seen)
        _row(1, 0, 0.5, 0.4),
        _row(1, 1, 0.7, 0.6),
        _row(1, 2, math.nan, 0.1),  # a round without a validation score is skipped
        _row(1, 3, 0.7, 0.65),  # a tie: the earlier round stays
        _row(1, 4, 0.6, 0.62),
    ]
    out = selected_round(rounds)
    assert out["selected_round"] == {"round": 3, "task": 1, "round_in_task": 1,
                                     "validation_accuracy": 0.7, "test_accuracy": 0.6}  # fmt: skip
    assert out["last_round"]["round"] == 6 and out["last_round"]["test_accuracy"] == 0.62
    assert selected_round([_row(0, 0, math.nan, 0.5)]) == {"selected_round": None}


@pytest.mark.slow
def test_every_round_is_scored_on_validation_and_the_best_is_reported(federation, tmp_path):
    """FedIT (a global model, scored on the server's validation split); FedSA's personalised
    selection runs in test_sequence_classification.py's FedSA simulation."""
    cfg = {**TINY, "strategy": "fedit", "num-tasks": 1, "rounds-per-task": 3,
           "validation-fraction": 0.2, "select-round": "best-validation"}  # fmt: skip
    _, results, _ = run_app(federation, tmp_path / "runs", 2, cfg)
    check_selection(results, rounds=3)


def check_selection(results: dict, rounds: int) -> None:
    """Every round has a validation score; the first best round is reported with its test
    accuracy, and the last round's as well."""
    rows = results["rounds"]
    assert len(rows) == rounds
    assert all(0.0 <= r["validation_accuracy"] <= 1.0 for r in rows)
    chosen, last = results["selected_round"], results["last_round"]
    best = max(r["validation_accuracy"] for r in rows)
    first_best = next(i for i, r in enumerate(rows) if r["validation_accuracy"] == best)
    assert chosen["round"] == first_best + 1 and chosen["validation_accuracy"] == best
    assert chosen["test_accuracy"] == rows[first_best]["accuracy"]
    assert last["round"] == rounds and last["test_accuracy"] == rows[-1]["accuracy"]
    assert results["final_average_accuracy"] == pytest.approx(last["test_accuracy"])
