"""Price of the server's PSD check (one Cholesky per Gram) on one client's reply.

For each message kind of the default run (EfficientNet-Lite0, LoRA r=4) it builds a
valid reply of that kind and times ``wire.decode_reply`` with and without the Gram
checks, so the figure is the checks' own share of decoding a reply.

    python -m benchmarks.gram_check [--repeats 5] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.compare import _parse_sets
from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import model_of
from tests.messages import reply_to


def _valid_grams(shapes: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in shapes.items():
        if key.rsplit("|", 1)[-1] in wire.SYMMETRIC_PARTS and len(shape) == 2:
            x = torch.randn(shape[0], 213, generator=gen)  # 213 samples: a default shard
            out[key] = x @ x.T
        elif key.rsplit("|", 1)[-1] in wire.SYMMETRIC_PARTS:
            out[key] = torch.rand(shape, generator=gen)
        else:
            out[key] = torch.randn(shape, generator=gen)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping({"strategy": "lorm", **_parse_sets(args.set)})
    strategy = strategy_class(cfg.strategy)(cfg, model_layout(model_of(cfg)))
    plans = {"B-round": strategy.instructions(0), "A-round": strategy.instructions(1)}
    plans["end of task"] = wire.Instructions(task=0, grams=strategy.task_grams)
    gen = torch.Generator().manual_seed(0)
    for name, plan in plans.items():
        spec = strategy.reply_spec(plan)
        arrays = {k: torch.randn(s, generator=gen) for k, s in (spec.arrays or {}).items()}
        grams = _valid_grams(dict(spec.grams or {}), gen)
        metrics = {k: 1 for k in spec.metrics}
        msg = reply_to(1, wire.reply_content(spec, arrays, grams, metrics))
        decoded = wire.decode_reply(msg, spec)
        symmetric = {
            k: t for k, t in decoded.grams.items() if k.rsplit("|", 1)[-1] in wire.SYMMETRIC_PARTS
        }
        decode_s, check_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            wire.decode_reply(msg, spec)  # the whole decode, checks included
            decode_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for key, gram in symmetric.items():
                wire.check_gram(1, key, gram)
            check_s.append(time.perf_counter() - t0)
        full = [t.shape[0] for t in symmetric.values() if t.dim() == 2]
        print(
            f"{name}: {len(full)} full Grams (largest {max(full, default=0)}); decoding one client's "
            f"reply {statistics.median(decode_s) * 1e3:.1f} ms, of which the PSD checks "
            f"{statistics.median(check_s) * 1e3:.1f} ms (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
