"""Which reference behaviours help: ours, the reference mode, each difference alone, and the
Gram smoothing per strategy, over seeds, on the offline default with a validation split.

Settings are chosen on the validation split (held out of the training data by
``validation-fraction``) and reported on the test split. Every run is the real app
(``benchmarks/compare.py``, one ``flwr run`` at a time); the runs land in
``OUT.json`` as they finish, so an interrupted sweep continues where it stopped.

    python benchmarks/fidelity.py --seeds 0 1 2 3 4            # runs, then the table
    python benchmarks/fidelity.py --seeds 0 1 2 3 4 --table    # the table only

Writes ``OUT.json`` (compare.py's runs), ``OUT.md`` (compare.py's report) and
``OUT-table.md`` (validation and test figures per variant, and LoRM's share of the
FedIT -> joint gap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# The reference code's behaviours on the offline default (configs/offline-mnist-reference.toml).
REFERENCE = {
    "augment": "true",
    "gram-passes": "2",
    "eval-center-crop": "true",
    "lorm-round-grams": "mean-delta",
    "lorm-reference-grams": "true",
    "lorm-first-task": "keep",
    "round-eval-model": "mean-delta",
    "gram-alpha": "0.0",
    "head-init": "trunc-normal",
}


def _entry(strategy: str, **keys: str) -> str:
    return strategy + (":" + ",".join(f"{k}={v}" for k, v in keys.items()) if keys else "")


# (label, compare.py entry). round-eval-model changes only the per-round curve and
# precision only CUDA runs, so neither has a row of its own.
VARIANTS: list[tuple[str, str]] = [
    ("LoRM, ours (default)", "lorm"),
    ("FedIT", "fedit"),
    ("joint (upper bound)", "joint"),
    ("LoRM, reference mode", _entry("lorm", **REFERENCE)),
    ("LoRM + augment, 2 Gram passes", _entry("lorm", augment="true", **{"gram-passes": "2"})),
    ("LoRM + round Grams on mean delta", _entry("lorm", **{"lorm-round-grams": "mean-delta"})),
    ("LoRM + task-end Grams on mean delta", _entry("lorm", **{"lorm-reference-grams": "true"})),
    ("LoRM + task 0 kept", _entry("lorm", **{"lorm-first-task": "keep"})),
    ("LoRM + center-crop evaluation", _entry("lorm", **{"eval-center-crop": "true"})),
    ("LoRM + timm head init", _entry("lorm", **{"head-init": "trunc-normal"})),
    ("LoRM, gram-alpha 0", _entry("lorm", **{"gram-alpha": "0.0"})),
    ("LoRM, gram-alpha 0.5", _entry("lorm", **{"gram-alpha": "0.5"})),
    ("RegMean, gram-alpha 0", _entry("regmean", **{"gram-alpha": "0.0"})),
    ("RegMean, gram-alpha 0.5", _entry("regmean", **{"gram-alpha": "0.5"})),
    ("RegMean, gram-alpha 1", _entry("regmean", **{"gram-alpha": "1.0"})),
    ("FFA-LoRA", "ffa"),
    ("FedSA-LoRA (personalised)", "fedsa"),
    ("joint-incremental (pooled data, tasks in sequence)", "joint-incremental"),
]


def _stats(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _runs(files: list[Path]) -> dict[str, list[dict]]:
    """Every entry's runs over one or more sweep files (one seed once)."""
    runs: dict[str, list[dict]] = {}
    for f in files:
        for entry, rs in json.loads(f.read_text())["runs"].items():
            have = {r["seed"] for r in runs.setdefault(entry, [])}
            runs[entry] += [r for r in rs if r["seed"] not in have]
    return runs


