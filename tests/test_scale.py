"""100 simulated clients on one machine: the run completes, every round merges all 100
replies, and the server never holds more than its pull window of them at once."""

from __future__ import annotations

import pytest

from benchmarks.scale import SCENARIO
from lorm_flwr.server.exchange import PULL_WINDOW
from tests.simulations import run_app

pytestmark = pytest.mark.slow

CLIENTS = 100


def test_a_hundred_client_lorm_simulation_completes(federation, tmp_path):
    _, results, _ = run_app(
        federation, tmp_path / "runs", CLIENTS, {**SCENARIO, "strategy": "lorm"}
    )
    assert results["clients"] == CLIENTS
    assert all(len(task) == CLIENTS and min(task) >= 2 for task in results["shard_sizes"])
    assert len(results["rounds"]) == SCENARIO["num-tasks"] * SCENARIO["rounds-per-task"]
    for row in results["rounds"]:
        assert row["replies"] == CLIENTS and not row["failures"] and not row["rejected"]
        assert row["held_max"] < PULL_WINDOW
    for entry in results["task_end"]:
        assert entry["task-grams"]["replies"] == CLIENTS
    assert len(results["accuracy_matrix"]) == SCENARIO["num-tasks"]
