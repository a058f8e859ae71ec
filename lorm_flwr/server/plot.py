"""The run's plot, ``accuracy.png``: what papers report, and the accuracy matrix."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the recorder calls this module, never the reverse at run time
    from lorm_flwr.server.results import RunRecorder

__all__ = ["PLOT_FILE", "plot_accuracy"]

PLOT_FILE = "accuracy.png"


def plot_accuracy(recorder: RunRecorder) -> Path:
    """``accuracy.png``: what papers report, and the accuracy matrix.

    Left: accuracy on all seen classes and on each task's classes after each task
    (the accuracy matrix, for LoRM after the cross-task merge), at the task
    boundaries (dotted), over the within-task per-round curve of the round's model
    (thin, grey). Right: the accuracy matrix as a heatmap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, heat) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    xs = list(range(1, len(recorder.rounds) + 1))
    ends = []  # the last round of each finished task
    for t in range(len(recorder.accuracy_matrix)):
        in_task = [x for x, r in zip(xs, recorder.rounds) if r["task"] <= t]
        ends.append(max(in_task) if in_task else t + 1)
    if recorder.rounds:
        ax.plot(xs, [r["accuracy"] for r in recorder.rounds], color="0.6", lw=1, marker=".", ms=3,
                label="within task: the round's model, seen classes")  # fmt: skip
    for x in ends:
        ax.axvline(x, color="0.8", ls=":", lw=1)
    for k in range(len(recorder.tasks)):
        pts = [
            (ends[t], row[k])
            for t, row in enumerate(recorder.accuracy_matrix)
            if row[k] is not None
        ]
        if pts:
            ax.plot(
                *zip(*pts),
                marker="o",
                ms=4,
                lw=1.2,
                label=f"after each task: task {k} {recorder.tasks[k]}",
            )
    after = [e["accuracy"] for e in recorder.task_end]
    ax.plot(
        ends[: len(after)],
        after,
        "k-",
        marker="s",
        lw=2.2,
        label="after each task: all seen classes",
    )
    ax.set_xlabel("global round (dotted: task ends)")
    ax.set_ylabel("class-incremental accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{recorder.cfg.strategy} on {recorder.cfg.dataset} ({recorder.cfg.backbone})")
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3)
    matrix = [[float("nan") if v is None else v for v in row] for row in recorder.accuracy_matrix]
    if matrix:
        image = heat.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for t, row in enumerate(matrix):
            for k, v in enumerate(row):
                if not math.isnan(v):
                    heat.text(k, t, f"{v:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if v < 0.5 else "black")  # fmt: skip
        fig.colorbar(image, ax=heat, fraction=0.046)
    heat.set_xlabel("accuracy on task k's classes")
    heat.set_ylabel("after training task t")
    heat.set_title("accuracy matrix a[t][k]")
    fig.tight_layout()
    path = recorder.folder / PLOT_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
