"""A real simulation in which one client sends a malformed reply every round.

The run completes on the other clients, names the bad node in every round's
``rejected``, and leaves a finite global model and checkpoint.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness.local_federation import ROOT, load_results
from lorm_flwr.server.checkpoint import load_checkpoint
from tests.simulations import TINY

pytestmark = pytest.mark.slow


def _faulty_app(tmp: Path) -> Path:
    """This app with its clientapp swapped for tests/faulty_app/faulty_client.py."""
    app = tmp / "faulty-app"
    app.mkdir()
    pyproject = (ROOT / "pyproject.toml").read_text()
    pyproject, n = re.subn(
        r'clientapp = "client_app:app"', 'clientapp = "faulty_client:app"', pyproject
    )
    assert n == 1
    # This copy holds two modules, not the app's files: it bundles whatever it has.
    pyproject, n = re.subn(r"^fab-include = .*\n", "", pyproject, flags=re.MULTILINE)
    assert n == 1
    (app / "pyproject.toml").write_text(pyproject)
    shutil.copy(ROOT / "tests" / "faulty_app" / "faulty_client.py", app / "faulty_client.py")
    shutil.copy(ROOT / "server_app.py", app / "server_app.py")
    shutil.copy(ROOT / "LICENSE", app / "LICENSE")  # the bundle format asks for it
    return app


@pytest.mark.parametrize("strategy", ["fedit", "lorm"])
def test_a_client_sending_malformed_replies_every_round_is_rejected_and_the_run_completes(
    federation, tmp_path, strategy
):
    out = tmp_path / "runs"
    cfg = {**TINY, "strategy": strategy, "rounds-per-task": 3, "output-dir": str(out)}
    proc = federation.run(cfg, num_supernodes=3, app=_faulty_app(tmp_path))
    folder, results = load_results(out)
    assert results["status"] == "completed", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(results["rounds"]) == 6
    for row in results["rounds"]:
        assert row["replies"] == 2 and len(row["rejected"]) == 1, row
    bad_nodes = {re.search(r"node (\d+)", row["rejected"][0]).group(1) for row in results["rounds"]}
    assert len(bad_nodes) == 1  # always the same node, named
    reasons = " ".join(row["rejected"][0] for row in results["rounds"])
    for why in ("NaN or Inf", "records", "its shard has", "not a number", "expected ArrayRecord",
                "its layout says"):  # fmt: skip
        assert why in reasons, reasons
    ckpt = load_checkpoint(folder)
    assert all(torch.isfinite(t).all() for t in ckpt.tensors.values())
    assert ckpt.task == 2 and ckpt.round_in_task == 0  # after the last task
    assert all(
        math.isfinite(row["accuracy"]) and math.isfinite(row["train_loss"])
        for row in results["rounds"]
    )
    if strategy == "lorm":  # the cross-task merge used the two good clients' Grams only
        for end in results["task_end"]:
            grams = end["task-grams"]
            assert grams["replies"] == 2 and len(grams["rejected"]) == 1
            assert f"node {next(iter(bad_nodes))}" in grams["rejected"][0]
            assert "NaN or Inf" in grams["rejected"][0]
