"""Where a fresh ClientApp process spends its start-up, with and without the node cache.

On the deployment engine every message starts a new ClientApp process (Flower 1.42's
``flwr-clientapp``). Without a node worker (``LORM_FLWR_NODE_WORKER=0``) that process
runs the handlers itself, so this start-up is paid per message per node; with one, it is
paid once per node, by the worker. Each repeat runs a fresh Python process that does
what the handlers do before they train: import torch, Flower, timm and peft (which
imports transformers), import the app, parse the config, load the data set, draw the
shards, read this client's shard, build the backbone with its adapters, and build the
seeded initial adapter. Rows: ``cold`` with ``LORM_FLWR_CACHE=off`` (every process
rebuilds everything, as before the cache), ``warm`` with a node cache that an earlier
process filled (every later message on the node; the data are memory-mapped, so reading
the shard is where they are read). Medians over the repeats.

    python benchmarks/client_startup.py --repeats 5 --out benchmarks/results/client_startup
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = [
    "import torch",
    "import flwr",
    "import timm",
    "import peft (+transformers)",
    "import the app",
    "config",
    "data set",
    "shards",
    "read the shard",
    "model + adapters",
    "initial adapter",
]


def child(num_clients: int) -> None:
    laps: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        laps[name] = now - t
        t = now

    import numpy as np
    import torch  # noqa: F401

    lap("import torch")
    import flwr.app
    import flwr.clientapp  # noqa: F401

    lap("import flwr")
    import timm  # noqa: F401

    lap("import timm")
    import peft  # noqa: F401

    lap("import peft (+transformers)")
    sys.path.insert(0, str(ROOT))
    import client_app  # noqa: F401
    from lorm_flwr import runtime
    from lorm_flwr.config import RunConfig

    lap("import the app")
    import tomllib

    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    cfg = RunConfig.from_mapping(defaults["config"])
    lap("config")
    runtime.data_of(cfg)
    lap("data set")
    scenario = runtime.scenario_of(cfg, num_clients)
    lap("shards")
    data = runtime.data_of(cfg)
    shard = scenario.shards[0][0]
    np.asarray(data.train_x[shard]).sum(), np.asarray(data.test_x[scenario.test_shards[0][0]]).sum()
    lap("read the shard")
    runtime.model_of(cfg)
    lap("model + adapters")
    runtime.initial_tensors(cfg)
    lap("initial adapter")
    print(json.dumps(laps))


def run_child(cache: str, num_clients: int) -> dict[str, float]:
    env = {**os.environ, "LORM_FLWR_CACHE": cache}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--clients", str(num_clients)],
        env=env, cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    laps = json.loads(out.stdout.strip().splitlines()[-1])
    laps["process total"] = time.perf_counter() - start
    return laps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.child:
        child(args.clients)
        return
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="lfr-cache-") as cache:
        run_child(cache, args.clients)  # fills the cache (as the node's first message does)
        for _ in range(args.repeats):  # alternate, so drift in the machine's load hits both
            rows["cold"].append(run_child("off", args.clients))
            rows["warm"].append(run_child(cache, args.clients))
    median = {
        name: {part: statistics.median(r[part] for r in runs) for part in runs[0]}
        for name, runs in rows.items()
    }
    lines = ["| part | cold (s) | warm cache (s) |", "|---|---|---|"]
    for part in [*PARTS, "process total"]:
        lines.append(f"| {part} | {median['cold'][part]:.2f} | {median['warm'][part]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"repeats": args.repeats, "median": median, "runs": rows}, indent=2)
        )
        Path(args.out).with_suffix(".md").write_text(
            f"Medians of {args.repeats} fresh processes each.\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
