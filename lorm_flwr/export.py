"""Deprecated: moved to :mod:`lorm_flwr.models.export` (with the rest of the peft adapter
code). Importing from here still works and warns; it will go in a later release."""

from __future__ import annotations

import warnings

from lorm_flwr.models.export import *
from lorm_flwr.models.export import __all__  # noqa: F401

warnings.warn(
    "lorm_flwr.export is deprecated: import from lorm_flwr.models.export "
    "(e.g. from lorm_flwr.models.export import load_classifier)",
    DeprecationWarning,
    stacklevel=2,
)
