"""Partial participation (``clients-per-round``): a seeded draw of clients per round."""

from __future__ import annotations

import pytest

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.rounds import FederatedRun, train_exchange
from lorm_flwr.server.strategies.fedit import FedIT
from tests.messages import ScriptedGrid, train_content


def _run(cfg: RunConfig, partition_of: dict[int, int]) -> FederatedRun:
    run = FederatedRun.__new__(FederatedRun)  # only what participants() reads
    run.cfg, run.partition_of = cfg, partition_of
    return run


def test_a_round_draws_the_same_clients_in_every_run_by_partition():
    cfg = RunConfig(clients_per_round=3, num_clients=10)
    nodes = {1000 + 7 * p: p for p in range(10)}  # node ids differ from run to run
    other = {50 + p: p for p in range(10)}
    draws = [_run(cfg, nodes).participants(t, r) for t in range(2) for r in range(2)]
    again = [_run(cfg, other).participants(t, r) for t in range(2) for r in range(2)]
    assert all(len(d) == 3 for d in draws)
    assert [sorted(nodes[n] for n in d) for d in draws] == [
        sorted(other[n] for n in d) for d in again
    ]
    assert len({tuple(sorted(d)) for d in draws}) > 1  # rounds draw differently
    assert _run(RunConfig(num_clients=10), nodes).participants(0, 0) is None  # 0: everyone
    assert _run(RunConfig(clients_per_round=10, num_clients=10), nodes).participants(0, 0) is None


def test_only_the_drawn_nodes_get_a_message_and_are_merged():
    cfg = RunConfig(dataset="digits", backbone="vit-tiny", image_size=16, lora_rank=2,
                    strategy="fedit", clients_per_round=2)  # fmt: skip
    strategy = FedIT(cfg, model_layout(model_of(cfg)))
    tensors = dict(initial_tensors(cfg))
    reply = train_content({k: v + 1 for k, v in tensors.items()}, 5)
    grid = ScriptedGrid([1, 2, 3], [{1: reply, 2: reply, 3: reply}])
    replies, _, log, _ = train_exchange(grid, strategy, tensors, 0, nodes={1, 3})
    assert sorted(m.metadata.dst_node_id for m in grid.sent[0]) == [1, 3]
    assert sorted(r.node for r in replies) == [1, 3] and log.replies == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clients-per-round": 1, "min-clients": 2}, "fewer than min-clients=2"),
        ({"clients-per-round": 4, "num-clients": 3}, "more than num-clients=3"),
        ({"clients-per-round": -1}, "clients-per-round=-1 is invalid"),
    ],
)
def test_impossible_participation_stops_before_any_work(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(changes)


@pytest.mark.slow
def test_lorm_trains_on_a_sample_and_asks_the_tasks_clients_at_its_end(federation, tmp_path):
    from tests.simulations import TINY, run_app

    cfg = {**TINY, "strategy": "lorm", "rounds-per-task": 2, "clients-per-round": 2}
    _, results, _ = run_app(federation, tmp_path / "runs", 3, cfg)
    for row in results["rounds"]:
        assert len(row["participants"]) == 2 and row["replies"] == 2
    for end in results["task_end"]:  # every client asked to train in some round of the task
        asked = {
            p for r in results["rounds"] if r["task"] == end["task"] for p in r["participants"]
        }
        assert end["task-grams"]["replies"] == len(asked) >= 2
