"""Client overhead of LoRM: the Gram pass (and products) relative to local training.

In one process, alternately: local training (``local-epochs`` epochs) on one
client's shard of task 0, then LoRM's statistics pass over the same shard (a
no-grad forward with Gram hooks on every adapted layer and the head, plus the
A-round products). Median of each and of the pairwise ratios.

    python benchmarks/client_overhead.py --repeats 5 --threads 1
    python benchmarks/client_overhead.py --set gram-alpha=0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.compare import _parse_sets
from lorm_flwr import protocol as P
from lorm_flwr.client import _grams
from lorm_flwr.config import RunConfig
from lorm_flwr.lorm import lorm_products
from lorm_flwr.models.adapters import HEAD, adapter_layout, get_tensors, head_keys, set_trainable
from lorm_flwr.runtime import data_of, input_spec, model_of, scenario_of
from lorm_flwr.train import pick_device, train_local


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--client", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_mapping({**_parse_sets(args.set), "strategy": "lorm"})
    data = data_of(cfg)
    shard = scenario_of(cfg, args.clients).shards[0][args.client]
    model = model_of(cfg)
    layers = adapter_layout(model)
    weight_key, _ = head_keys(model)
    train_t, stats_t, ratios = [], [], []
    for i in range(args.repeats):
        set_trainable(model, train_a=True, train_b=False)
        t0 = time.perf_counter()
        train_local(
            model, data.train_x[shard], data.train_y[shard], task_classes=[0, 1],
            inputs=input_spec(cfg), epochs=cfg.local_epochs, batch_size=cfg.batch_size,
            lr=cfg.lr, weight_decay=0.0, device=pick_device(cfg.device), seed=i,
        )  # fmt: skip
        t1 = time.perf_counter()
        grams = _grams(cfg, model, data.train_x[shard], with_head=True)
        lorm_products(P.STATS_LORM_A, get_tensors(model), grams, layers, HEAD, weight_key)
        t2 = time.perf_counter()
        train_t.append(t1 - t0)
        stats_t.append(t2 - t1)
        ratios.append((t2 - t1) / (t1 - t0))
    print(
        f"shard of {len(shard)} samples, {cfg.local_epochs} epochs, gram-alpha={cfg.gram_alpha}, "
        f"{args.threads} thread(s): training median {statistics.median(train_t):.2f} s, "
        f"statistics pass median {statistics.median(stats_t):.2f} s, "
        f"overhead median {100 * statistics.median(ratios):.1f}% "
        f"(per repeat: {', '.join(f'{100 * r:.1f}%' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
