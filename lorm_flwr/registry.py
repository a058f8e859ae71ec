"""Strategy registry: the run-config ``strategy`` name -> strategy class.

A new strategy is one module under ``lorm_flwr/server/strategies/`` plus one line here.
This module sits outside that package and imports the classes lazily, so that
``lorm_flwr.config`` (which every ClientApp handler runs) validates names without
importing any server code.
"""

from __future__ import annotations

import importlib

# name -> "module:Class"
STRATEGIES: dict[str, str] = {
    "fedit": "lorm_flwr.server.strategies.fedit:FedIT",
    "lorm": "lorm_flwr.server.strategies.lorm:LoRM",
    "fedsa": "lorm_flwr.server.strategies.fedsa:FedSA",
    "fedsa-rslora": "lorm_flwr.server.strategies.fedsa:FedSA",
    "fedsa-vera": "lorm_flwr.server.strategies.fedsa:FedSA",
    "ffa": "lorm_flwr.server.strategies.ffa:FFA",
    "regmean": "lorm_flwr.server.strategies.regmean:RegMean",
    # Not federated: run by lorm_flwr.server.joint in the ServerApp process. FedIT's
    # layout-only use of the class keeps the registry uniform.
    "joint": "lorm_flwr.server.strategies.fedit:FedIT",
    "joint-incremental": "lorm_flwr.server.strategies.fedit:FedIT",
}


__all__ = ["STRATEGIES", "strategy_class"]


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
