"""A run killed mid-task (SIGKILL of every process) resumes from its checkpoint to the
results of an uninterrupted run; a round that cannot gather enough replies is retried,
then stops the run as failed, keeping the results and the checkpoint."""

from __future__ import annotations

import json
import pickle
import subprocess
import time

import pytest

from harness.local_federation import simulation_superlink
from lorm_flwr.server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from tests.simulations import SHARED_CLIENTS, SHARED_RUN

pytestmark = pytest.mark.slow

# The session's shared LoRM run is the uninterrupted reference: two rounds per task, so
# a kill can land inside a task with one round merged.
CFG = SHARED_RUN["lorm"]
CLIENTS = SHARED_CLIENTS
assert CFG["rounds-per-task"] == 2


def _wait_for_checkpoint(out, proc, predicate, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob(f"*/{CHECKPOINT_FILE}"):
            try:
                ckpt = load_checkpoint(path)
            except (
                OSError,
                EOFError,
                RuntimeError,
                ValueError,
                pickle.UnpicklingError,
            ):  # not there yet
                continue
            if predicate(ckpt):
                return path.parent, ckpt
        if proc.poll() is not None and not list(out.glob(f"*/{CHECKPOINT_FILE}")):
            raise AssertionError(f"flwr run ended without a checkpoint: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint reached the awaited point in time")


def test_a_killed_run_resumes_to_the_uninterrupted_results(tmp_path, per_strategy):
    _, reference, _ = per_strategy["lorm"]
    assert reference["status"] == "completed"

    # 1. Killed mid-task: after the first round of task 1, before its second round ends.
    out = tmp_path / "runs"
    with simulation_superlink(tmp_path / "killed") as fed:
        cmd = fed.command({**CFG, "output-dir": str(out)}, num_supernodes=CLIENTS)
        runner = subprocess.Popen(cmd, env=fed.env, cwd=fed.home, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            folder, ckpt = _wait_for_checkpoint(
                out, runner, lambda c: c.task == 1 and c.round_in_task >= 1
            )
            assert fed.kill() > 0
        finally:
            runner.kill()
            runner.wait()
    partial = json.loads((folder / "results.json").read_text())
    assert partial["status"] == "running"  # killed: nobody wrote an end
    assert ckpt.task == 1 and len(partial["accuracy_matrix"]) == 1

    # 2. Resumed with a round timeout no client can meet: the round is sent
    # round-retries + 1 times, then the run fails, keeping results and checkpoint.
    # (1 ms: the server pulls once right after sending and gives up; no reply can travel
    # the SuperLink and a Ray actor that fast. With the node cache a warm client now
    # answers a tiny round within the 0.5 s this used to be.)
    before = (folder / CHECKPOINT_FILE).read_bytes()
    with simulation_superlink(tmp_path / "resumes") as fed:
        proc = fed.run(
            {**CFG, "output-dir": str(out), "resume-from": str(folder),
             "round-timeout": 0.001, "round-retries": 1},
            num_supernodes=CLIENTS,
        )  # fmt: skip
        statuses = [r["status"] for r in fed.run_status()]
        failed = json.loads((folder / "results.json").read_text())
        assert failed["status"] == "failed", proc.stdout[-3000:]
        assert "gave up after 2 attempts" in failed["error"]
        assert failed["failed_round"]["attempts"] == 2
        assert len(failed["failed_round"]["timeouts"]) == 2 * CLIENTS
        assert failed["accuracy_matrix"] == partial["accuracy_matrix"]  # nothing lost
        assert (folder / CHECKPOINT_FILE).read_bytes() == before  # the last good state
        assert statuses == ["finished:failed"], statuses  # the ServerApp exited non-zero

        # 3. Resumed for real (same SuperLink): the same results as the uninterrupted run.
        proc = fed.run(
            {**CFG, "output-dir": str(out), "resume-from": str(folder)}, num_supernodes=CLIENTS
        )
        assert proc.returncode == 0, proc.stdout[-3000:]
    resumed = json.loads((folder / "results.json").read_text())
    assert resumed["status"] == "completed", proc.stdout[-3000:]
    # The failed resume finished no round, so its checkpoint (and history) was the old one.
    assert [(r["task"], r["round_in_task"]) for r in resumed["resumed"]] == [
        (ckpt.task, ckpt.round_in_task)
    ]
    # Exact: a LoRM client holds no state between rounds, every client's training
    # seed comes from the server's config, and the server restored its sums, its
    # tensors and its RNGs bit for bit, so every float is computed the same way.
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert [r["train_loss"] for r in resumed["rounds"]] == [
        r["train_loss"] for r in reference["rounds"]
    ]
    assert resumed["final_average_accuracy"] == reference["final_average_accuracy"]

    # Tracking (CFG tracks to MLflow): the three starts went on in one MLflow run, which
    # holds every round and task end once, as the results do.
    import mlflow

    assert CFG["tracking"] == "mlflow"
    client = mlflow.MlflowClient((folder / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lorm-flwr"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "round/accuracy")
    )
    assert history == [
        (i + 1, pytest.approx(r["accuracy"])) for i, r in enumerate(resumed["rounds"])
    ]
    ends = client.get_metric_history(run.info.run_id, "task_end/accuracy")
    assert sorted(m.value for m in ends) == pytest.approx(
        sorted(t["accuracy"] for t in resumed["task_end"])
    )
