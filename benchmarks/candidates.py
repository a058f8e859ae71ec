"""Which offline scenario separates the strategies best: every strategy on every candidate.

A candidate is the default scenario (5 tasks x 2 classes, 3 clients, 2 rounds a task)
with another backbone, image size or data set, all offline. For each candidate this runs
the seven strategies users compare (joint, joint-incremental, FedIT, FFA-LoRA, FedSA-LoRA,
RegMean, LoRM) through ``benchmarks/compare.py`` (one real ``flwr run`` at a time) and
keeps every run in ``OUT/<candidate>.json``, so an interrupted screen goes on where it
stopped. Then it writes ``OUT/table.md``: final average accuracy per strategy and
candidate, LoRM's lead over the best other federated strategy, and LoRM's wall time.

    python benchmarks/candidates.py --seeds 0 --out benchmarks/results/candidates
    python benchmarks/candidates.py --seeds 0 --out benchmarks/results/candidates --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name -> run-config keys over the default (pyproject.toml). Every data set and weight
# file here ships in a package (docs/configuration.md, "Data sets" and "Backbones").
CANDIDATES: dict[str, dict[str, str]] = {
    "mnist-lite0-32": {},
    "mnist-lite0-64": {"image-size": "64"},
    "mnist-lite1-32": {"backbone": "efficientnet-lite1"},
    "mnist-lite2-32": {"backbone": "efficientnet-lite2"},
    "fashion1k-lite0-32": {"dataset": "fashion-mnist", "max-samples-per-class": "1000"},
    "fashion-lite0-32": {"dataset": "fashion-mnist"},
}

STRATEGIES = ["lorm", "fedit", "ffa", "fedsa", "regmean", "joint-incremental", "joint"]
FEDERATED = ["fedit", "ffa", "fedsa", "regmean"]  # what LoRM must beat


# More seeds of a candidate, run with compare.py outside this screen (same keys).
MORE_SEEDS: dict[str, list[str]] = {
    "mnist-lite0-32": ["benchmarks/results/ten-seeds.json", "benchmarks/results/ten-seeds-b.json"],
}


def _finals(out: Path, name: str) -> dict[str, dict[int, dict]]:
    """strategy -> seed -> run, from ``OUT/<name>.json``, ``OUT/<name>-seeds*.json`` (more
    seeds, run with compare.py) and ``MORE_SEEDS[name]``."""
    paths = [out / f"{name}.json", *sorted(out.glob(f"{name}-seeds*.json"))]
    paths += [Path(p) for p in MORE_SEEDS.get(name, [])]
    finals: dict[str, dict[int, dict]] = {}
    for path in paths:
        if path.exists():
            for s, rs in json.loads(path.read_text())["runs"].items():
                finals.setdefault(s, {}).update({r["seed"]: r for r in rs})
    return finals


def table(out: Path, names: list[str]) -> str:
    lines = [
        "Final average accuracy (test), mean over the seeds run (seeds: those every federated",
        "strategy ran; joint and joint-incremental: seed 0 only); LoRM's lead = LoRM minus the",
        "best other federated strategy (mean of the per-seed differences); wall = each",
        "strategy's `flwr run` wall time, seconds (mean; LoRM's, and the longest of the others).",
        "",
        "| candidate | seeds | " + " | ".join(STRATEGIES) + " | LoRM's lead | wall s, LoRM "
        "| wall s, slowest other |",
        "|---|---|" + "---|" * len(STRATEGIES) + "---|---|---|",
    ]  # fmt: skip
    for name in names:
        runs = _finals(out, name)
        if not runs:
            continue
        # the seeds every federated strategy ran (joint ones may have fewer: their column
        # is the mean over their own seeds)
        seeds = sorted(set.intersection(*(set(runs.get(s, {})) for s in ["lorm", *FEDERATED])))

        def mean(s: str, key: str = "final_average_accuracy", runs=runs, seeds=seeds) -> str:
            paired = s in ("lorm", *FEDERATED)  # over the common seeds
            values = [r[key] for seed, r in runs.get(s, {}).items() if not paired or seed in seeds]
            if not values:
                return "–"
            return f"{statistics.mean(values):{'.3f' if 'accuracy' in key else '.0f'}}"

        leads = [
            runs["lorm"][seed]["final_average_accuracy"]
            - max(runs[s][seed]["final_average_accuracy"] for s in FEDERATED)
            for seed in seeds
        ]
        lead = f"{statistics.mean(leads):+.3f}" if leads else "–"
        others = [statistics.mean(r["wall_seconds"] for r in runs[s].values())
                  for s in STRATEGIES if s != "lorm" and runs.get(s)]  # fmt: skip
        slowest = f"{max(others):.0f}" if others else "–"
        cells = " | ".join(mean(s) for s in STRATEGIES)
        lines.append(
            f"| {name} | {len(seeds)} | {cells} | {lead} | {mean('lorm', 'wall_seconds')} "
            f"| {slowest} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="benchmarks/results/candidates")
    p.add_argument("--table", action="store_true", help="run nothing, write the table")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in args.candidates:
            sets = [f"{k}={v}" for k, v in CANDIDATES[name].items()]
            command = [
                sys.executable, "benchmarks/compare.py", "--resume",
                "--strategies", *args.strategies,
                "--seeds", *map(str, args.seeds),
                "--out", str(out / name),
            ] + (["--set", *sets] if sets else [])  # fmt: skip
            print(f"[{time.strftime('%H:%M:%S')}] candidate {name}", flush=True)
            subprocess.run(command, check=True)
    text = table(out, args.candidates)
    (out / "table.md").write_text(
        f"Command: `python benchmarks/candidates.py "
        f"{'--table' if args.table else '--seeds ' + ' '.join(map(str, args.seeds))}` (the runs: "
        "OUT/<candidate>.json, OUT/<candidate>-seeds*.json and MORE_SEEDS)\n"
        f"Date: {time.strftime('%Y-%m-%d')}; machine: 2-core CPU, no GPU.\n\n{text}\n"
    )
    print(text)


if __name__ == "__main__":
    main()
