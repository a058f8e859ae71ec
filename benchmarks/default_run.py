"""Where every second of the README's first command goes.

Runs the default job (``flwr run`` with 3 clients, ``client-resources-num-cpus=1``)
against a loopback SuperLink that is already up, as ``flwr run .`` finds it after its
first use, and splits its wall time with the timeline and per-round timings the run
writes into ``results.json``:

- launch: ``flwr run`` invoked until the ServerApp starts (the CLI, packaging the app,
  the SuperLink starting the simulation, Ray, importing the app);
- server set-up: the ServerApp's model and checks, until the hello is sent;
- hello: the clients' actors start, import the client code and answer;
- per round: the clients' training and statistics on the critical path (the slowest
  client of each round), the rest of the exchange (waiting for clients that share a
  core, messages, the server's checks and decoding), the merge, the evaluation and
  the checkpoint;
- task ends: LoRM's statistics exchange, the cross-task merge, evaluation and export;
- finish: results, plot and ``flwr run`` returning.

The goal (issue 27): wall at most 2x the critical path's training and statistics. The
critical path adds each round's longest training and longest statistics pass, which may be
two clients': an upper bound of the slowest client's sum, so "rest of the exchanges" is at
least what it shows. Federated strategies only (joint ones have no hello and no rounds).

    python -m benchmarks.default_run --strategies lorm fedit --out benchmarks/results/default_run

The server's evaluation, results row and checkpoint of a round run while the next
round's clients train; an exchange's seconds exclude that work, which keeps its own rows.

Paired with other code (a checkout, e.g. ``git worktree add /tmp/before <commit>``), the
two apps alternate on one SuperLink, the first strategy only:

    python -m benchmarks.default_run --strategies lorm --against /tmp/before --pairs 4

The floor of any run of this federation, Flower's and Ray's start and finish with the
ServerApp's imports and its plan (``dry-run=true``: nothing is trained, no client runs):

    python -m benchmarks.default_run --floor 3

Below that, what Flower and Ray cost with no app at all: a Flower app with the same
federation whose clients answer empty messages at once (``benchmarks/bare_flower``, no
torch), 10 exchanges, as many as the default run's rounds:

    python -m benchmarks.default_run --bare 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from harness.local_federation import ROOT, load_results, simulation_superlink


def breakdown(results: dict, invoked_at: float, wall: float) -> dict[str, float]:
    """Seconds per phase of one run, from its ``results.json`` (a start without resume)."""
    t = results["handshakes"][-1]["timeline"]
    rounds, ends = results["rounds"], results["task_end"]

    def total(rows: list[dict], key: str) -> float:
        return sum(r.get(key, 0.0) for r in rows)

    critical = total(rounds, "client_train_seconds_max") + total(rounds, "client_grams_seconds_max")
    loop = results["wall_seconds"]  # the ServerApp's rounds and task ends
    start_up = {
        "launch": t["server_started_at"] - invoked_at,
        "server set-up": t["hello_at"] - t["server_started_at"],
        "hello": t["hello_done_at"] - t["hello_at"],
        "before the first round": t["loop_started_at"] - t["hello_done_at"],
    }
    in_loop = {
        "clients' training": total(rounds, "client_train_seconds_max"),
        "clients' statistics": total(rounds, "client_grams_seconds_max"),
        "rest of the exchanges": total(rounds, "exchange_seconds") - critical,
        "merge": total(rounds, "merge_seconds"),
        "evaluation": total(rounds, "evaluate_seconds"),
        "task ends": total(ends, "seconds"),
        "checkpoints": total(rounds, "checkpoint_seconds") + total(ends, "checkpoint_seconds"),
    }
    phases = {**start_up, **in_loop, "rest of the loop": loop - sum(in_loop.values())}
    phases["finish"] = wall - (t["loop_started_at"] - invoked_at) - loop
    phases["wall"] = wall
    phases["critical path"] = critical
    phases["wall / critical path"] = wall / critical if critical else float("nan")
    return phases


def _timed_run(fed, cfg: dict, clients: int, timeout: float, app: Path = ROOT):
    """``flwr run`` of ``app`` (this one by default): (epoch seconds at its start, wall
    seconds); a failed run stops the benchmark with the end of its output."""
    invoked_at, start = time.time(), time.perf_counter()
    proc = fed.run(cfg, num_supernodes=clients, timeout=timeout, app=app)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return invoked_at, wall


def paired(strategy: str, seed: int, clients: int, other: Path, pairs: int) -> None:
    """Walls of ``other``'s app and this one, in turn, and their differences."""
    walls: dict[str, list[float]] = {"other": [], "this": []}
    apps = [("other", other.resolve()), ("this", ROOT)]
    with tempfile.TemporaryDirectory() as tmp, simulation_superlink(Path(tmp)) as fed:
        for i in range(pairs):
            # Each goes first in every other pair: a warm-up, or a drift of this machine,
            # favours neither.
            for name, app in apps if i % 2 == 0 else apps[::-1]:
                out = Path(tmp) / f"{name}-{i}"
                invoked_at, wall = _timed_run(
                    fed, {"strategy": strategy, "seed": seed, "output-dir": str(out)}, clients,
                    1800, app,
                )  # fmt: skip
                _, results = load_results(out)
                phases = breakdown(results, invoked_at, wall)
                walls[name].append(wall)
                print(f"pair {i + 1} {name}: wall {wall:.1f} s, critical path "
                      f"{phases['critical path']:.1f} s, final average accuracy "
                      f"{results['final_average_accuracy']}", flush=True)  # fmt: skip
    diffs = [b - a for a, b in zip(walls["other"], walls["this"])]
    print(
        f"{strategy}, {other} and this app in turn, {pairs} pairs: this minus other "
        f"{sum(diffs) / len(diffs):+.1f} s on average ({min(diffs):+.1f} to {max(diffs):+.1f})"
    )


