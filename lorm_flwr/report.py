"""Compare finished runs: a Markdown table and a plot, per strategy and setting.

    python -m lorm_flwr.report RUN_FOLDER [RUN_FOLDER ...] [--plot comparison.png]

A RUN_FOLDER is a run's output folder (holding ``results.json``) or any folder above
several of them. Runs that differ only in ``seed`` (and in keys that do not change
results, such as ``output-dir``) form one row: mean ± std over seeds of the final
and the average incremental accuracy, the forgetting, and the upload and download of
the whole run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorm_flwr.config import RunConfig
from lorm_flwr.server.checkpoint import RESUMABLE_CHANGES

__all__ = ["Run", "find_runs", "group_runs", "main", "markdown", "plot"]

# Keys that never change what a run computes, besides those a resume may change.
NOT_SETTINGS = RESUMABLE_CHANGES | {"seed"}


@dataclass(frozen=True)
class Run:
    folder: Path
    strategy: str
    seed: int
    setting: dict[str, Any]  # every key that changes results, but the seed
    final_average_accuracy: float | None
    average_incremental_accuracy: float | None
    average_forgetting: float | None
    bytes_up: int
    bytes_down: int
    accuracy_kind: str

    @classmethod
    def load(cls, folder: Path) -> Run:
        res = json.loads((folder / "results.json").read_text())
        if res.get("status") != "completed":
            raise ValueError(f"{folder}: run {res.get('status')!r}, not completed")
        cfg = {**RunConfig().to_dict(), **res["config"]}  # keys added since: their defaults
        task_end = res.get("task_end", [])
        incremental = res.get("average_incremental_accuracy")
        if incremental is None and task_end:  # runs written before the field existed
            incremental = sum(t["accuracy"] for t in task_end) / len(task_end)
        return cls(
            folder=folder,
            strategy=cfg["strategy"],
            seed=int(cfg["seed"]),
            setting={k: v for k, v in cfg.items() if k not in NOT_SETTINGS},
            final_average_accuracy=res.get("final_average_accuracy"),
            average_incremental_accuracy=incremental,
            average_forgetting=res.get("average_forgetting"),
            bytes_up=int(res.get("bytes_up_total", 0)),
            bytes_down=int(res.get("bytes_down_total", 0)),
            accuracy_kind=res.get("accuracy_kind", "global"),
        )


@dataclass
class Group:
    label: str
    runs: list[Run] = field(default_factory=list)


TRACKER_FOLDERS = {"mlruns", "wandb", "tensorboard"}


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every completed run in or below ``paths`` (a run folder, or folders above runs)."""
    folders: list[Path] = []
    for p in map(Path, paths):
        if (p / "results.json").exists():
            folders.append(p)
        elif p.is_dir():
            # not the copies a tracker keeps as artifacts (tracking=mlflow: <run>/mlruns/...)
            found = (f.parent for f in p.rglob("results.json"))
            folders.extend(
                sorted(f for f in found if not TRACKER_FOLDERS & set(f.relative_to(p).parts))
            )
        else:
            raise ValueError(f"{p}: no results.json in or below it")
    runs = []
    for folder in dict.fromkeys(folders):  # once each, in order
        try:
            runs.append(Run.load(folder))
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            print(f"skipped {folder}: {exc}")
    if not runs:
        raise ValueError("no completed runs found")
    return runs


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """One group per distinct setting; labelled by the strategy and the keys that differ."""
    settings = [json.dumps(r.setting, sort_keys=True) for r in runs]
    varying = sorted(
        k for k in set().union(*(r.setting for r in runs)) - {"strategy"}
        if len({json.dumps(r.setting.get(k)) for r in runs}) > 1
    )  # fmt: skip
    groups: dict[str, Group] = {}
    for run, key in zip(runs, settings):
        if key in groups and any(r.seed == run.seed for r in groups[key].runs):
            print(f"skipped {run.folder}: a second run of seed {run.seed} of the same setting")
            continue
        if key not in groups:
            extra = " ".join(f"{k}={run.setting.get(k)}" for k in varying)
            groups[key] = Group(f"{run.strategy}{' ' + extra if extra else ''}")
        groups[key].runs.append(run)
    return list(groups.values())


def _stat(values: Iterable[float | None], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def markdown(groups: Sequence[Group]) -> str:
    lines = [
        (
            "| strategy and setting | seeds | final average accuracy | average incremental accuracy "
            "| forgetting | upload per run (MB) | download per run (MB) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        personal = any(r.accuracy_kind != "global" for r in g.runs)
        lines.append(
            f"| {g.label}{' (personalised)' if personal else ''} "
            f"| {', '.join(str(r.seed) for r in g.runs)} "
            f"| {_stat(r.final_average_accuracy for r in g.runs)} "
            f"| {_stat(r.average_incremental_accuracy for r in g.runs)} "
            f"| {_stat(r.average_forgetting for r in g.runs)} "
            f"| {_stat((r.bytes_up / 1e6 for r in g.runs), 1)} "
            f"| {_stat((r.bytes_down / 1e6 for r in g.runs), 1)} |"
        )
    return "\n".join(lines)


def plot(groups: Sequence[Group], path: Path) -> Path:
    """Final and average incremental accuracy per group: mean, std, and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups)), 3.8))
    for i, g in enumerate(groups):
        for offset, attr, color, name in (
            (-0.2, "final_average_accuracy", "#4c72b0", "final average accuracy"),
            (0.2, "average_incremental_accuracy", "#dd8452", "average incremental accuracy"),
        ):
            vals = [getattr(r, attr) for r in g.runs if getattr(r, attr) is not None]
            if not vals:
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.bar(i + offset, statistics.mean(vals), width=0.4, yerr=sd, capsize=3, color=color,
                   label=name if i == 0 else None)  # fmt: skip
            ax.plot([i + offset] * len(vals), vals, "k.", ms=4)
    ax.set_xticks(
        range(len(groups)), [g.label for g in groups], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="run folders, or folders above them")
    p.add_argument(
        "--plot", type=Path, default=Path("comparison.png"), help="where to write the plot"
    )
    args = p.parse_args(argv)
    try:
        groups = group_runs(find_runs(args.folders))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    print(markdown(groups))
    print(f"\nplot: {plot(groups, args.plot).resolve()}")


if __name__ == "__main__":
    main()
