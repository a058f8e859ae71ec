"""Compare strategies over seeds on real Flower simulations; Markdown + JSON out.

Each run is the real app (``flwr run`` against a loopback simulation SuperLink
owned by this script), one at a time. Reports final average accuracy, average
forgetting, bytes per round, wall time and the peak memory of all processes of
the run (ServerApp, Ray, clients), as mean +- std with the per-seed values.

    python benchmarks/compare.py --strategies lorm fedit --seeds 0 1 2 3 4 \
        --out benchmarks/results/accuracy
    python benchmarks/compare.py --strategies lorm lorm:merge-anchor=global --seeds 0 1 2

A strategy entry ``name:key=value,key=value`` is a variant with its own overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from harness.local_federation import load_results, simulation_superlink
from lorm_flwr import report


def _parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value, value)
    return out


def _fmt(values: list[float | None], digits: int = 3) -> str:
    values = [v for v in values if v is not None]  # e.g. no forgetting with one task
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_one(fed, cfg: dict, clients: int, runs_dir: Path) -> dict:
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=runs_dir))  # kept: the report reads it
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, fed.process_memory())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    proc = fed.run({**cfg, "output-dir": str(out)}, num_supernodes=clients, timeout=3600)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    folder, res = load_results(out)
    if res["status"] != "completed":
        raise RuntimeError(f"run did not complete: {folder}\n{proc.stdout[-3000:]}")
    rounds = res["rounds"]
    train = sum(r.get("client_train_seconds_max", 0.0) for r in rounds)
    return {
        "folder": str(folder),
        "final_average_accuracy": res["final_average_accuracy"],
        # "global" (one merged model) or "personalised, ..." (each client's own parts)
        "accuracy_kind": res.get("accuracy_kind", "global"),
        "average_incremental_accuracy": res.get("average_incremental_accuracy"),
        "average_forgetting": res["average_forgetting"],
        "accuracy_matrix": res["accuracy_matrix"],
        # with validation-fraction > 0: the same figures on the held-out validation split
        "validation": res.get("validation"),
        "bytes_up_per_round": res["bytes_up_total"] / len(rounds),
        "bytes_down_per_round": res["bytes_down_total"] / len(rounds),
        "wall_seconds": wall,
        "server_loop_seconds": res["wall_seconds"],
        "local_training_seconds": train,
        "client_stats_seconds": sum(
            r.get("client_grams_seconds_max", r.get("client_stats_seconds_max", 0.0))
            for r in rounds
        ),
        "peak_memory_bytes": peak,
    }


def _preset(path: str) -> dict:
    """A preset's keys as run-config values; ``strategy`` comes from each entry and the
    client count from ``--clients``."""
    import tomllib

    keys = tomllib.loads(Path(path).read_text())
    return {k: v for k, v in keys.items() if k not in ("strategy", "num-clients")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategies", nargs="+", default=["lorm", "fedit"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--set", nargs="*", default=[], help="extra run-config key=value pairs")
    p.add_argument(
        "--config",
        default=None,
        help="a preset TOML file (configs/*.toml): its keys, less strategy and num-clients, "
        "under --set and each entry's own keys",
    )
    p.add_argument("--out", default="benchmarks/results/compare")
    p.add_argument(
        "--also-single-task",
        action="store_true",
        help="also run every entry with num-tasks=1 (plain federated learning)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in OUT.json (same entries and seeds) and do only the missing ones",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the Markdown and PNG from the runs already in OUT.json",
    )
    args = p.parse_args()
    if args.report_only:
        args.resume = True
    extra = (
        {**_preset(args.config), **_parse_sets(args.set)} if args.config else _parse_sets(args.set)
    )
    if args.also_single_task:
        args.strategies = args.strategies + [
            f"{s}{',' if ':' in s else ':'}num-tasks=1" for s in args.strategies
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {s: [] for s in args.strategies}
    if args.resume and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["config"] != extra:
            raise SystemExit(
                f"--resume: {out}.json was made with --set {old['config']}, not {extra}"
            )
        for strategy, rs in old["runs"].items():
            if strategy in runs:
                runs[strategy] = [r for r in rs if r["seed"] in args.seeds]
    todo = [(seed, st) for seed in args.seeds for st in args.strategies
            if not any(r["seed"] == seed for r in runs[st])]  # fmt: skip
    if args.report_only:
        runs = {st: rs for st, rs in runs.items() if rs}
        if todo:
            print(f"--report-only: {len(todo)} runs missing, reported as they are")
        todo = []
    with (
        simulation_superlink(Path(tempfile.mkdtemp(prefix="lfr-fed-")))
        if todo
        else _nothing() as fed
    ):
        for seed in args.seeds:  # seeds outermost: strategies alternate in time
            for strategy in args.strategies:
                if (seed, strategy) not in todo:
                    continue  # done in an earlier invocation (--resume)
                name, _, overrides = strategy.partition(":")
                own = _parse_sets([o for o in overrides.split(",") if o])
                cfg = {**extra, **own, "strategy": name, "seed": seed}
                print(f"running {cfg} ...", flush=True)
                r = run_one(fed, cfg, args.clients, out.parent / f"{out.name}-runs")
                r["seed"] = seed
                runs[strategy].append(r)
                print(
                    f"  final average accuracy {_fmt([r['final_average_accuracy']])}, "
                    f"forgetting {_fmt([r['average_forgetting']])}, wall {r['wall_seconds']:.0f} s",
                    flush=True,
                )
                out.with_suffix(".json").write_text(
                    json.dumps({"config": extra, "runs": runs}, indent=2)
                )
    command = (
        f"Command: `python benchmarks/compare.py --strategies {' '.join(args.strategies)} "
        f"--seeds {' '.join(map(str, args.seeds))} --clients {args.clients}"
        + (f" --config {args.config}" if args.config else "")
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + "`"
    )
    folders = [r["folder"] for rs in runs.values() for r in rs if Path(r["folder"]).exists()]
    gone = sum(len(rs) for rs in runs.values()) - len(folders)
    if gone:
        print(
            f"warning: {gone} runs' folders are gone; the accuracy table covers the other {len(folders)}"
        )
    lines = [
        command,
        f"Date: {time.strftime('%Y-%m-%d')}; machine: 2-core CPU, no GPU.",
        "",
        "Accuracy and traffic (`python -m lorm_flwr.report` over the runs' folders). Final average",
        "accuracy is of the global model where the strategy has one, else the sample-weighted mean",
        "over clients of each client's own model on its own test split (personalised).",
        "",
        report.markdown(report.group_runs(report.find_runs(folders)))
        if folders
        else "(no run folders kept)",
        "",
        "Speed and memory:",
        "",
        "| strategy | wall s | outside local training | peak memory MB | per-seed accuracy |",
        "|---|---|---|---|---|",
    ]
    for strategy, rs in runs.items():
        lines.append(
            f"| {strategy} "
            f"| {_fmt([r['wall_seconds'] for r in rs], 0)} "
            f"| {_fmt([1 - r['local_training_seconds'] / r['wall_seconds'] for r in rs], 2)} "
            f"| {_fmt([r['peak_memory_bytes'] / 2**20 for r in rs], 0)} "
            f"| {', '.join(format(r['final_average_accuracy'], '.3f') for r in rs)} |"
        )
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(table + "\n")
    if folders:
        report.plot(report.group_runs(report.find_runs(folders)), out.with_suffix(".png"))
    print(table)


@contextlib.contextmanager
def _nothing():
    yield None


if __name__ == "__main__":
    main()
