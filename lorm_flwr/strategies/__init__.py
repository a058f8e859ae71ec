"""Strategy registry: the run-config ``strategy`` name -> strategy class.

A new strategy is one module plus one line here. Strategy classes are imported
lazily so that ``lorm_flwr.config`` can validate names without importing Flower.
"""

from __future__ import annotations

import importlib

# name -> "module:Class"
STRATEGIES: dict[str, str] = {
    "fedit": "lorm_flwr.strategies.fedit:FedIT",
    "lorm": "lorm_flwr.strategies.lorm:LoRM",
}


def strategy_class(name: str) -> type:
    if name not in STRATEGIES:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    module, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), cls)
