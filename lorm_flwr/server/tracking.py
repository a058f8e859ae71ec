"""Experiment tracking: the run's figures in TensorBoard, MLflow or W&B (``tracking``).

The tracker is fed from what :class:`~lorm_flwr.server.results.RunRecorder` records, so it
logs exactly what results.json holds. Every metric's step is the run's round number
(1-based; a task end is logged at the step of its task's last round), so per-round curves
and task-end points share one axis in every tracker.

A step is logged once. ``tracking.json`` in the run folder keeps, per tracker, the tracked
run's id and how many rounds and task ends were logged; :meth:`RunTracking.sync` logs whatever the
recorder holds beyond that, so a resumed run goes on in the same tracked run, first
logging what the killed start recorded but did not log, and never logs a step twice
(TensorBoard also purges events from a killed start's steps at or after the resume point;
MLflow's own metric history is the count when it is reachable).

Offline first: TensorBoard writes event files to ``<run>/tensorboard``; MLflow logs to a
file store in ``<run>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set; W&B writes under
``<run>/wandb`` and honours ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.math.continual import average_forgetting

__all__ = ["STATE_FILE", "RunTracking", "check_tracking", "missing_tracker", "start_tracking"]

log = logging.getLogger("flwr.lorm")

STATE_FILE = "tracking.json"
EXTRA = "pip install -e '.[tracking]'"
# tracking value -> the module it needs (and the package that brings it)
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
EXPERIMENT = "lorm-flwr"  # MLflow experiment and W&B project, unless the environment names one

# A round row's figures that are logged, under round/...
ROUND_METRICS = ("accuracy", "train_loss", "bytes_up", "bytes_down", "merge_seconds",
                 "evaluate_seconds", "exchange_seconds")  # fmt: skip
FINAL_METRICS = ("final_average_accuracy", "average_incremental_accuracy",
                 "average_forgetting", "reference_forgetting", "bytes_up_total",
                 "bytes_down_total", "wall_seconds")  # fmt: skip


def missing_tracker(cfg: RunConfig) -> str | None:
    """Why ``cfg.tracking`` cannot run here (its package is not installed), or None."""
    module = MODULES.get(cfg.tracking)
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return (
        f"tracking={cfg.tracking!r} needs the {PACKAGES[cfg.tracking]} package, which is not "
        f"installed: {EXTRA} (the tracking extra), or set tracking='none'"
    )


def check_tracking(cfg: RunConfig) -> None:
    """Stop before any work when the tracker asked for is not installed."""
    problem = missing_tracker(cfg)
    if problem:
        raise ConfigError(problem)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only: NaN (e.g. no loss in a round) and None are not logged."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """``round/...``: a results.json round row's figures, per-task accuracy included."""
    metrics = {f"round/{k}": row.get(k) for k in ROUND_METRICS}
    for k, acc in enumerate(row.get("per_task_accuracy", [])):
        metrics[f"round/accuracy_task_{k}"] = acc
    return _finite(metrics)


def task_end_metrics(matrix: list[list[float | None]], entry: dict[str, Any]) -> dict[str, float]:
    """``task_end/...``: the accuracy-matrix row of this task end and forgetting so far."""
    row = matrix[-1]
    metrics: dict[str, Any] = {
        "task_end/task": entry["task"],
        "task_end/accuracy": entry["accuracy"],
    }
    for k, acc in enumerate(row):
        if acc is not None:
            metrics[f"task_end/accuracy_task_{k}"] = acc
    if len(matrix) > 1:
        metrics["task_end/forgetting"] = average_forgetting(matrix)
    return _finite(metrics)


def task_end_steps(rounds: list[dict[str, Any]], task_ends: list[dict[str, Any]]) -> list[int]:
    """The step of each task end: the number of rounds run up to its task's last round."""
    return [sum(1 for r in rounds if r["task"] <= entry["task"]) for entry in task_ends]


def start_tracking(recorder) -> None:
    """Open the tracker ``tracking`` names for ``recorder``'s run (a resumed run: the same
    tracked run) and log what is recorded but not yet logged."""
    if recorder.cfg.tracking != "none" and recorder.tracking is None:
        recorder.tracking = RunTracking(recorder.cfg, recorder.folder)
        recorder.track()


