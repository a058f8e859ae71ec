"""``python -m lorm_flwr.plan [KEY=VALUE ...]``: the dry run's plan without Flower.

The command users type, and the names this module always had (``Plan``, ``make_plan``);
the plan itself is :mod:`lorm_flwr.server.plan`.
"""

from __future__ import annotations

from lorm_flwr.server.plan import Plan, main, make_plan

__all__ = ["Plan", "main", "make_plan"]

if __name__ == "__main__":
    main()
