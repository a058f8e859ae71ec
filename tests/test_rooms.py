"""Rooms with one job: the ClientApp imports no server code, the math no Flower."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return set(out.stdout.split())


def test_the_client_app_imports_no_strategy_or_server_loop():
    # Every handler parses the run config first: that must not pull in server code either.
    loaded = _modules_after_import(
        "client_app, lorm_flwr.client_handlers; from lorm_flwr.config import RunConfig; "
        "RunConfig.from_mapping({})"
    )
    assert "lorm_flwr.client" in loaded  # the import really happened
    server_side = sorted(
        m
        for m in loaded
        if m.startswith(
            ("lorm_flwr.strategies", "lorm_flwr.rounds", "lorm_flwr.exchange", "server_app")
        )
    )
    assert server_side == []


def test_the_client_app_module_itself_imports_nothing_heavy():
    # A deployed message starts a fresh process that imports client_app.py; with a node worker
    # that process only relays the message, so it must not pay for torch, timm or peft.
    loaded = _modules_after_import("client_app")
    heavy = sorted(
        m
        for m in loaded
        if m.split(".")[0] in {"torch", "timm", "peft", "transformers"} or m == "lorm_flwr.client"
    )
    assert heavy == []
    assert "lorm_flwr.client_handlers" not in loaded


def test_the_math_modules_import_no_flower():
    for module in (
        "lorm_flwr.merge",
        "lorm_flwr.cross_task",
        "lorm_flwr.products",
        "lorm_flwr.continual",
    ):
        loaded = _modules_after_import(module)
        assert not any(m == "flwr" or m.startswith("flwr.") for m in loaded), module
