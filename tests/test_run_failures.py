"""A federation that loses nodes: retries redraw, waits are bounded, failures leave results.

Each test drives the real round loop (:mod:`lorm_flwr.server.rounds`) over a scripted grid
(:class:`tests.messages.ScriptedGrid`, on a fake clock), with the tiny digits model.
"""

from __future__ import annotations

import json

import pytest

from lorm_flwr import wire
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.runtime import initial_tensors, model_of, scenario_of
from lorm_flwr.server.exchange import ExchangeFailed
from lorm_flwr.server.results import RunRecorder
from lorm_flwr.server.rounds import FederatedRun, train_exchange
from lorm_flwr.server.run import run_federated
from lorm_flwr.server.strategies.fedit import FedIT
from tests.messages import ScriptedGrid, echo_node
from tests.simulations import TINY

NODES = [10, 11, 12, 13, 14]  # node 10 + p holds partition p


def _cfg(tmp_path, **changes) -> RunConfig:
    values = {**TINY, "strategy": "fedit", "num-clients": len(NODES), "min-clients": 2,
              "clients-per-round": 2, "round-retries": 2, "output-dir": str(tmp_path)}  # fmt: skip
    return RunConfig.from_mapping({**values, **changes})


def _echo(scenario):
    return echo_node(scenario, NODES[0])


def test_a_retried_round_asks_live_clients_in_place_of_the_failed_draw(tmp_path):
    """The retry used to ask the same drawn clients: one dead drawn node stopped the run
    when ``clients-per-round`` equals ``min-clients``."""
    cfg = _cfg(tmp_path)
    scenario = scenario_of(cfg, len(NODES))
    partition_of = {n: n - NODES[0] for n in NODES}
    strategy = FedIT(cfg, model_layout(model_of(cfg)))
    recorder = RunRecorder(cfg, tmp_path, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    probe = FederatedRun(None, cfg, strategy, scenario, recorder, partition_of, 0.0)
    drawn = sorted(probe.participants(0, 0))
    dead = drawn[0]
    healthy = _echo(scenario)
    grid = ScriptedGrid(NODES, [{n: "error" if n == dead else healthy for n in NODES}])
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, 0.0)
    tensors = strategy.begin_task(0, dict(initial_tensors(cfg)))
    run.train_round(0, 0, tensors)
    first, second = ([m.metadata.dst_node_id for m in sent] for sent in grid.sent)
    assert sorted(first) == drawn and len(second) == 2
    assert dead not in second and drawn[1] in second  # the one that answered is kept
    row = recorder.rounds[-1]
    assert row["attempts"] == 2 and row["replies"] == 2
    assert row["participants"] == sorted(partition_of[n] for n in second)
    # The same failures redraw the same nodes (seeded by the run, the round and the attempt).
    again = ScriptedGrid(NODES, [{n: "error" if n == dead else healthy for n in NODES}])
    FederatedRun(again, cfg, strategy, scenario, recorder, partition_of, 0.0).train_round(
        0, 0, tensors
    )
    assert [m.metadata.dst_node_id for m in again.sent[1]] == second


def test_a_round_fails_only_when_too_few_of_all_live_clients_reply(tmp_path):
    cfg = _cfg(tmp_path, **{"round-retries": 3})
    scenario = scenario_of(cfg, len(NODES))
    partition_of = {n: n - NODES[0] for n in NODES}
    strategy = FedIT(cfg, model_layout(model_of(cfg)))
    recorder = RunRecorder(cfg, tmp_path, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    alive = NODES[-1]  # only one node answers: fewer than min-clients=2 of all five
    grid = ScriptedGrid(NODES, [{n: _echo(scenario) if n == alive else "error" for n in NODES}])
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, 0.0)
    with pytest.raises(ExchangeFailed, match="only 1 valid replies, 2 needed") as info:
        run.train_round(0, 0, strategy.begin_task(0, dict(initial_tensors(cfg))))
    asked = {m.metadata.dst_node_id for sent in grid.sent for m in sent}
    assert asked == set(NODES)  # every live node was asked before the round gave up
    assert sorted(set(info.value.log.failed_nodes)) == NODES[:-1]


def test_waiting_for_nodes_that_left_is_bounded_by_the_round_timeout():
    """Flower's sampling (inside configure_train) used to wait for min-clients forever."""

    class Shrunk(ScriptedGrid):
        looks = 0

        def get_node_ids(self):
            self.looks += 1
            assert self.looks < 30, "waited for nodes without a bound"
            return [1]  # the other node left for good

    layout = model_layout(model_of(RunConfig.from_mapping(TINY)))
    strategy = FedIT(RunConfig.from_mapping({**TINY, "min-clients": 2, "round-timeout": 10.0}),
                     layout)  # fmt: skip
    grid = Shrunk([1, 2], [{}])
    tensors = dict(initial_tensors(strategy.cfg))
    with pytest.raises(
        ExchangeFailed,
        match=r"train: only 1 SuperNodes connected after waiting 10 s; min-clients=2 needed",
    ):
        train_exchange(grid, strategy, tensors, 0)
    assert grid.calls == 0 and 10.0 <= grid.now < 12.0  # nothing sent; the fake clock waited


def _results(folder):
    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    return json.loads((run / "results.json").read_text())


