"""``python -m lorm_flwr.plan [KEY=VALUE ...]``: the dry run's plan without Flower.

The command users type; the plan itself is :mod:`lorm_flwr.server.plan`.
"""

from __future__ import annotations

from lorm_flwr.server.plan import main

if __name__ == "__main__":
    main()
