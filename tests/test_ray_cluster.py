"""The simulation on a multi-node Ray cluster, on loopback, without code changes.

A Ray head and one worker node (two raylets, 1 CPU each) are started by the test on
127.0.0.1 and stopped by PID. The simulation SuperLink gets ``RAY_ADDRESS``, so Flower's
``ray.init()`` joins that cluster instead of starting its own; with 1 CPU per client
Flower's actor pool spans both nodes. The run must equal the session's single-machine
run of the same config, and Ray's own actor table must show client actors on both nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.local_federation import processes_mentioning, ray_cluster, simulation_superlink
from tests.simulations import SHARED_CLIENTS, SHARED_RUN, run_app

pytestmark = pytest.mark.slow

# Where Ray placed each of Flower's client actors (its GCS keeps dead actors' records too).
_ACTOR_NODES = """
import json, ray
from ray._private import state
ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
print(json.dumps(sorted({{a["Address"]["NodeID"] for a in state.actors().values()
                          if a["ActorClassName"].endswith("ClientAppActor")}})))
"""


def test_simulation_runs_on_a_two_node_ray_cluster(tmp_path, per_strategy):
    cfg = SHARED_RUN["lorm"]
    with ray_cluster(nodes=2, cpus_per_node=1) as cluster:
        with simulation_superlink(tmp_path / "sim", extra_env=cluster.env) as fed:
            _, results, _ = run_app(fed, tmp_path / "runs", SHARED_CLIENTS, cfg)
        probe = subprocess.run(
            [sys.executable, "-c", _ACTOR_NODES.format(address=cluster.address)],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        pids, temp = cluster.pids, str(cluster.temp_dir)
        assert processes_mentioning(temp)  # the cluster's daemons name its folder
    assert len(nodes) == 2, f"client actors ran on {nodes}, not on both nodes"
    for pid in pids:  # stopped by PID, with everything the cluster started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert processes_mentioning(temp) == []
    single = per_strategy["lorm"][1]
    assert results["tasks"] == single["tasks"]
    assert results["accuracy_matrix"] == single["accuracy_matrix"]
    assert [r["train_loss"] for r in results["rounds"]] == pytest.approx(
        [r["train_loss"] for r in single["rounds"]], rel=1e-6
    )