class RunTracking:
    """One run's tracker: started once per start of the run, fed by :meth:`sync`.

    A tracker that cannot start stops the run before its first round with a
    :class:`ConfigError` that names the remedy. Tracker errors after the start never stop
    the run (results.json is the record): the first is logged as a warning and tracking
    is off for the rest of the run.
    """

    def __init__(self, cfg: RunConfig, folder: Path) -> None:
        self.cfg, self.folder = cfg, folder
        self.state = self._load_state()
        try:
            self.backend = BACKENDS[cfg.tracking](cfg, folder, self.state, self._save_state)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"tracking={cfg.tracking!r} could not start: {type(exc).__name__}: {exc}. "
                "Fix the tracker's settings (docs/outputs.md, 'Tracking') or set tracking='none'"
            ) from exc
        self._save_state()
        self.broken = False

    def _load_state(self) -> dict[str, Any]:
        """This tracker's entry of tracking.json (a new one when it has none)."""
        path = self.folder / STATE_FILE
        try:
            self.file = json.loads(path.read_text())
        except FileNotFoundError:
            self.file = {}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}): the tracked run to go on in is "
                              "unknown; remove the file to start a new tracked run") from None  # fmt: skip
        entry = self.file.get(self.cfg.tracking) if isinstance(self.file, dict) else None
        counts = ("rounds_logged", "task_ends_logged")
        if not isinstance(self.file, dict) or (entry is not None and not (
            isinstance(entry, dict)
            and all(type(entry.get(k)) is int and entry[k] >= 0 for k in counts)
        )):  # fmt: skip
            raise ConfigError(
                f"{path} is not what this run wrote (an object of trackers, each with "
                f"non-negative {' and '.join(counts)}): the tracked run to go on in is unknown; "
                "remove the file to start a new tracked run"
            )
        self.resuming = entry is not None  # an earlier start of this tracker
        return self.file.setdefault(self.cfg.tracking, dict.fromkeys(counts, 0))

    def _save_state(self) -> None:
        from lorm_flwr.server.results import write_json_atomic

        write_json_atomic(self.folder / STATE_FILE, self.file)

    def sync(self, recorder) -> None:
        """Log what ``recorder`` holds beyond what was logged: rounds, task ends, the end.

        Called after each checkpoint, so what is logged is what a resume goes on from."""
        if self.broken:
            return
        try:
            self._sync(recorder)
        except Exception as exc:  # noqa: BLE001 - tracking must never end a run
            self.broken = True
            log.warning("lorm-flwr: tracking=%s failed and is off for the rest of the run "
                        "(results.json has everything): %s: %s",
                        self.cfg.tracking, type(exc).__name__, exc)  # fmt: skip

    def _sync(self, recorder) -> None:
        rounds, task_ends = recorder.rounds, recorder.task_end
        done, ends_done = self.state["rounds_logged"], self.state["task_ends_logged"]
        pending = [(step, 0, round_metrics(row))
                   for step, row in enumerate(rounds[done:], start=done + 1)]  # fmt: skip
        steps = task_end_steps(rounds, task_ends)
        pending += [(steps[i], 1, task_end_metrics(recorder.accuracy_matrix[: i + 1], task_ends[i]))
                    for i in range(ends_done, len(task_ends))]  # fmt: skip
        if pending and self.resuming and self.backend.purges:
            # A killed start may have written past what it noted: the tracker hides every
            # step from the first one this start logs, so all of them are logged again.
            first = min(step for step, _, _ in pending)
            self.backend.purge_from(first)
            pending = [(step, 0, round_metrics(row))
                       for step, row in enumerate(rounds, start=1) if step >= first]  # fmt: skip
            pending += [(steps[i], 1, task_end_metrics(recorder.accuracy_matrix[: i + 1], task_ends[i]))
                        for i in range(len(task_ends)) if steps[i] >= first]  # fmt: skip
        self.resuming = False
        pending.sort(key=lambda item: item[:2])  # by step; a round before its task end
        for step, _, metrics in pending:
            self.backend.log(metrics, step)
        self.state["rounds_logged"] = max(done, len(rounds))
        self.state["task_ends_logged"] = max(ends_done, len(task_ends))
        if recorder.status == "completed" and not self.state.get("final_logged"):
            final = _finite({f"final/{k}": recorder.final.get(k) for k in FINAL_METRICS})
            self.backend.log(final, max(len(rounds), 1))
            self.backend.summary(final)
            self.backend.artifacts(recorder.folder)
            self.state["final_logged"] = True
        self.backend.flush()
        self._save_state()

    def close(self, failed: bool) -> None:
        if self.broken:  # a tracker that failed may hang again: leave it
            return
        try:
            self.backend.close(failed)
        except Exception as exc:  # noqa: BLE001
            log.warning("lorm-flwr: tracking=%s did not close cleanly: %s", self.cfg.tracking, exc)


def _artifact_paths(folder: Path) -> list[Path]:
    """What a run leaves for a tracker to keep: the plot, results.json, the adapter folder
    (strategies with a global model; FedSA's adapters stay with each client)."""
    from lorm_flwr.server.plot import PLOT_FILE
    from lorm_flwr.server.results import RESULTS_FILE

    return [
        p for p in (folder / PLOT_FILE, folder / RESULTS_FILE, folder / "adapter") if p.exists()
    ]


