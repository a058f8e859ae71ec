"""Wall time and memory per round as the federation grows: 3, 10, 30 and 100 simulated clients.

Each client count is one real ``flwr run`` (a simulation SuperLink of its own, Ray with
``--cpus-per-client`` CPUs per client) of digits + ViT-tiny (16 px), 2 tasks, 2 rounds
per task, LoRM by default. The shards come from Dirichlet(1.0) with at least 2 samples
per client (digits has about 720 training samples per task, 7 per client at 100
clients; the default β=0.5 cannot give 100 clients 6 samples each). While it runs, the
proportional set size (PSS: shared pages counted once) of the SuperLink and everything
under it (the ServerApp, Ray's daemons, the client actors) and of the ServerApp process
alone is sampled every 0.5 s; each sample belongs to the round that was running. Each
client count starts with an empty node cache of its own. Per round: its wall time on the server,
split into the exchange (messages out, clients' work, replies in and checked: minus
the clients' own training and Gram time per actor, what is left is Flower's messaging,
Ray's scheduling and each client's model loading), the merge, the evaluation and, in the first round of task 1, the end of
task 0 (statistics exchange, cross-task merge, evaluation, export).

    python benchmarks/scale.py --clients 3 10 30 100 --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.local_federation import simulation_superlink

SCENARIO = {
    "dataset": "digits",
    "backbone": "vit-tiny",
    "image-size": 16,
    "num-tasks": 2,
    "rounds-per-task": 2,
    "local-epochs": 1,
    "batch-size": 32,
    "lora-rank": 2,
    "lora-alpha": 2.0,
    "dirichlet-beta": 1.0,
    "min-samples-per-client": 2,
    "seed": 0,
}


def _pss(pid: int) -> int:
    """Proportional set size (bytes): shared pages (torch's libraries in every actor, the
    memory-mapped data) count once across processes, not once per process as in RSS."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _serverapp_pids(candidates: list[int]) -> list[int]:
    pids = []
    for pid in candidates:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-simulation" in cmd or b"flwr-serverapp" in cmd:
            pids.append(pid)
    return pids


def _rounds_done(out: Path) -> int:
    for f in out.glob("*/results.json"):
        try:
            return len(json.loads(f.read_text())["rounds"])
        except (OSError, json.JSONDecodeError, KeyError):
            return 0
    return 0


def run(clients: int, strategy: str, cpus_per_client: int, tmp: Path) -> dict:
    samples: list[tuple[int, int, int]] = []  # (rounds done, total pss, serverapp pss)
    # An empty node cache of this count's own: every count pays its data preparation once.
    cache = {"LORM_FLWR_CACHE": str(tmp / f"cache-{clients}")}
    with simulation_superlink(tmp / f"sim-{clients}", extra_env=cache) as fed:
        out = tmp / f"runs-{clients}"
        cfg = {**SCENARIO, "strategy": strategy, "output-dir": str(out)}
        cmd = fed.command(cfg, num_supernodes=clients, cpus_per_client=cpus_per_client)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                done = _rounds_done(out) if out.exists() else 0
                pids = fed._descendants()
                server = sum(_pss(p) for p in _serverapp_pids(pids))
                samples.append((done, sum(_pss(p) for p in pids), server))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        start = time.perf_counter()
        sampler.start()
        try:
            proc = subprocess.run(cmd, env=fed.env, cwd=fed.home, capture_output=True,
                                  text=True, timeout=3600, check=False)  # fmt: skip
        finally:
            stop.set()
            sampler.join()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    folder = next(p for p in out.iterdir() if (p / "results.json").exists())
    results = json.loads((folder / "results.json").read_text())
    if results["status"] != "completed":
        raise RuntimeError(f"{clients} clients: run {results['status']}")
    rows, previous = [], 0.0
    for i, r in enumerate(results["rounds"]):
        in_round = [s for s in samples if s[0] == i]
        task_end = next(
            (t["seconds"] for t in results["task_end"] if r["round_in_task"] == 0 and
             t["task"] == r["task"] - 1), 0.0,
        )  # fmt: skip
        actors = max(1.0, min(clients, _actors(cpus_per_client)))
        rows.append({
            "task": r["task"], "round_in_task": r["round_in_task"],
            "seconds": r["elapsed_seconds"] - previous,
            "exchange_seconds": r["exchange_seconds"],
            "client_train_seconds_per_actor": r["client_train_seconds_sum"] / actors,
            "client_grams_seconds_per_actor": r["client_grams_seconds_sum"] / actors,
            "merge_seconds": r["merge_seconds"], "evaluate_seconds": r["evaluate_seconds"],
            "previous_task_end_seconds": task_end,
            "peak_pss_total_mib": max((s[1] for s in in_round), default=0) / 2**20,
            "peak_pss_serverapp_mib": max((s[2] for s in in_round), default=0) / 2**20,
            "bytes_up": r["bytes_up"], "replies": r["replies"],
        })  # fmt: skip
        previous = r["elapsed_seconds"]
    return {
        "clients": clients,
        "wall_seconds": wall,
        "run_seconds": results["wall_seconds"],
        "final_average_accuracy": results["final_average_accuracy"],
        "peak_pss_total_mib": max(s[1] for s in samples) / 2**20,
        "peak_pss_serverapp_mib": max(s[2] for s in samples) / 2**20,
        "rounds": rows,
    }


def _actors(cpus_per_client: int) -> int:
    # Ray counts the CPUs this process may run on.
    return max(1, len(os.sched_getaffinity(0)) // cpus_per_client)


def table(runs: list[dict]) -> str:
    lines = [
        (
            "| clients | round | round (s) | exchange (s) | clients' training per actor (s) "
            "| clients' Grams per actor (s) | merge (s) | evaluate (s) | end of previous task (s) "
            "| peak PSS, all processes (MiB) | peak PSS, ServerApp (MiB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in runs:
        for r in run_["rounds"]:
            lines.append(
                f"| {run_['clients']} | {r['task']}.{r['round_in_task']} | {r['seconds']:.1f} "
                f"| {r['exchange_seconds']:.1f} | {r['client_train_seconds_per_actor']:.1f} "
                f"| {r['client_grams_seconds_per_actor']:.1f} "
                f"| {r['merge_seconds']:.2f} | {r['evaluate_seconds']:.2f} "
                f"| {r['previous_task_end_seconds']:.1f} | {r['peak_pss_total_mib']:.0f} "
                f"| {r['peak_pss_serverapp_mib']:.0f} |"
            )
    lines += [
        "",
        (
            "| clients | flwr run, whole (s) | server run (s) | start-up and teardown (s) "
            "| final average accuracy |"
        ),
        "|---|---|---|---|---|",
    ]
    for run_ in runs:
        lines.append(f"| {run_['clients']} | {run_['wall_seconds']:.0f} | {run_['run_seconds']:.0f} "
                     f"| {run_['wall_seconds'] - run_['run_seconds']:.0f} "
                     f"| {run_['final_average_accuracy']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="+", type=int, default=[3, 10, 30, 100])
    p.add_argument("--strategy", default="lorm")
    p.add_argument("--cpus-per-client", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="lfr-scale-") as tmp:
        for n in args.clients:
            runs.append(run(n, args.strategy, args.cpus_per_client, Path(tmp)))
            print(f"{n} clients: {runs[-1]['wall_seconds']:.0f} s", flush=True)
            if args.out:  # after each count: an interrupted benchmark keeps what it measured
                Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=2))
    text = table(runs)
    print(text)
    if args.out:
        Path(args.out).with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
