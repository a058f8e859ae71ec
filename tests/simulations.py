"""The integration tests' shared simulation settings and runner."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

TINY = {
    "dataset": "digits",
    "backbone": "vit-tiny",
    "num-tasks": 2,
    "rounds-per-task": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "image-size": 16,
    "lora-rank": 2,
    "lora-alpha": 2.0,
    "seed": 1,
}
ALL_STRATEGIES = [
    "fedit", "lorm", "fedsa", "fedsa-rslora", "fedsa-vera", "ffa", "regmean", "joint", "joint-incremental",
]  # fmt: skip
# The session's one run per strategy: LoRM runs 2 rounds per task (a B-round and an
# A-round), the others 1. Three of them track (read back in test_simulation; LoRM's
# MLflow run also in test_resume, killed and resumed).
TRACKED = {"lorm": "mlflow", "fedit": "tensorboard", "joint-incremental": "wandb"}
# FedSA-VeRA's shared run also runs the FedSA reference's schedule keys (test_fidelity).
FEDSA_REFERENCE_STEPS = {"local-steps": 3, "lora-dropout": 0.05, "warmup-steps": 2,
                         "fedsa-weighted": False, "lr-a": 0.003}  # fmt: skip
SHARED_RUN = {
    s: {
        **TINY, "strategy": s, **({"rounds-per-task": 2} if s == "lorm" else {}),
        **({"tracking": TRACKED[s]} if s in TRACKED else {}),
        **(FEDSA_REFERENCE_STEPS if s == "fedsa-vera" else {}),
    }
    for s in ALL_STRATEGIES
}  # fmt: skip
SHARED_CLIENTS = 2


def run_app(federation, out, num_clients, cfg, **kwargs):
    """``flwr run`` of ``cfg`` to the end; returns (run folder, results, process)."""
    from harness.local_federation import load_results

    proc = federation.run({**cfg, "output-dir": str(out)}, num_supernodes=num_clients, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists(), proc.stdout[-5000:] + proc.stderr[-3000:]
    folder, results = load_results(out)
    assert results["status"] == "completed", proc.stdout[-3000:]
    return folder, results, proc


@contextlib.contextmanager
def _lock(path: Path, wait: bool):
    """An exclusive ``flock`` on ``path``: yields whether it is held (``wait=False``
    gives up at once when another process holds it). The kernel drops it when the
    holder dies, so a crashed worker never blocks the others."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared_runs(root: Path, federation) -> dict:
    """strategy -> (folder, results, process) of every ``SHARED_RUN``, each built once
    under ``root`` however many processes ask (pytest-xdist workers share ``root``).

    A process builds each run no other is building (one lock per strategy), then waits
    for the rest, so two workers split the runs between them. ``federation()`` gives the
    asker's SuperLink, started only if it builds something. A build that fails leaves
    ``failed.txt``, and every other asker fails at once with its message; a worker
    killed mid-build leaves neither file, and the next asker builds the run afresh.
    """
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    for wait in (False, True):  # first build what is free, then wait for the others
        for strategy in [s for s in ALL_STRATEGIES if s not in out]:
            with _lock(root / f"{strategy}.lock", wait) as held:
                if not held:
                    continue
                runs, record = root / strategy / "runs", root / strategy / "process.json"
                failed = root / strategy / "failed.txt"
                if failed.exists():
                    raise RuntimeError(f"shared {strategy} run failed: {failed.read_text()}")
                if not record.exists():
                    shutil.rmtree(runs, ignore_errors=True)  # a killed build's leftovers
                    try:
                        _, _, proc = run_app(
                            federation(), runs, SHARED_CLIENTS, SHARED_RUN[strategy]
                        )
                    except BaseException as exc:
                        failed.parent.mkdir(parents=True, exist_ok=True)
                        failed.write_text(f"{type(exc).__name__}: {exc}"[-5000:])
                        raise
                    fields = {
                        k: getattr(proc, k) for k in ("args", "returncode", "stdout", "stderr")
                    }
                    record.with_suffix(".tmp").write_text(json.dumps(fields))
                    os.replace(record.with_suffix(".tmp"), record)
                from harness.local_federation import load_results

                folder, results = load_results(runs)
                out[strategy] = (
                    folder,
                    results,
                    subprocess.CompletedProcess(**json.loads(record.read_text())),
                )
    return out
