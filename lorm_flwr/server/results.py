"""Run outputs: results.json, the accuracy plot, and the peft adapter export."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorm_flwr.config import RunConfig
from lorm_flwr.math.continual import (
    average_forgetting,
    final_average_accuracy,
    reference_forgetting,
)

__all__ = [
    "RoundRow",
    "RunRecorder",
    "check_output_dir",
    "mark_failed",
    "provenance",
    "run_folder",
]

log = logging.getLogger("flwr.lorm")

RESULTS_FILE = "results.json"


def check_output_dir(cfg: RunConfig) -> None:
    """Stop before any work when ``output-dir`` cannot hold a run folder."""
    from lorm_flwr.config import ConfigError

    root = cfg.output_root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".lorm-flwr-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"output-dir={cfg.output_dir!r} cannot hold the run's outputs ({root}: {exc.strerror or exc}); "
            "give a writable folder"
        ) from None


def run_folder(cfg: RunConfig) -> Path:
    """A new, absolute, never-reused folder for this run's outputs."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = cfg.output_root / f"{stamp}-{cfg.strategy}-{cfg.dataset}-seed{cfg.seed}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


PACKAGES = ("lorm-flwr", "flwr", "torch", "peft", "timm", "transformers")


def _checkout() -> Path | None:
    """The source checkout of an editable install (where ``git`` can tell the commit).

    Under ``flwr run`` this package is imported from the app bundle's copy, which is no
    git checkout, so the install's own record (PEP 610 ``direct_url.json``) is read.
    """
    import json as _json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    candidates = [Path(__file__).resolve().parents[2]]
    try:
        url = _json.loads(
            metadata.distribution("lorm-flwr").read_text("direct_url.json") or "{}"
        ).get("url", "")
        if url.startswith("file://"):
            candidates.append(Path(unquote(urlparse(url).path)))
    except (metadata.PackageNotFoundError, ValueError):
        pass
    return next((c for c in candidates if (c / ".git").exists()), None)


