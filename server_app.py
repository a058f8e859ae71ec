"""Flower ServerApp: parses the run config once and hands over to the run.

Thin: the federated run is :mod:`lorm_flwr.server.run`, every message goes through
:mod:`lorm_flwr.server.exchange` and :mod:`lorm_flwr.wire`, the merges live in the
strategies and the math in :mod:`lorm_flwr.math.merge` and :mod:`lorm_flwr.math.cross_task`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from lorm_flwr.config import RunConfig

# Only light imports here: Flower loads this module in its ServerApp thread while its
# main thread starts Ray, and torch, peft and transformers (4 s here) imported at load
# time made the start-up until the hello's answers about 2 s longer (measured,
# benchmarks/default_run.py); they are imported when ``main`` runs.
log = logging.getLogger("flwr.lorm")
app = ServerApp()


def _dry_run(grid: Grid, cfg: RunConfig) -> None:
    """Print the plan (tasks, shards, message sizes) and stop; nothing is trained."""
    from lorm_flwr.server.hello import wait_for_nodes
    from lorm_flwr.server.joint import JOINT_STRATEGIES
    from lorm_flwr.server.plan import make_plan

    if cfg.strategy in JOINT_STRATEGIES:
        plan = make_plan(cfg, 1)
    else:  # the experiment's client count; without one, the nodes connected
        connected = len(wait_for_nodes(grid, cfg.min_clients))
        plan = make_plan(cfg, cfg.num_clients or connected)
        if cfg.num_clients and connected != cfg.num_clients:
            plan.problems.append(
                f"num-clients={cfg.num_clients}, but {connected} SuperNodes are connected "
                f'(simulation: --federation-config "num-supernodes={cfg.num_clients}")'
            )
    for line in plan.lines():
        log.info("lorm-flwr: %s", line)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)  # bad values stop here
    from lorm_flwr.runtime import keep_client_heap_warm, keep_server_heap_flat  # (see above)
    from lorm_flwr.server.joint import JOINT_STRATEGIES, main_joint
    from lorm_flwr.server.run import run_federated

    if cfg.strategy in JOINT_STRATEGIES and not cfg.dry_run:
        keep_client_heap_warm()  # it trains here, as a client would, and decodes no replies
        main_joint(cfg, context.run_id)
        return
    keep_server_heap_flat()
    if cfg.dry_run:
        _dry_run(grid, cfg)
    else:
        run_federated(grid, cfg, context.run_id)