def bare(runs: int, clients: int) -> None:
    """Walls of the bare Flower app (``benchmarks/bare_flower``), split like :func:`breakdown`."""
    app = Path(__file__).resolve().parent / "bare_flower"
    with tempfile.TemporaryDirectory() as tmp, simulation_superlink(Path(tmp)) as fed:
        for i in range(runs):
            timeline = Path(tmp) / f"timeline-{i}.json"
            invoked_at, wall = _timed_run(
                fed, {"num-clients": clients, "rounds": 10, "timeline": str(timeline)}, clients,
                600, app,
            )  # fmt: skip
            if not timeline.exists():
                raise SystemExit(f"bare run {i + 1}: its ServerApp wrote no {timeline.name}")
            t = json.loads(timeline.read_text())
            ends = t["round_ends"]
            print(
                f"bare run {i + 1}: wall {wall:.1f} s; launch {t['main_started'] - invoked_at:.1f}"
                f", first exchange (actors start) {ends[0] - t['main_started']:.1f}, the other "
                f"{len(ends) - 1} {ends[-1] - ends[0]:.1f}, finish {invoked_at + wall - ends[-1]:.1f}",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=["lorm", "fedit"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    p.add_argument("--against", type=Path, help="another checkout of the app: paired runs")
    p.add_argument("--pairs", type=int, default=3, help="with --against: runs of each")
    p.add_argument("--floor", type=int, metavar="N", help="time N dry runs instead")
    p.add_argument("--bare", type=int, metavar="N", help="time N runs of a no-op Flower app")
    args = p.parse_args()
    if args.clients < 1:
        p.error(f"--clients {args.clients}: at least 1")
    for name in ("floor", "bare"):
        given = getattr(args, name)
        if given is not None and given < 1:
            p.error(f"--{name} {given}: the number of runs must be at least 1")
    if args.floor and args.bare:
        p.error("--floor and --bare: give one")
    if args.against is not None and args.pairs < 1:
        p.error(f"--pairs {args.pairs}: must be at least 1")
    ignored = [
        name for name, given in (
            ("--out", args.out is not None and (args.floor or args.bare or args.against)),
            ("--against", args.against is not None and (args.floor or args.bare)),
            ("--pairs", args.pairs != 3 and args.against is None),
            ("--strategies", args.strategies != ["lorm", "fedit"] and (args.floor or args.bare)),
            ("--seed", args.seed != 0 and (args.floor or args.bare)),
        ) if given
    ]  # fmt: skip
    if ignored:
        p.error(f"{', '.join(ignored)}: not used with the other options given")
    if args.against is not None and len(args.strategies) > 1:
        p.error("--against compares one strategy: give one with --strategies")
    if args.bare:
        bare(args.bare, args.clients)
        return
    if args.floor:
        with tempfile.TemporaryDirectory() as tmp, simulation_superlink(Path(tmp)) as fed:
            for i in range(args.floor):
                _, wall = _timed_run(
                    fed, {"dry-run": True, "output-dir": str(Path(tmp) / "out")}, args.clients, 600
                )
                print(f"dry run {i + 1}: wall {wall:.1f} s", flush=True)
        return
    if any(s.startswith("joint") for s in args.strategies):
        p.error("federated strategies only: joint ones have no hello and no rounds")
    if args.against is not None:
        if not (args.against / "pyproject.toml").is_file():
            p.error(f"--against {args.against}: no pyproject.toml there (not an app checkout)")
        paired(args.strategies[0], args.seed, args.clients, args.against, args.pairs)
        return
    table: dict[str, dict[str, float]] = {}
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, simulation_superlink(Path(tmp)) as fed:
        for strategy in args.strategies:
            out = Path(tmp) / strategy
            invoked_at, wall = _timed_run(
                fed, {"strategy": strategy, "seed": args.seed, "output-dir": str(out)},
                args.clients, 1800,
            )  # fmt: skip
            _, results = load_results(out)
            table[strategy] = breakdown(results, invoked_at, wall)
            accuracy[strategy] = results["final_average_accuracy"]
            print(f"{strategy}: wall {wall:.1f} s, final average accuracy {accuracy[strategy]}")
    phases = list(next(iter(table.values())))
    lines = [
        f"Command: `python -m benchmarks.default_run --strategies {' '.join(args.strategies)}`",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()}, {os.cpu_count()} "
        + f"cores, no GPU; seed {args.seed}, {args.clients} clients.",
        "",
        "| phase, seconds | " + " | ".join(table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for phase in phases:
        cells = [f"{table[s][phase]:.2f}" if "/" in phase else f"{table[s][phase]:.1f}"
                 for s in table]  # fmt: skip
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    lines.append("| final average accuracy | " + " | ".join(f"{accuracy[s]}" for s in table) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(
            json.dumps({"phases": table, "accuracy": accuracy}, indent=1) + "\n"
        )
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