def provenance(run_id: int | None) -> dict[str, Any]:
    """What produced a run: package versions, the checkout's commit, Flower's run id."""
    import subprocess
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = None
    checkout = _checkout()
    if checkout is not None:
        try:
            head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
            dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
            commit = head + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {
        "versions": versions,
        "commit": commit,
        "flower_run_ids": [run_id] if run_id is not None else [],
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null (json.dump would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_clean(payload), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_failed(folder: Path, error: str) -> None:
    """``results.json`` in ``folder`` says ``failed`` with ``error``, all else kept as it
    was (a completed run's stays completed: its figures are whole). Used when a resumed
    run fails before its first round, so the earlier results are never rewritten from
    less. A file that is missing or unreadable is left alone."""
    path = folder / RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("lorm-flwr: %s is missing or unreadable; left as it is", path)
        return
    if not isinstance(results, dict) or results.get("status") == "completed":
        return
    results["status"], results["error"] = "failed", error
    write_json_atomic(path, results)


def selected_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """``select-round=best-validation``: among the last task's rounds, the first with the
    best validation accuracy, with its test accuracy, and the last round's for comparison."""
    last_task = rounds[-1]["task"]
    candidates = [(i, r) for i, r in enumerate(rounds) if r["task"] == last_task]
    scored = [
        (i, r) for i, r in candidates if not math.isnan(r.get("validation_accuracy", math.nan))
    ]
    if not scored:
        return {"selected_round": None}
    index, best = max(scored, key=lambda ir: (ir[1]["validation_accuracy"], -ir[0]))
    last = rounds[-1]

    def entry(i: int, r: dict[str, Any]) -> dict[str, Any]:
        return {"round": i + 1, "task": r["task"], "round_in_task": r["round_in_task"],
                "validation_accuracy": r.get("validation_accuracy"), "test_accuracy": r["accuracy"]}  # fmt: skip

    return {"selected_round": entry(index, best), "last_round": entry(len(rounds) - 1, last)}


@dataclass
class RoundRow:
    """One round in results.json: the one schema for every strategy (``joint`` too).

    ``bytes_*``, ``attempts``, ``failures``, ``rejected`` and ``timeouts`` cover
    every exchange of the round (training, and personalised evaluation where it
    runs); ``extra`` holds strategy figures (changes of A/B/head, truncation errors,
    client timings) and is written flat into the row.
    """

    task: int
    round_in_task: int
    train_loss: float = float("nan")
    accuracy: float = float("nan")
    per_task_accuracy: list[float] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0
    attempts: int = 1
    failures: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    held_max: int = 0  # most checked replies held at once, waiting for an earlier node's
    merge_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    personalised: dict[str, Any] | None = None

    @classmethod
    def from_exchange(cls, task: int, round_in_task: int, exchange) -> RoundRow:
        """A row for the round whose training exchange is ``exchange`` (an ExchangeLog)."""
        row = cls(task, round_in_task, replies=exchange.replies, attempts=exchange.attempts)
        row.add(exchange)
        return row

    def add(self, exchange) -> None:
        """Count another exchange of this round (its bytes and what went wrong)."""
        self.bytes_down += exchange.bytes_down
        self.bytes_up += exchange.bytes_up
        self.failures += exchange.failures
        self.rejected += exchange.rejected
        self.timeouts += exchange.timeouts
        self.held_max = max(self.held_max, getattr(exchange, "held_max", 0))

    def to_dict(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in self.__dataclass_fields__
            if k not in ("extra", "personalised")
        }
        out.update(self.extra)
        if self.personalised is not None:
            out["personalised"] = self.personalised
        return out


@dataclass
class RunRecorder:
    """Everything a run reports, written after every round so nothing is lost on failure."""

    cfg: RunConfig
    folder: Path
    tasks: list[list[int]]
    shard_sizes: list[list[int]]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)
    task_end: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    accuracy_kind: str = "global"
    error: str = ""
    failed_round: dict[str, Any] = field(default_factory=dict)  # the round that stopped the run
    message_bytes: dict[str, int] = field(default_factory=dict)  # per client, by message
    resumed: list[dict[str, Any]] = field(default_factory=list)  # one entry per resume
    # The hello exchange of each start; versions, commit and Flower run ids.
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    # Generation: the untrained model's exact match and held-out loss (before round 1).
    untrained: dict[str, Any] = field(default_factory=dict)
    # tracking != none: the tracker fed from these records, set by
    # lorm_flwr.server.tracking.start_tracking (which imports this module, not the reverse)
    tracking: Any = None

    _STATE = (
        "rounds",
        "accuracy_matrix",
        "task_end",
        "accuracy_kind",
        "resumed",
        "handshakes",
        "provenance",
        "untrained",
    )

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the results so far."""
        return {k: getattr(self, k) for k in self._STATE}

    def load_state(self, state: dict[str, Any]) -> None:
        for k in self._STATE:
            if k in state:  # a checkpoint of format 1 has no handshakes
                setattr(self, k, state[k])

    def track(self) -> None:
        """Log what is recorded and not yet logged. The federated run calls this after each
        checkpoint, so a tracker never holds a round that a resume will redo."""
        if self.tracking is not None:
            self.tracking.sync(self)

    def stop_tracking(self, failed: bool) -> None:
        if self.tracking is not None:
            self.tracking.close(failed)
            self.tracking = None

    def add_round(self, row: RoundRow) -> None:
        self.rounds.append(row.to_dict())
        self.write()

    def end_task(self, task: int, per_task: list[float], summary: dict[str, Any]) -> None:
        """Record row ``a[task][k]`` of the accuracy matrix (None for unseen tasks)."""
        row: list[float | None] = [None] * len(self.tasks)
        row[: len(per_task)] = per_task
        self.accuracy_matrix.append(row)
        self.task_end.append({"task": task, **summary})
        self.write()

    def payload(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "config": self.cfg.to_dict(),
            "tasks": self.tasks,
            "clients": len(self.shard_sizes[0]) if self.shard_sizes else 0,
            "shard_sizes": self.shard_sizes,
            "rounds": self.rounds,
            "accuracy_kind": self.accuracy_kind,
            "accuracy_matrix": self.accuracy_matrix,
            "task_end": self.task_end,
            "message_bytes_per_client": self.message_bytes,
            "resumed": self.resumed,
            "handshakes": self.handshakes,
            "provenance": self.provenance,
            **({"error": self.error} if self.error else {}),
            **({"failed_round": self.failed_round} if self.failed_round else {}),
            **{f"untrained_{k}": v for k, v in self.untrained.items()},
            **self.final,
        }

    def exchanges(self) -> list[dict[str, Any]]:
        """Every exchange's bytes: rounds, task ends (LoRM's statistics) and handshakes."""
        task_end = [
            v
            for entry in self.task_end
            for v in entry.values()
            if isinstance(v, dict) and "bytes_up" in v
        ]
        return self.rounds + task_end + self.handshakes

    def finish(self, start: float) -> None:
        """The run's summary metrics; status ``completed``; results and plot written."""
        last = self.task_end[-1]
        self.final = {
            "final_average_accuracy": final_average_accuracy(last["correct"], last["total"]),
            # The mean over tasks of the accuracy on all classes seen after each task.
            "average_incremental_accuracy": sum(t["accuracy"] for t in self.task_end)
            / len(self.task_end),
            "average_forgetting": average_forgetting(self.accuracy_matrix),
            "reference_forgetting": reference_forgetting(self.accuracy_matrix),
            "forgetting_definition": "mean over k<T-1 of max_{t<T-1} a[t][k] - a[T-1][k]",
            "bytes_down_total": sum(e["bytes_down"] for e in self.exchanges()),
            "bytes_up_total": sum(e["bytes_up"] for e in self.exchanges()),
            "wall_seconds": time.perf_counter() - start,
        }
        if all("validation" in t for t in self.task_end):
            self.final["validation"] = self.validation_summary()
        if self.cfg.select_round == "best-validation":
            self.final.update(selected_round(self.rounds))
        if self.cfg.generation:  # the accuracy of a generation run is its exact match
            self.final["final_exact_match"] = self.final["final_average_accuracy"]
        self.status = "completed"
        self.write()
        self.plot()
        self.track()  # after the plot: it is one of the tracked artifacts
        self.stop_tracking(failed=False)
        log.info(
            "lorm-flwr: done. final average accuracy %.3f, average forgetting %.3f",
            self.final["final_average_accuracy"], self.final["average_forgetting"],
        )  # fmt: skip
        log.info("lorm-flwr: results in %s", self.folder)

    def validation_summary(self) -> dict[str, Any]:
        """The same figures on the validation split (``validation-fraction`` > 0)."""
        matrix = []
        for entry in self.task_end:
            row: list[float | None] = [None] * len(self.tasks)
            per_task = entry["validation"]["per_task"]
            row[: len(per_task)] = per_task
            matrix.append(row)
        last = self.task_end[-1]["validation"]
        return {
            "accuracy_matrix": matrix,
            "final_average_accuracy": final_average_accuracy(last["correct"], last["total"]),
            "average_incremental_accuracy": sum(t["validation"]["accuracy"] for t in self.task_end)
            / len(self.task_end),
            "average_forgetting": average_forgetting(matrix),
        }

    def write(self) -> None:
        write_json_atomic(self.folder / RESULTS_FILE, self.payload())

    def plot(self) -> Path:
        """``accuracy.png`` in the run folder (:func:`lorm_flwr.server.plot.plot_accuracy`)."""
        from lorm_flwr.server.plot import plot_accuracy

        return plot_accuracy(self)
