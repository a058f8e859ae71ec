"""The server's strategies, one module each; chosen by name in :mod:`lorm_flwr.registry`."""

from lorm_flwr.registry import STRATEGIES, strategy_class

__all__ = ["STRATEGIES", "strategy_class"]