def _paired(runs: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    """Each LoRM variant against ours, seed by seed: the mean paired difference of final
    average accuracy on validation (what a choice is made on) and on test."""
    ours = {r["seed"]: r for r in runs.get("lorm", []) if r["seed"] in seeds}
    lines = [
        "",
        (
            "LoRM variants against ours, paired by seed (mean difference of final average "
            "accuracy; wins/seeds on validation):"
        ),
        "",
    ]
    for label, entry in VARIANTS:
        if not entry.startswith("lorm:"):
            continue
        pairs = [(r, ours[r["seed"]]) for r in runs.get(entry, []) if r["seed"] in ours]
        val = [(r.get("validation") or {}).get("final_average_accuracy") for r, _ in pairs]
        base = [(o.get("validation") or {}).get("final_average_accuracy") for _, o in pairs]
        dv = [a - b for a, b in zip(val, base) if a is not None and b is not None]
        dt = [r["final_average_accuracy"] - o["final_average_accuracy"] for r, o in pairs]
        if dt:
            lines.append(
                f"- {label}: validation {statistics.mean(dv):+.3f} ({sum(d > 0 for d in dv)}/"
                f"{len(dv)} seeds better), test {statistics.mean(dt):+.3f}"
                if dv
                else f"- {label}: test {statistics.mean(dt):+.3f}"
            )
    return lines


def table(out: Path, seeds: list[int], more: list[Path] = ()) -> str:
    runs = _runs([out.with_suffix(".json"), *more])
    lines = [
        (
            "Offline default (MNIST-5k, EfficientNet-Lite0 at 32 px, 5 tasks x 2 classes, "
            f"3 clients), validation-fraction=0.1, seeds {', '.join(map(str, seeds))}; "
            "mean ± std over seeds."
        ),
        (
            "Choose on validation (val), report on test. Final = final average accuracy, "
            "avg-inc = average incremental accuracy, forg = average forgetting "
            "(docs/algorithms.md)."
        ),
        "",
        (
            "| variant | seeds | val final | val avg-inc | val forg | test final | test avg-inc "
            "| test forg | test final per seed |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, entry in VARIANTS:
        rs = [r for r in runs.get(entry, []) if r["seed"] in seeds]
        if not rs:
            lines.append(f"| {label} | 0 | not run |  |  |  |  |  |  |")
            continue
        val = [r.get("validation") or {} for r in rs]
        lines.append(
            f"| {label} | {len(rs)} "
            f"| {_stats([v.get('final_average_accuracy') for v in val])} "
            f"| {_stats([v.get('average_incremental_accuracy') for v in val])} "
            f"| {_stats([v.get('average_forgetting') for v in val])} "
            f"| {_stats([r['final_average_accuracy'] for r in rs])} "
            f"| {_stats([r.get('average_incremental_accuracy') for r in rs])} "
            f"| {_stats([r['average_forgetting'] for r in rs])} "
            f"| {', '.join(format(r['final_average_accuracy'], '.3f') for r in rs)} |"
        )
    lines += _paired(runs, seeds)
    by_seed = {e: {r["seed"]: r["final_average_accuracy"] for r in runs.get(e, [])}
               for e in ("fedit", "joint")}  # fmt: skip
    lines += ["", ("Share of the FedIT -> joint gap closed on test (final average accuracy), on "
                   "each variant's seeds (FedIT and joint on the same seeds):"), ""]  # fmt: skip
    for label, entry in VARIANTS:
        if entry in ("fedit", "joint"):
            continue
        got = {r["seed"]: r["final_average_accuracy"] for r in runs.get(entry, [])
               if r["seed"] in seeds and all(r["seed"] in by_seed[e] for e in by_seed)}  # fmt: skip
        if not got:
            continue
        value = statistics.mean(got.values())
        fedit = statistics.mean(by_seed["fedit"][k] for k in got)
        joint = statistics.mean(by_seed["joint"][k] for k in got)
        lines.append(f"- {label}: {(value - fedit) / (joint - fedit):.2f} (seeds {sorted(got)})")
    text = "\n".join(lines) + "\n"
    Path(f"{out}-table.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--out", default="benchmarks/results/fidelity")
    p.add_argument("--table", action="store_true", help="run nothing; write the table")
    p.add_argument(
        "--merge",
        nargs="*",
        default=[],
        type=Path,
        help="more sweep files (another OUT.json, e.g. seeds run in parallel) for the table",
    )
    args = p.parse_args()
    out = Path(args.out)
    if not args.table:
        entries = [e for _, e in VARIANTS]
        cmd = [
            sys.executable, str(Path(__file__).with_name("compare.py")),
            "--strategies", *entries, "--seeds", *map(str, args.seeds),
            "--set", f"validation-fraction={args.validation_fraction}",
            "--out", str(out), "--resume",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
    print(table(out, args.seeds, args.merge))


if __name__ == "__main__":
    main()
