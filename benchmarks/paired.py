"""Paired comparison of two strategies over seeds, from ``benchmarks/compare.py``'s JSON.

Runs are paired by seed (same data split and initialisation). Reports each seed's
difference of final average accuracy, their mean, standard deviation, a 95% confidence
interval (Student's t), the paired t-test's and the Wilcoxon signed-rank test's two-sided
p-values, and the mean difference over its standard deviation.

    python -m benchmarks.paired --runs benchmarks/results/accuracy_current.json --a lorm --b fedit

Several ``--runs`` files are read as one (a strategy's seeds from all of them; a seed in two
files must be one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """Statistics of ``a[s] - b[s]`` over the seeds both have."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise SystemExit(f"need at least 2 paired seeds, have {seeds}")
    diffs = [a[s] - b[s] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    nonzero = [d for d in diffs if d != 0]
    return {
        "seeds": seeds,
        "differences": diffs,
        "mean": mean,
        "sd": sd,
        "ci95": (mean - half, mean + half),
        "t_test_p": float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue),
        "wilcoxon_p": float(stats.wilcoxon(nonzero).pvalue) if nonzero else 1.0,
        "wins": sum(d > 0 for d in diffs),
        "mean_over_sd": mean / sd if sd > 0 else float("inf"),
    }


def describe(name_a: str, name_b: str, r: dict) -> str:
    lo, hi = r["ci95"]
    return (
        f"{name_a} - {name_b} over {len(r['seeds'])} paired seeds: mean {r['mean']:+.3f}, "
        f"sd {r['sd']:.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}], paired t-test p = "
        f"{r['t_test_p']:.2g}, Wilcoxon p = {r['wilcoxon_p']:.2g}, ahead on {r['wins']} of "
        f"{len(r['seeds'])}, mean/sd {r['mean_over_sd']:.2f}; per seed "
        + ", ".join(f"{d:+.3f}" for d in r["differences"])
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="compare.py's OUT.json")
    p.add_argument("--a", required=True, help="the strategy (compare.py entry) to test")
    p.add_argument("--b", nargs="+", required=True, help="the strategies to pair it against")
    args = p.parse_args()
    runs: dict[str, dict[int, float]] = {}
    for path in args.runs:
        for name, rs in json.loads(path.read_text())["runs"].items():
            for r in rs:
                seen = runs.setdefault(name, {}).get(r["seed"])
                if seen is not None and seen != r["final_average_accuracy"]:
                    raise SystemExit(f"{name} seed {r['seed']}: two runs disagree ({path})")
                runs[name][r["seed"]] = r["final_average_accuracy"]

    def finals(name: str) -> dict[int, float]:
        if name not in runs:
            raise SystemExit(f"no runs of {name!r}; have {', '.join(sorted(runs))}")
        return runs[name]

    for b in args.b:
        print(describe(args.a, b, paired(finals(args.a), finals(b))))


if __name__ == "__main__":
    main()
