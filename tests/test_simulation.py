"""Integration: real Flower simulations (Ray) of the app on a tiny backbone."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from lorm_flwr.config import RunConfig
from lorm_flwr.data.datasets import load_dataset
from lorm_flwr.models.backbones import BACKBONES, build_classifier
from lorm_flwr.models.export import load_classifier
from lorm_flwr.train import InputSpec, predict
from tests.simulations import ALL_STRATEGIES as ALL
from tests.simulations import TINY, run_app

pytestmark = pytest.mark.slow


def _run(federation, tmp_path, num_clients=3, **overrides):
    return run_app(federation, tmp_path / "runs", num_clients, {**TINY, **overrides})


def _reloaded_accuracy(folder, results, with_loader=False):
    """Accuracy of the exported adapter on the final seen classes, reloaded with peft onto
    a classifier built by hand, or (``with_loader``) by ``load_classifier`` from the folder alone."""
    cfg = RunConfig.from_mapping(results["config"])
    data = load_dataset(cfg.dataset, cfg.test_fraction, cfg.seed)
    if with_loader:
        model = load_classifier(folder)
    else:
        base = build_classifier(cfg.backbone, cfg.image_size, data.num_classes, cfg.seed)
        model = PeftModel.from_pretrained(base, folder / "adapter").eval()
    seen = [c for task in results["tasks"] for c in task]
    mask = np.isin(data.test_y, seen)
    spec = BACKBONES[cfg.backbone]
    preds = predict(
        model, data.test_x[mask], seen_classes=seen,
        inputs=InputSpec(cfg.image_size, spec.mean, spec.std), batch_size=256,
        device=torch.device("cpu"),
    )  # fmt: skip
    return float((preds == data.test_y[mask]).mean())


def test_fedit_simulation_writes_results_and_a_reloadable_adapter(per_strategy):
    folder, results, proc = per_strategy["fedit"]
    assert "final average accuracy" in proc.stdout + proc.stderr
    assert results["clients"] == 2
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][1] is None  # task 1 unseen after task 0
    assert len(results["rounds"]) == 2
    for r in results["rounds"]:
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0 and r["replies"] == 2
        assert r["attempts"] == 1 and r["failures"] == r["rejected"] == r["timeouts"] == []
    # The final accuracy is the last matrix row, weighted by the test samples of each task.
    last = results["task_end"][-1]
    assert results["final_average_accuracy"] == last["correct"] / last["total"]
    assert matrix[-1][-1] == results["rounds"][-1]["per_task_accuracy"][-1]
    assert not math.isnan(results["average_forgetting"])
    assert results["bytes_up_total"] == sum(r["bytes_up"] for r in results["rounds"]) + sum(
        h["bytes_up"] for h in results["handshakes"]
    )
    assert (folder / "accuracy.png").stat().st_size > 1000
    # Where the time went (benchmarks/default_run.py): the start's timeline, in order,
    # and every round's and task end's checkpoint.
    timeline = results["handshakes"][-1]["timeline"]
    moments = ["server_started_at", "hello_at", "hello_done_at", "loop_started_at"]
    assert [timeline[k] for k in moments] == sorted(timeline[k] for k in moments)
    assert all(row["checkpoint_seconds"] > 0 for row in results["rounds"] + results["task_end"])
    assert results["average_incremental_accuracy"] == pytest.approx(
        sum(t["accuracy"] for t in results["task_end"]) / 2
    )
    prov = results["provenance"]
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # run from a checkout
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", prov["commit"] or ""), prov["commit"]
    assert prov["versions"]["flwr"].startswith("1.42") and prov["versions"]["torch"] == "2.14.1"
    assert len(prov["flower_run_ids"]) == 1 and prov["flower_run_ids"][0] > 0
    # The exported adapter, reloaded with peft, reproduces the server's evaluation.
    assert _reloaded_accuracy(folder, results) == pytest.approx(
        results["final_average_accuracy"], abs=1e-12
    )
    assert _reloaded_accuracy(folder, results, with_loader=True) == pytest.approx(
        results["final_average_accuracy"], abs=1e-12
    )


def test_lorm_simulation_follows_schedule_and_exports_merged_adapter(per_strategy):
    import json

    folder, results, _ = per_strategy["lorm"]
    rounds = results["rounds"]
    assert [(r["task"], r["round_in_task"]) for r in rounds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rounds:
        trained_b = r["round_in_task"] % 2 == 0  # B first, then A
        assert (r["change_b"] > 0) == trained_b, r
        assert (r["change_a"] > 0) == (not trained_b), r
        assert r["change_head"] > 0  # the head trains every round
        assert r["bytes_up"] > 0 and r["client_grams_seconds_sum"] > 0
    # After task t the exported adapter has rank (t+1) r.
    assert [t["adapter_rank"] for t in results["task_end"]] == [2, 4]
    # The end-of-task exchange is counted: every message of the run is in the totals.
    task_grams = [t["task-grams"] for t in results["task_end"]]
    assert all(x["replies"] == 2 and x["bytes_up"] > 0 for x in task_grams)
    sizes = results["message_bytes_per_client"]
    assert all(x["bytes_up"] >= 2 * sizes["end-of-task up"] for x in task_grams)
    everything = rounds + task_grams + results["handshakes"]
    assert results["bytes_up_total"] == sum(x["bytes_up"] for x in everything)
    assert results["bytes_down_total"] == sum(x["bytes_down"] for x in everything)
    expected = 2 * 2 * sum(v for k, v in sizes.items() if k.startswith(("round", "end-of-task")))
    assert 0 < results["bytes_up_total"] + results["bytes_down_total"] - expected < 0.01 * expected
    adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4
    assert _reloaded_accuracy(folder, results, with_loader=True) == pytest.approx(
        results["final_average_accuracy"], abs=1e-12
    )


@pytest.mark.parametrize("strategy", ALL)
def test_every_strategy_runs_two_tasks(per_strategy, strategy):
    folder, results, _ = per_strategy[strategy]
    matrix = results["accuracy_matrix"]
    if strategy == "joint":
        assert len(matrix) == 1 and None not in matrix[0]  # one model, all tasks at once
    else:
        assert len(matrix) == 2 and matrix[0][1] is None
    last = results["task_end"][-1]
    assert results["final_average_accuracy"] == last["correct"] / last["total"]
    personalised = strategy.startswith("fedsa")
    assert results["accuracy_kind"].startswith("personalised" if personalised else "global")
    for r in results["rounds"]:
        if strategy.startswith("joint"):
            assert r["bytes_up"] == 0 == r["bytes_down"]
            continue
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["replies"] == 2
        if personalised:
            p = r["personalised"]
            assert p["accuracy_weighted"] == p["correct"] / p["total"] == r["accuracy"]
            assert len(p["per_client"]) == 2
            assert min(p["per_client"]) <= p["accuracy_unweighted"] <= max(p["per_client"])
        if strategy == "ffa":
            assert r["change_a"] == 0.0 and r["change_b"] > 0
        if strategy == "regmean":
            assert 0.0 <= r["truncation_error_max"] <= 1.0
    if not personalised:
        assert (folder / "adapter" / "adapter_config.json").exists()


def test_tracked_runs_log_what_results_json_holds(per_strategy):
    """The shared runs track (tests.simulations.TRACKED): read back, the trackers hold the
    rounds, the accuracy-matrix rows and the final figures of each run's results.json."""
    import mlflow

    from tests.tracked import tensorboard_scalars

    # MLflow (LoRM): a file store in the run folder, one finished run.
    folder, results, _ = per_strategy["lorm"]
    mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
    runs = mlflow.search_runs(experiment_names=["lorm-flwr"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    run = runs.iloc[0]
    assert run["params.strategy"] == "lorm" and run["params.seed"] == "1"
    assert run["metrics.final/final_average_accuracy"] == pytest.approx(
        results["final_average_accuracy"]
    )
    client = mlflow.MlflowClient((folder / "mlruns").resolve().as_uri())
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run["run_id"], "round/accuracy")
    )
    assert history == [
        (i + 1, pytest.approx(r["accuracy"])) for i, r in enumerate(results["rounds"])
    ]
    ups = sorted(
        (m.step, m.value) for m in client.get_metric_history(run["run_id"], "round/bytes_up")
    )
    assert [v for _, v in ups] == [r["bytes_up"] for r in results["rounds"]]
    row = results["accuracy_matrix"][-1]
    for k, acc in enumerate(row):
        (last,) = [m for m in client.get_metric_history(run["run_id"], f"task_end/accuracy_task_{k}")
                   if m.step == len(results["rounds"])]  # fmt: skip
        assert last.value == pytest.approx(acc)
    assert {a.path for a in client.list_artifacts(run["run_id"])} >= {
        "accuracy.png",
        "results.json",
        "adapter",
    }

    # TensorBoard (FedIT): event files in the run folder.
    folder, results, _ = per_strategy["fedit"]
    scalars = tensorboard_scalars(folder / "tensorboard")
    assert scalars["round/train_loss"] == [
        (i + 1, pytest.approx(r["train_loss"])) for i, r in enumerate(results["rounds"])
    ]
    assert scalars["round/bytes_up"] == [
        (i + 1, r["bytes_up"]) for i, r in enumerate(results["rounds"])
    ]
    assert [v for _, v in scalars["task_end/accuracy"]] == pytest.approx(
        [t["accuracy"] for t in results["task_end"]]
    )
    assert scalars["task_end/forgetting"] == [(2, pytest.approx(results["average_forgetting"]))]
    assert scalars["final/final_average_accuracy"] == [
        (2, pytest.approx(results["final_average_accuracy"]))
    ]

    # W&B (joint-incremental, WANDB_MODE=offline): the offline run in the run folder.
    folder, results, _ = per_strategy["joint-incremental"]
    import json

    run_id = json.loads((folder / "tracking.json").read_text())["wandb"]["run_id"]
    assert list((folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_fedsa_uploads_about_half_of_fedit(per_strategy):
    fedit = per_strategy["fedit"][1]["rounds"][0]["bytes_up"]
    fedsa = per_strategy["fedsa"][1]["rounds"][0]["bytes_up"]
    assert fedsa < 0.6 * fedit


TEXT = {
    "dataset": "bbc-news",
    "backbone": "minilm",
    "num-tasks": 2,
    "rounds-per-task": 1,
    "local-epochs": 1,
    "batch-size": 8,
    "max-length": 32,
    "max-samples-per-class": 12,
    "lora-rank": 2,
    "lora-alpha": 4.0,
}


def test_text_backbone_runs_class_incremental(federation, tmp_path):
    """MiniLM (bundled) on BBC News (bundled): LoRM, 2 clients, 2 tasks, 1 round each.
    (Every strategy's client reply on text is checked in test_text.py.)"""
    strategy = "lorm"
    folder, results, _ = _run(federation, tmp_path, num_clients=2, strategy=strategy, **TEXT)
    assert results["tasks"] == [[0, 1, 2], [3, 4]]
    matrix = results["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None
    last = results["task_end"][-1]
    assert results["final_average_accuracy"] == last["correct"] / last["total"]
    if strategy == "lorm":
        assert results["task_end"][-1]["adapter_rank"] == 2 * 2  # (t+1) r after two tasks
        config = (folder / "adapter" / "adapter_config.json").read_text()
        assert "query" in config and "value" in config


def test_a_preset_file_reaches_the_app_and_its_dry_run_trains_nothing(federation, tmp_path):
    """`flwr run . --run-config FILE` with a copy of a preset that adds `dry-run = true`
    (Flower takes a TOML file or key=value pairs, not both): the plan is printed, nothing
    is trained or written."""
    preset = Path(__file__).resolve().parents[1] / "configs" / "offline-bbc-news.toml"
    copy = tmp_path / "dry.toml"
    copy.write_text(preset.read_text() + f'dry-run = true\noutput-dir = "{tmp_path / "runs"}"\n')
    proc = federation.run({}, num_supernodes=2, run_config_files=(str(copy),))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "dry run: strategy lorm, dataset bbc-news, backbone minilm" in log, log[-3000:]
    assert "nothing is trained" in log and "12 adapted layers, rank 4" in log
    # the preset pins num-clients=3; this federation has 2: the plan says the run would stop
    assert "the run would stop: num-clients=3, but 2 SuperNodes are connected" in log
    assert "samples per client" in log and "round 0 of each task, per client" in log
    assert "end-of-task statistics, per client" in log and "whole run, all clients" in log
    assert not (tmp_path / "runs").exists()  # no run folder: nothing was trained or written
