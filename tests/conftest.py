"""Shared test set-up: offline hub, one torch thread, Flower message identity."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# Tracked runs stay in their run folders: W&B offline, MLflow's file store in the run.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the tests read the runs' own file stores
# W&B's own folders (staging, cache, settings) for this session only, never the user's.
_wandb_home = tempfile.mkdtemp(prefix="lorm-flwr-test-wandb-")
atexit.register(shutil.rmtree, _wandb_home, True)
for _name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
    os.environ[_name] = os.path.join(_wandb_home, _name.lower())
# The node cache (lorm_flwr.cache.node_cache) of this test session: shared by its processes, never
# the user's ~/.cache, removed at exit.
if "LORM_FLWR_CACHE" not in os.environ:
    os.environ["LORM_FLWR_CACHE"] = tempfile.mkdtemp(prefix="lorm-flwr-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LORM_FLWR_CACHE"], True)

import torch

torch.set_num_threads(1)


# ---------------------------------------------------------------- simulations
# One 2-task run per strategy for the whole session: every test that only reads a run's
# outputs (test_simulation, the resume and deployment references) shares these instead
# of starting its own. Under pytest-xdist (2 workers, pyproject.toml) the workers share
# one folder and split the runs between them (tests.simulations.shared_runs).
import pytest

from tests.simulations import shared_runs


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    from harness.local_federation import simulation_superlink

    with simulation_superlink(tmp_path_factory.mktemp("federation")) as fed:
        yield fed


@pytest.fixture(scope="session")
def per_strategy(request, tmp_path_factory):
    """strategy -> (folder, results, process) of its shared run (``SHARED_RUN``)."""
    workerinput = getattr(request.config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the folder of this session's test run
        run = workerinput["testrunuid"]
        root = tmp_path_factory.getbasetemp().parent / f"shared-runs-{run}"
    else:
        root = tmp_path_factory.mktemp("shared-runs")
    return shared_runs(root, lambda: request.getfixturevalue("federation"))
