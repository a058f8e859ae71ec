"""Deployment mode on loopback: scripts/deploy_local.sh starts one SuperLink and SuperNodes on
127.0.0.1, `flwr run . local-deploy` runs the app there, and the results equal a simulation's.

Why equal, not close: every client computes on one torch thread with seeds derived from the
run seed and its partition id, and the server merges replies in partition order, so the same
arithmetic happens in the same order under both engines. The tolerance (1e-9 on accuracies,
which are ratios of integer counts) only absorbs float formatting; any real difference in
what was trained shows up as a changed count.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.local_federation import BIN, ROOT, load_results
from tests.simulations import SHARED_CLIENTS, SHARED_RUN

pytestmark = pytest.mark.slow

SCRIPTS = ROOT / "scripts"


def _items(cfg: dict) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in cfg.items())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    return env


def _deployed_run(tmp_path: Path, cfg: dict, tls: bool, worker: bool) -> dict:
    state = tmp_path / "deploy"
    certs = tmp_path / "certs"
    env = _env()
    # The node workers' sockets and PID files go to a folder of this test's own.
    sockets = Path(tempfile.mkdtemp(prefix="lfr-dt-", dir="/tmp"))
    env.update(TMPDIR=str(sockets), LORM_FLWR_NODE_WORKER="1" if worker else "0")
    if tls:
        subprocess.run([str(SCRIPTS / "make_certs.sh"), str(certs)], check=True, env=env)
    start = [str(SCRIPTS / "deploy_local.sh"), "start", "2", str(state)] + (
        [str(certs)] if tls else []
    )
    worker_pids: list[int] = []
    try:
        subprocess.run(start, check=True, env=env, timeout=120)
        config = (state / "flwr-home" / "config.toml").read_text()
        assert "127.0.0.1" in config and (("root-certificates" in config) == tls)
        out = tmp_path / "runs"
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "local-deploy", "--stream",
             "--run-config", _items({**cfg, "num-clients": 2, "output-dir": str(out)})],
            env={**env, "FLWR_HOME": str(state / "flwr-home")}, capture_output=True, text=True,
            timeout=900, cwd=tmp_path, check=False,
        )  # fmt: skip
        worker_pids = [int(p.read_text()) for p in sockets.rglob("*.pid")]
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        _, results = load_results(out)
        assert results["status"] == "completed", log[-3000:]
    finally:
        subprocess.run(
            [str(SCRIPTS / "deploy_local.sh"), "stop", str(state)],
            env=env,
            timeout=120,
            check=False,
        )
        outlived = [pid for pid in worker_pids if not _gone(pid)]
        shutil.rmtree(sockets, ignore_errors=True)
    assert not (state / "pids").exists(), "the deployment was not stopped"
    assert outlived == [], "stopping a SuperNode's group stops its node worker as well"
    assert len(worker_pids) == (2 if worker else 0), "one node worker per SuperNode iff asked"
    return results


def _gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait for ``pid`` to end; kill it (and say so) if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return False


def _same(a: dict, b: dict) -> None:
    assert a["tasks"] == b["tasks"] and a["shard_sizes"] == b["shard_sizes"]
    for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"], strict=True):
        for x, y in zip(row_a, row_b, strict=True):
            assert (x is None and y is None) or abs(x - y) <= 1e-9
    for ra, rb in zip(a["rounds"], b["rounds"], strict=True):
        assert ra["replies"] == rb["replies"] == 2
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-6 * max(1.0, abs(rb["train_loss"]))
    assert a["final_average_accuracy"] == pytest.approx(b["final_average_accuracy"], abs=1e-9)


@pytest.mark.parametrize(
    ("strategy", "tls", "worker"), [("lorm", False, False), ("fedsa", True, True)]
)
def test_deployment_matches_simulation(tmp_path, per_strategy, strategy, tls, worker):
    """Against the session's shared simulated run of the same config (2 clients). FedSA's
    messages (with each node's B and head kept in its state) go through the node workers,
    LoRM's each run in a fresh ClientApp process."""
    deployed = _deployed_run(tmp_path, SHARED_RUN[strategy], tls, worker)
    assert deployed["clients"] == SHARED_CLIENTS
    _same(deployed, per_strategy[strategy][1])
