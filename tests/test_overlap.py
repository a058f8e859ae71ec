"""A round's evaluation, results row and checkpoint run while the next round trains.

The real round loop over a scripted grid (:class:`tests.messages.ScriptedGrid`, fake
clock) with the tiny digits model: the work is put off until the next exchange's
messages are out, it gives the same rows as done at once, and a run that fails in the
next round still keeps it.
"""

from __future__ import annotations

import json

import pytest

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.runtime import initial_tensors, model_of, scenario_of
from lorm_flwr.server import rounds
from lorm_flwr.server.checkpoint import checkpoint_path, load_checkpoint
from lorm_flwr.server.exchange import ExchangeFailed, TooFewNodes, exchange
from lorm_flwr.server.results import RunRecorder
from lorm_flwr.server.rounds import FederatedRun
from lorm_flwr.server.run import run_federated
from lorm_flwr.server.strategies.fedit import FedIT
from tests.messages import ScriptedGrid, echo_node
from tests.simulations import TINY

NODES = [10, 11, 12]  # node 10 + p holds partition p


def _cfg(tmp_path, **changes) -> RunConfig:
    values = {**TINY, "strategy": "fedit", "num-clients": len(NODES), "min-clients": 2,
              "rounds-per-task": 2, "round-retries": 0, "output-dir": str(tmp_path)}  # fmt: skip
    return RunConfig.from_mapping({**values, **changes})


def _echo(scenario):
    return echo_node(scenario, NODES[0])


def _evaluations_logged(monkeypatch, grid: ScriptedGrid) -> list[int]:
    """For each round's evaluation, how many pushes the grid had seen by then."""
    seen: list[int] = []
    evaluate = rounds.evaluate_global

    def logged(*args, **kwargs):
        seen.append(len(grid.sent))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(rounds, "evaluate_global", logged)
    return seen


def _rounds(tmp_path, overlap: bool, monkeypatch) -> tuple[list[dict], list[int]]:
    tmp_path.mkdir()
    cfg = _cfg(tmp_path)
    scenario = scenario_of(cfg, len(NODES))
    grid = ScriptedGrid(NODES, [{n: _echo(scenario) for n in NODES}])
    strategy = FedIT(cfg, model_layout(model_of(cfg)))
    recorder = RunRecorder(cfg, tmp_path, [list(t) for t in scenario.tasks], scenario.shard_sizes())
    run = FederatedRun(grid, cfg, strategy, scenario, recorder, {n: n - 10 for n in NODES}, 0.0)
    run.overlap = overlap
    with monkeypatch.context() as patched:
        seen = _evaluations_logged(patched, grid)
        tensors = strategy.begin_task(0, dict(initial_tensors(cfg)))
        tensors = run.train_round(0, 0, tensors)
        assert len(recorder.rounds) == (0 if overlap else 1)  # put off, or done
        run.train_round(0, 1, tensors)
        assert len(recorder.rounds) == (1 if overlap else 2)  # done once round 2's went out
        run.flush()
    assert not run.pending and len(recorder.rounds) == 2
    return recorder.rounds, seen


def test_a_round_is_evaluated_after_the_next_rounds_messages_are_out(tmp_path, monkeypatch):
    at_once, seen_at_once = _rounds(tmp_path / "at-once", False, monkeypatch)
    overlapped, seen_overlapped = _rounds(tmp_path / "overlapped", True, monkeypatch)
    assert seen_at_once == [1, 2]  # round 1 evaluated before round 2 was sent
    assert seen_overlapped == [2, 2]  # ... while round 2 trained; round 2 at the flush

    def same(row: dict) -> dict:
        times = ("seconds", "elapsed")
        return {k: v for k, v in row.items() if not any(t in k for t in times)}

    assert [same(r) for r in overlapped] == [same(r) for r in at_once]
    assert all(r["accuracy"] == r["accuracy"] for r in overlapped)  # evaluated, not NaN


def test_a_run_failing_in_a_round_keeps_the_previous_rounds_results_and_checkpoint(
    tmp_path, monkeypatch
):
    cfg = _cfg(tmp_path, **{"num-tasks": 2})
    scenario = scenario_of(cfg, len(NODES))
    hello = {n: wire.hello_reply(n - 10, len(NODES)) for n in NODES}
    healthy = {n: _echo(scenario) for n in NODES}
    # The hello, task 0's two rounds, task 1's first round; its second round fails.
    grid = ScriptedGrid(NODES, [hello, healthy, healthy, healthy, {n: "error" for n in NODES}])
    seen = _evaluations_logged(monkeypatch, grid)
    with pytest.raises(ExchangeFailed, match="only 0 valid replies"):
        run_federated(grid, cfg)
    assert seen == [3, 4, 5]  # each round's evaluation: once the next messages were out
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "failed"
    assert [(r["task"], r["round_in_task"]) for r in results["rounds"]] == [(0, 0), (0, 1), (1, 0)]
    assert all("checkpoint_seconds" in r and r["accuracy"] >= 0 for r in results["rounds"])
    assert len(results["task_end"]) == 1 and "checkpoint_seconds" in results["task_end"][0]
    saved = load_checkpoint(checkpoint_path(folder))
    assert (saved.task, saved.round_in_task) == (1, 1)  # the last round that trained
    assert len(saved.recorder["rounds"]) == 3 and saved.strategy["task"] == 1


def test_the_work_meanwhile_runs_once_even_when_no_message_goes_out():
    grid = ScriptedGrid(NODES, [{n: "error" for n in NODES}])
    calls: list[int] = []

    def no_nodes():
        raise TooFewNodes("only 0 SuperNodes connected")

    with pytest.raises(ExchangeFailed, match="only 0 SuperNodes"):
        exchange(grid, no_nodes, lambda m: m, kind="train", min_replies=1, retries=0,
                 timeout=1.0, meanwhile=lambda: calls.append(1))  # fmt: skip
    assert calls == [1]
    with pytest.raises(ExchangeFailed, match="gave up after 3 attempts"):
        exchange(grid, list, lambda m: m, kind="train", min_replies=1, retries=2,
                 timeout=1.0, meanwhile=lambda: calls.append(2))  # fmt: skip
    assert calls == [1, 2]  # once, not once per attempt


def test_work_put_off_after_a_failed_one_is_dropped(tmp_path):
    """Each checkpoint holds the rows before it: one written without the failed round's
    row would replace the last good checkpoint with one a resume refuses."""
    cfg = _cfg(tmp_path)
    run = FederatedRun(None, cfg, None, None, None, {}, 0.0)
    run.overlap = True
    done: list[str] = []

    def fails() -> None:
        raise RuntimeError("evaluation failed")

    run.later(fails)
    run.later(lambda: done.append("task end"))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run.flush()
    assert done == [] and run.pending == []
    run.flush()  # the run's failure path flushes again: nothing left to write
    assert done == []


def test_an_exchange_that_fails_reports_its_own_error_over_the_work_meanwhile():
    def no_nodes():
        raise TooFewNodes("only 0 SuperNodes connected")

    def fails() -> None:
        raise RuntimeError("evaluation failed")

    with pytest.raises(ExchangeFailed, match="only 0 SuperNodes"):
        exchange(ScriptedGrid(NODES, [{}]), no_nodes, lambda m: m, kind="train",
                 min_replies=1, retries=0, timeout=1.0, meanwhile=fails)  # fmt: skip