def test_a_run_that_fails_at_the_hello_leaves_its_run_folder_saying_why(tmp_path):
    """A fresh run that failed at the hello left no run folder: only the log said why."""
    cfg = _cfg(tmp_path, **{"round-retries": 0, "clients-per-round": 0})
    grid = ScriptedGrid(NODES, [{n: "error" for n in NODES}])
    with pytest.raises(ExchangeFailed):
        run_federated(grid, cfg)
    results = _results(tmp_path)
    assert results["status"] == "failed"
    assert "hello: only 0 valid replies" in results["error"]
    assert results["failed_round"]["failed_exchange"] == "hello"
    assert results["config"]["strategy"] == "fedit" and results["provenance"]["versions"]


def test_a_federation_of_the_wrong_size_leaves_a_failed_run_folder_with_the_remedy(tmp_path):
    cfg = _cfg(tmp_path, **{"num-clients": 3, "clients-per-round": 0})
    grid = ScriptedGrid([7, 9], [{7: wire.hello_reply(1, 2), 9: wire.hello_reply(0, 2)}])
    with pytest.raises(ConfigError, match="num-clients=3, but the federation has 2"):
        run_federated(grid, cfg)
    results = _results(tmp_path)
    assert results["status"] == "failed" and "num-supernodes=3" in results["error"]


def test_a_lora_rank_the_backbone_cannot_hold_stops_before_any_node_is_asked(tmp_path):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the grid was used ({name}) before the config was checked")

    cfg = _cfg(tmp_path, **{"lora-rank": 1_000_000, "clients-per-round": 0})
    with pytest.raises(ConfigError, match=r"lora-rank=1000000 is invalid: the smallest adapted"):
        run_federated(Untouchable(), cfg)
    results = _results(tmp_path)
    assert results["status"] == "failed" and "lora-rank=1000000" in results["error"]


def test_a_retry_with_no_fresh_node_left_asks_a_failed_one_again(tmp_path):
    """With no node left that never failed, a retry used to ask only the survivors, which
    cannot reach min-clients: the round stopped while a node that had recovered idled."""
    nodes = NODES[:3]
    cfg = _cfg(tmp_path, **{"num-clients": 3})
    scenario = scenario_of(cfg, 3)
    partition_of = {n: n - NODES[0] for n in nodes}
    strategy = FedIT(cfg, model_layout(model_of(cfg)))
    recorder = RunRecorder(cfg, tmp_path, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    first = sorted(FederatedRun(None, cfg, strategy, scenario, recorder, partition_of, 0.0)
                   .participants(0, 0))  # fmt: skip
    spare = next(n for n in nodes if n not in first)
    ok = _echo(scenario)
    script = [
        {n: "error" if n == first[0] else ok for n in nodes},  # a drawn node fails
        {n: "error" if n == spare else ok for n in nodes},  # so does the one drawn for it
        {n: ok for n in nodes},  # both have recovered
    ]
    grid = ScriptedGrid(nodes, script)
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, partition_of, 0.0)
    run.train_round(0, 0, strategy.begin_task(0, dict(initial_tensors(cfg))))
    third = sorted(m.metadata.dst_node_id for m in grid.sent[2])
    # The survivor, and the first of the failed in partition order (both have recovered).
    assert len(grid.sent) == 3 and third == sorted([first[1], min(first[0], spare)])
    # The row names the partitions whose replies were merged.
    assert recorder.rounds[-1]["participants"] == [partition_of[n] for n in third]


def test_nodes_outside_the_hello_do_not_count_towards_min_clients():
    layout = model_layout(model_of(RunConfig.from_mapping(TINY)))
    cfg = RunConfig.from_mapping({**TINY, "min-clients": 2, "round-timeout": 5.0})
    grid = ScriptedGrid([1, 99], [{}])  # 2 left; 99 is not a node of the hello
    with pytest.raises(ExchangeFailed, match=r"only 1 of the hello's SuperNodes connected"):
        train_exchange(grid, FedIT(cfg, layout), dict(initial_tensors(cfg)), 0, members={1, 2})


def test_a_resume_that_fails_before_its_first_round_keeps_the_earlier_results(tmp_path):
    """It used to rewrite results.json from an empty recorder: tasks, shard sizes and the
    message sizes gone, a completed run's status lost."""
    from lorm_flwr.server.checkpoint import save_checkpoint
    from tests.checkpoints import small_config, valid_checkpoint

    cfg = small_config(round_retries=0, num_clients=0)
    save_checkpoint(tmp_path, valid_checkpoint(cfg, 1, 1))
    earlier = {"status": "failed", "tasks": [[0, 1], [2, 3]], "shard_sizes": [[10, 10]],
               "rounds": [{"task": 0}], "message_bytes_per_client": {"round up": 5}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    grid = ScriptedGrid([7, 9], [{7: "error", 9: "error"}])  # the hello fails
    with pytest.raises(ExchangeFailed):
        run_federated(grid, cfg.replace(resume_from=str(tmp_path)))
    now = json.loads((tmp_path / "results.json").read_text())
    assert now == {**earlier, "error": now["error"]} and "hello: only 0 valid" in now["error"]
    completed = {**earlier, "status": "completed", "final_average_accuracy": 0.5}
    (tmp_path / "results.json").write_text(json.dumps(completed))
    with pytest.raises(ExchangeFailed):
        run_federated(grid, cfg.replace(resume_from=str(tmp_path)))
    assert json.loads((tmp_path / "results.json").read_text()) == completed
