"""Seed-0 reference results of the default LoRM and FedIT runs, to keep refactors honest.

Runs are deterministic: a change that only restructures code must leave every
number here identical (accuracy matrix, every round's train loss and accuracy).

    python -m benchmarks.seed0_reference --out benchmarks/results/seed0_reference.json
    python -m benchmarks.seed0_reference --compare benchmarks/results/seed0_reference.json

``--compare`` runs the same two jobs and exits non-zero on any difference.
Each run takes about 2.5 minutes on 2 CPU cores (3 simulated clients).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from harness.local_federation import load_results, simulation_superlink

STRATEGIES = ("lorm", "fedit")


def measure(strategies=STRATEGIES, clients: int = 3) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, simulation_superlink(Path(tmp)) as fed:
        for s in strategies:
            runs = Path(tmp) / s
            proc = fed.run(
                {"strategy": s, "seed": 0, "output-dir": str(runs)},
                num_supernodes=clients,
                timeout=1800,
            )
            _, r = load_results(runs)
            if r["status"] != "completed":
                sys.exit(f"{s}: run {r['status']}: {r.get('error')}\n{proc.stdout[-2000:]}")
            out[s] = {
                "accuracy_matrix": r["accuracy_matrix"],
                "train_loss": [x["train_loss"] for x in r["rounds"]],
                "round_accuracy": [x["accuracy"] for x in r["rounds"]],
                "final_average_accuracy": r["final_average_accuracy"],
                "bytes_up_total": r["bytes_up_total"],
                "bytes_down_total": r["bytes_down_total"],
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--compare", type=Path)
    args = p.parse_args()
    now = measure()
    if args.out:
        args.out.write_text(json.dumps(now, indent=1) + "\n")
    if args.compare:
        ref = json.loads(args.compare.read_text())
        same = True
        for s in STRATEGIES:
            for key in (
                "accuracy_matrix",
                "train_loss",
                "round_accuracy",
                "final_average_accuracy",
            ):
                equal = ref[s][key] == now[s][key]
                same &= equal
                print(f"{s} {key}: {'identical' if equal else 'DIFFERENT'}")
            print(f"{s} bytes up: {ref[s]['bytes_up_total']:,} -> {now[s]['bytes_up_total']:,}")
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
