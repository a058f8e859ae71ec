"""``tracking``: TensorBoard, MLflow and W&B (offline) get what results.json holds, each step
once, across a kill and a resume; a tracker that is not installed stops the run before any
work; a tracker that fails mid-run never stops it.

The real runs' tracking is read back in test_simulation (the shared runs track to MLflow,
TensorBoard and W&B) and test_resume (a killed and resumed run, one MLflow run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.server.tracking import STATE_FILE, RunTracking, check_tracking
from tests.tracked import tensorboard_scalars

TASKS = 2


def _recorder(folder: Path, rounds: int, task_ends: int, completed: bool = False):
    """What a RunRecorder holds after ``rounds`` rounds (2 a task) and ``task_ends``."""
    rows = [
        {"task": i // 2, "round_in_task": i % 2, "accuracy": 0.5 + 0.01 * i,
         "per_task_accuracy": [0.9 - 0.1 * i] + ([0.4] if i >= 2 else []),
         "train_loss": 1.0 / (i + 1), "bytes_up": 1000 + i, "bytes_down": 2000 + i,
         "merge_seconds": 0.1, "evaluate_seconds": 0.2, "exchange_seconds": float("nan")}
        for i in range(rounds)
    ]  # fmt: skip
    matrix = [[0.9, None], [0.6, 0.4]][:task_ends]
    ends = [{"task": t, "accuracy": 0.9 - 0.2 * t} for t in range(task_ends)]
    final = {"final_average_accuracy": 0.5, "average_forgetting": 0.3, "wall_seconds": 12.0}
    return SimpleNamespace(
        folder=folder, rounds=rows, task_end=ends, accuracy_matrix=matrix,
        status="completed" if completed else "running", final=final if completed else {},
    )  # fmt: skip


def _outputs(folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 20), (200, 10, 10)).save(folder / "accuracy.png")
    (folder / "results.json").write_text("{}")
    (folder / "adapter").mkdir()
    (folder / "adapter" / "adapter_config.json").write_text("{}")


def _killed_and_resumed(folder: Path, cfg: RunConfig, killed=lambda tracking: None) -> None:
    """As a run feeds its tracker (after each checkpoint): rounds 1-2 and task end 0 logged
    and noted; round 3 logged, then killed before tracking.json noted it. The resume goes on
    from the checkpoint after round 3 and logs to the end."""
    first = RunTracking(cfg, folder)
    first.sync(_recorder(folder, 1, 0))
    first.sync(_recorder(folder, 2, 1))
    noted = (folder / STATE_FILE).read_text()
    first.sync(_recorder(folder, 3, 1))
    (folder / STATE_FILE).write_text(noted)  # killed before the note
    killed(first)
    resumed = RunTracking(cfg, folder)
    resumed.sync(_recorder(folder, 3, 1))  # the checkpoint's records: round 3 again
    resumed.sync(_recorder(folder, 4, 1))
    resumed.sync(_recorder(folder, 4, 2))
    _outputs(folder)
    resumed.sync(_recorder(folder, 4, 2, completed=True))
    resumed.close(failed=False)


def test_tracking_values_are_checked():
    with pytest.raises(ConfigError, match="tracking='mlfow' is not known; did you mean 'mlflow'"):
        RunConfig.from_mapping({"tracking": "mlfow"})
    assert RunConfig().tracking == "none"


def test_a_tracker_that_is_not_installed_stops_before_any_work(monkeypatch, tmp_path):
    import importlib.util

    from lorm_flwr.server.plan import make_plan

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    cfg = RunConfig.from_mapping({"tracking": "mlflow", "output-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"mlflow-skinny.*\[tracking\]"):
        check_tracking(cfg)
    check_tracking(cfg.replace(tracking="tensorboard"))  # installed: no complaint
    plan = make_plan(cfg.replace(dataset="digits", backbone="vit-tiny", image_size=16), 2)
    assert any("[tracking]" in line for line in plan.lines() if "would stop" in line)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_tensorboard_logs_each_step_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = RunConfig.from_mapping({"tracking": "tensorboard"})
    _killed_and_resumed(tmp_path, cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    final = _recorder(tmp_path, 4, 2, completed=True)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["round/accuracy"] == [
        (i + 1, pytest.approx(r["accuracy"])) for i, r in enumerate(final.rounds)
    ]
    assert scalars["round/bytes_up"] == [(i + 1, 1000 + i) for i in range(4)]
    # the killed start's round 3 was purged, not kept beside the resumed start's
    assert "round/exchange_seconds" not in scalars  # NaN is not logged
    assert [s for s, _ in scalars["round/accuracy_task_1"]] == [3, 4]
    # Task ends at their last round's step: the accuracy-matrix row and forgetting.
    assert scalars["task_end/accuracy_task_0"] == [(2, pytest.approx(0.9)), (4, pytest.approx(0.6))]
    assert scalars["task_end/forgetting"] == [(4, pytest.approx(0.3))]
    assert scalars["final/final_average_accuracy"] == [(4, 0.5)]
    assert "accuracy" in events.Tags()["images"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| strategy | lorm |" in config
    state = json.loads((tmp_path / STATE_FILE).read_text())["tensorboard"]
    assert state["rounds_logged"] == 4 and state["task_ends_logged"] == 2
    assert state["final_logged"]


def test_tensorboard_resume_after_a_task_end_logged_but_not_noted(tmp_path):
    """Killed after logging task end 0 (at round 2's step) but before noting it: the resume
    purges from step 2, so round 2 is logged again beside the task end, each once."""
    cfg = RunConfig.from_mapping({"tracking": "tensorboard"})
    first = RunTracking(cfg, tmp_path)
    first.sync(_recorder(tmp_path, 2, 0))
    noted = (tmp_path / STATE_FILE).read_text()
    first.sync(_recorder(tmp_path, 2, 1))
    (tmp_path / STATE_FILE).write_text(noted)
    resumed = RunTracking(cfg, tmp_path)
    resumed.sync(_recorder(tmp_path, 2, 1))
    resumed.sync(_recorder(tmp_path, 3, 1))
    resumed.close(failed=False)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["round/accuracy"]] == [1, 2, 3]
    assert [step for step, _ in scalars["task_end/accuracy"]] == [2]


def test_mlflow_logs_one_run_with_each_step_once_across_a_resume(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = RunConfig.from_mapping({"tracking": "mlflow", "seed": 7})
    _killed_and_resumed(tmp_path, cfg)
    uri = (tmp_path / "mlruns").resolve().as_uri()
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["lorm-flwr"])
    assert len(runs) == 1  # the resume went on in the same run
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == tmp_path.name
    assert run["params.seed"] == "7" and run["params.tracking"] == "mlflow"
    assert run["metrics.final/final_average_accuracy"] == 0.5
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run["run_id"], "round/accuracy")
    assert sorted((m.step, m.value) for m in history) == [
        (i + 1, pytest.approx(0.5 + 0.01 * i)) for i in range(4)
    ]
    ends = client.get_metric_history(run["run_id"], "task_end/accuracy")
    assert sorted(m.step for m in ends) == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert artifacts == {"accuracy.png", "results.json", "adapter"}


def test_wandb_offline_run_is_resumed_by_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = RunConfig.from_mapping({"tracking": "wandb"})
    # The killed process's W&B service ends with it; here, in one process, it is ended.
    _killed_and_resumed(tmp_path, cfg, killed=lambda tracking: tracking.backend.run.finish())
    run_id = json.loads((tmp_path / STATE_FILE).read_text())["wandb"]["run_id"]
    # Offline: everything stays in the run folder, each start's offline run under the one
    # id; `wandb sync` uploads them into one run.
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)
    assert all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)


def test_a_failing_tracker_never_stops_the_run(tmp_path, caplog):
    cfg = RunConfig.from_mapping({"tracking": "tensorboard"})
    tracking = RunTracking(cfg, tmp_path)

    def broken(metrics, step):
        raise OSError("disk full")

    tracking.backend.log = broken
    with caplog.at_level(logging.WARNING, logger="flwr.lorm"):
        tracking.sync(_recorder(tmp_path, 1, 0))
        tracking.sync(_recorder(tmp_path, 2, 1))  # off after the first failure: no second
    warnings = [r for r in caplog.records if "tracking=tensorboard failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
    tracking.close(failed=True)


def test_a_resume_may_switch_trackers_and_replays_everything(tmp_path):
    """tracking.json keeps one entry per tracker: a resume that turns TensorBoard on logs
    the whole run so far to it."""
    (tmp_path / STATE_FILE).write_text(json.dumps({"mlflow": {"rounds_logged": 3,
                                                              "task_ends_logged": 1}}))  # fmt: skip
    tracking = RunTracking(RunConfig.from_mapping({"tracking": "tensorboard"}), tmp_path)
    tracking.sync(_recorder(tmp_path, 3, 1))
    tracking.close(failed=False)
    assert [
        step for step, _ in tensorboard_scalars(tmp_path / "tensorboard")["round/accuracy"]
    ] == [1, 2, 3]
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["mlflow"]["rounds_logged"] == 3 and state["tensorboard"]["rounds_logged"] == 3


@pytest.mark.parametrize(
    "content",
    ["not json", "[1, 2]", '{"tensorboard": 3}', '{"tensorboard": {"rounds_logged": "x"}}',
     '{"tensorboard": {"rounds_logged": -1, "task_ends_logged": 0}}'],
)  # fmt: skip
def test_a_damaged_tracking_json_is_named_and_left_as_it_is(tmp_path, content):
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(ConfigError, match=r"tracking\.json .*remove the file"):
        RunTracking(RunConfig.from_mapping({"tracking": "tensorboard"}), tmp_path)
    assert (tmp_path / STATE_FILE).read_text() == content
    assert not (tmp_path / "tensorboard").exists()