class _Backend:
    """What every tracker does. ``state`` is tracking.json's entry (the run id, what was
    logged); ``save`` writes it, for a backend that must note its id before it opens."""

    purges = False  # whether purge_from hides what was logged from a step on

    def __init__(self, cfg: RunConfig, folder: Path, state: dict[str, Any], save) -> None:
        self.cfg, self.folder = cfg, folder

    def purge_from(self, step: int) -> None:
        """A resumed start logs from ``step`` on: hide what a killed start logged there."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def summary(self, final: dict[str, float]) -> None:
        pass

    def artifacts(self, folder: Path) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


class TensorBoardTracking(_Backend):
    """Event files in ``<run>/tensorboard``: scalars (fp64), the config as text and hparams,
    the plot. The writer opens with the first step of this start, so that a resumed start
    purges what a killed one wrote from that step on."""

    purges = True

    def __init__(self, cfg: RunConfig, folder: Path, state: dict[str, Any], save) -> None:
        super().__init__(cfg, folder, state, save)
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.writer = None
        self.params = not state.get("params_logged")
        state["params_logged"] = True

    def _open(self, purge_step: int | None = None):
        """The writer, opened at ``purge_step``: the first step this start logs. Every start
        opens with one, since TensorBoard takes a log's first restart mark as its start
        and only the later ones as restarts that purge."""
        if self.writer is None:
            self.writer = self._writer_class(
                str(self.folder / "tensorboard"), purge_step=purge_step
            )
            if self.params:
                self._params()
        return self.writer

    def _params(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        config = self.cfg.to_dict()
        table = "\n".join(f"| {k} | {v} |" for k, v in config.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)
        values = {k: v if isinstance(v, int | float | str | bool) else str(v)
                  for k, v in config.items()}  # fmt: skip
        for summary in hparams(values, {"final/final_average_accuracy": float("nan")}):
            self.writer.file_writer.add_summary(summary)

    def purge_from(self, step: int) -> None:
        self._open(purge_step=step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        writer = self._open(purge_step=step)
        for name, value in metrics.items():
            # fp64: a float32 scalar would round byte counts above 2^24
            writer.add_scalar(name, value, step, new_style=True, double_precision=True)

    def artifacts(self, folder: Path) -> None:
        import numpy as np
        from PIL import Image

        from lorm_flwr.server.plot import PLOT_FILE

        if (folder / PLOT_FILE).exists():
            with Image.open(folder / PLOT_FILE) as image:
                pixels = np.asarray(image.convert("RGB"))
            self._open().add_image("accuracy", pixels, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowTracking(_Backend):
    """An MLflow run: params, metrics, and the plot, results.json and adapter as artifacts.

    Each round's (or task end's) metrics go in one batch, so MLflow's own history says
    which steps a killed start logged."""

    def __init__(self, cfg: RunConfig, folder: Path, state: dict[str, Any], save) -> None:
        super().__init__(cfg, folder, state, save)
        from mlflow import MlflowClient

        env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        uri = env_uri or (folder / "mlruns").resolve().as_uri()
        if state.get("tracking_uri") and state["tracking_uri"] != uri:
            raise ConfigError(
                f"tracking=mlflow: this run was tracked at {state['tracking_uri']}, now the "
                f"tracking URI is {uri}: set MLFLOW_TRACKING_URI to the first (or remove "
                f"'mlflow' from {folder / STATE_FILE} to start a new tracked run)"
            )
        if not env_uri:
            # MLflow 3 refuses a new file store unless asked: the store is this run's own.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A tracking server that is down must not hold a round for minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = MlflowClient(uri)
        run_id = state.get("run_id")
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            # The store's own count: a killed start may have logged more than it noted.
            rounds = self.client.get_metric_history(run_id, "round/bytes_up")
            ends = self.client.get_metric_history(run_id, "task_end/task")
            state["rounds_logged"] = max([state["rounds_logged"], *(m.step for m in rounds)])
            state["task_ends_logged"] = max(state["task_ends_logged"], len(ends))
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(name)
            )
            run = self.client.create_run(experiment_id, run_name=folder.name)
            self.run_id = run.info.run_id
            state.update(run_id=self.run_id, tracking_uri=uri)
            save()
            self._params()

    def _params(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in self.cfg.to_dict().items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def artifacts(self, folder: Path) -> None:
        for path in _artifact_paths(folder):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracking(_Backend):
    """A W&B run under ``<run>/wandb``, resumed by its id; ``WANDB_MODE=offline`` honoured.

    Every metric is plotted against ``round`` (logged with it), not W&B's own step, which
    only grows: a task end or a backlog logged after a later round would be dropped."""

    def __init__(self, cfg: RunConfig, folder: Path, state: dict[str, Any], save) -> None:
        super().__init__(cfg, folder, state, save)
        import secrets

        import wandb

        if not state.get("run_id"):  # noted before the run opens: a kill cannot fork it
            state["run_id"] = secrets.token_hex(4)
            save()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            dir=str(folder),
            name=folder.name,
            id=state["run_id"],
            resume="allow",
            config=cfg.to_dict(),
            allow_val_change=True,  # a resume may change resume-from, output-dir, ...
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "round": step}, commit=True)

    def summary(self, final: dict[str, float]) -> None:
        self.run.summary.update(final)

    def artifacts(self, folder: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"{folder.name}-outputs", type="model")
        for path in _artifact_paths(folder):
            # immutable: referenced where they are, not copied to W&B's staging folder
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name, policy="immutable")
            else:
                artifact.add_file(str(path), policy="immutable")
        self.run.log_artifact(artifact)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS: dict[str, type[_Backend]] = {
    "tensorboard": TensorBoardTracking,
    "mlflow": MlflowTracking,
    "wandb": WandbTracking,
}
