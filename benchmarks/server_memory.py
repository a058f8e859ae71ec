"""Server peak memory while merging one round, for 10 to 300 clients.

The real strategy (default ``lorm``) merges an A-round, the round with the largest
replies (every adapted layer's full Gram), through the real round path
(``lorm_flwr.server.rounds.train_exchange``: push, pull a window of replies in partition
order, check, fold into fp64 sums, merge) on a stand-in Grid that plays the
SuperLink: it builds each client's valid reply of the real shapes of a small
backbone (ViT-tiny at 16 px) only when the server pulls it, as a SuperLink holds
replies until they are pulled. Each client count runs in a fresh process; the
figure is that process's peak resident memory (``ru_maxrss``) minus its resident
memory before the round, next to the bytes of all the replies.

    python benchmarks/server_memory.py --clients 10 50 100 300 --out benchmarks/results/server_memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(clients: int, strategy_name: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from flwr.app import Message
    from flwr.supercore.task_identity import TaskIdentity

    from lorm_flwr import wire
    from lorm_flwr.config import RunConfig
    from lorm_flwr.models.adapters import model_layout
    from lorm_flwr.registry import strategy_class
    from lorm_flwr.runtime import initial_tensors, keep_server_heap_flat, model_of
    from lorm_flwr.server.rounds import train_exchange
    from lorm_flwr.wire.packing import pack_content

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        1,
        0,
        1,
    )  # Messages outside a run
    torch.set_num_threads(1)
    if not os.environ.get("LORM_DEFAULT_MALLOC"):  # the ServerApp does this at start
        keep_server_heap_flat()
    cfg = RunConfig(strategy=strategy_name, dataset="digits", backbone="vit-tiny", image_size=16,
                    lora_rank=4, min_clients=clients)  # fmt: skip
    strategy = strategy_class(strategy_name)(cfg, model_layout(model_of(cfg)))
    spec = strategy.reply_spec(strategy.instructions(1))  # LoRM: an A-round, full Grams
    reply_shapes, stat_shapes = spec.arrays or {}, spec.grams or {}
    start_tensors = initial_tensors(cfg)

    def fake_reply(request: Message, seed: int) -> Message:
        gen = torch.Generator().manual_seed(seed)
        arrays = {k: torch.randn(s, generator=gen) for k, s in reply_shapes.items()}
        stats = {}
        for k, s in stat_shapes.items():
            if k.endswith(("|" + wire.G, "|" + wire.AGA)):
                side = getattr(s, "side", None)  # a full Gram, sent as its upper triangle
                if side is None:
                    stats[k] = torch.rand(s, generator=gen) + 0.1
                else:
                    x = torch.randn(side, 2 * side, generator=gen)
                    stats[k] = x @ x.T
            else:
                stats[k] = torch.randn(s, generator=gen)
        metrics = {
            wire.NUM_EXAMPLES: 100,
            wire.TRAIN_LOSS: 0.5,
            wire.TRAIN_SECONDS: 1.0,
            wire.GRAMS_SECONDS: 0.1,
        }
        content = wire.reply_content(spec, arrays, stats, metrics)
        return Message(pack_content(content), reply_to=request)  # as a client sends it

    class Grid:
        """The SuperLink's side: a reply exists only once the server pulls it."""

        def __init__(self) -> None:
            self.requests: dict[str, Message] = {}

        def get_node_ids(self):
            return list(range(1, clients + 1))

        def push_messages(self, messages):
            ids = []
            for m in messages:
                ids.append(f"m{m.metadata.dst_node_id}")
                self.requests[ids[-1]] = m
            return ids

        def pull_messages(self, message_ids):
            out = []
            for i in message_ids:
                request = self.requests.pop(i, None)
                if request is not None:
                    reply = fake_reply(request, request.metadata.dst_node_id)
                    reply.metadata.__dict__["_reply_to_message_id"] = i
                    out.append(reply)
            return out

    tensors = strategy.begin_task(0, dict(start_tensors))
    before = _rss_now()
    _, _, entry, merge_seconds = train_exchange(
        Grid(), strategy, tensors, 1
    )  # round 1: the A-round
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "clients": clients,
        "strategy": strategy_name,
        "replies_merged": entry.replies,
        "reply_bytes_total": entry.bytes_up,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,  # ru_maxrss never decreases: the peak of the whole process
        "peak_increase_bytes": peak - before,
        "held_max": entry.held_max,
        "merge_seconds": merge_seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100, 300])
    p.add_argument("--strategy", default="lorm")
    p.add_argument("--out", default="")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.strategy)))
        return
    rows = []
    for n in args.clients:
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--strategy", args.strategy],
                             capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{n:4d} clients: replies {r['reply_bytes_total'] / 2**20:8.1f} MiB, peak RSS "
              f"{r['peak_rss_bytes'] / 2**20:8.1f} MiB (+{r['peak_increase_bytes'] / 2**20:.1f} MiB "
              f"while merging), merge {r['merge_seconds']:.2f} s", flush=True)  # fmt: skip
    base = rows[0]
    lines = [
        "| clients | replies (MiB) | peak RSS (MiB) | increase during the round (MiB) | increase / replies | replies held at most | merge (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['reply_bytes_total'] / 2**20:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['peak_increase_bytes'] / 2**20:.1f} | {r['peak_increase_bytes'] / r['reply_bytes_total']:.2f} | "
            f"{r['held_max']} | {r['merge_seconds']:.2f} |"
        )
    print("\n".join(lines))
    if len(rows) > 1:
        last = rows[-1]
        growth = (last["peak_increase_bytes"] / base["peak_increase_bytes"]) / (
            last["clients"] / base["clients"]
        )
        print(
            f"increase grows {growth:.2f}x as fast as the client count from {base['clients']} to {last['clients']}"
        )
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
