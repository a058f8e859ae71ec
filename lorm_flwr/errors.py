"""The app's one error for bad input, in a module of its own.

Every room raises it (the config's checks, data sets, backbones, adapters) and the
config re-exports it (``lorm_flwr.config.ConfigError``); here it imports nothing, so
no room depends on the config's imports to raise it.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A run-config value is invalid. The message names the key, the value and what is allowed."""
