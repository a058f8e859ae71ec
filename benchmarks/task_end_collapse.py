"""Why the newest task collapses at LoRM's task-end merge: one run, many merges of it.

After each task LoRM merges the tasks' adapters in closed form, ``Delta W = R S^+`` with
``R = sum_k s B_k A_k G_k`` and ``S = sum_k G_k`` (docs/algorithms.md). Nothing that
follows depends on that merge: the next task trains fresh factors from ``W0`` and the head
carries on from the round merges. So one run (our clients and our LoRM strategy in this
process, ``benchmarks/inprocess.py``) can be scored, at every task end, with other
models built from the same factors, Grams and heads:

- ``task model``: ``W0 + s B_t A_t``, the head (before the task-end merge);
- ``LoRM``: the merge the app evaluates (after);
- ``own adapter, current head``: each task k's samples through ``W0 + s B_k A_k`` and the
  current head (the head alone spans the tasks);
- ``merge, own head``: each task k's samples through the merged backbone and the head as
  it was after task k (the backbone alone spans the tasks);
- ``equal task weights``: ``R``, ``S`` with each task's Grams scaled to trace 1 (a
  weighting of the task Grams, still the closed form);
- ``Grams from N passes``: the task Grams recorded over N passes under the training
  augmentation instead of one plain pass (the reference's ``regmean_rounds``);
- ``mean of deltas``: ``(1/(t+1)) sum_k s B_k A_k``, no Grams (the reference's model
  between task ends).

Each is scored class-incrementally (argmax over every seen class, as the app reports) and
task-aware (argmax over the task's own classes): a task that is lost class-incrementally
but kept task-aware is confused with the other tasks, not forgotten. Also reported: how
well the LoRM merge reproduces each task's layers on that task's inputs,
``sum_layers ||(Delta W - s B_k A_k) X_k||^2 / sum_layers ||s B_k A_k X_k||^2``.

    python -m benchmarks.task_end_collapse --seeds 0 1 2 --out benchmarks/results/task_end_collapse
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.inprocess import Clients, accuracy_per_task, energy
from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.merge import cross_task_factors
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of

VARIANTS = [
    "task model (before the merge)",
    "LoRM (after the merge)",
    "own adapter, current head",
    "merge, own head",
    "equal task weights",
    "Grams from more passes",
    "mean of deltas",
]


def _merged(layout, tensors, tasks: list[dict], weights: list[float], grams_key: str = "G"):
    """Tensors of ``R S^+`` over ``tasks`` (each: per layer ``G``, ``sB``, ``A``), with
    task k's Grams scaled by ``weights[k]``; rank ``(t+1) r``, scaling 1."""
    out = dict(tensors)
    for ly in layout.layers:
        scaled_bs = [t["sB"][ly.name] for t in tasks]
        a_grams, total = [], None
        for t, w in zip(tasks, weights):
            g = w * t[grams_key][ly.name]
            a = t["A"][ly.name]
            a_grams.append(a * g if g.dim() == 1 else a @ g)
            total = g if total is None else total + g
        b_cat, a_cat = cross_task_factors(scaled_bs, a_grams, total)
        out[ly.a_key], out[ly.b_key] = ly.stored(a_cat, b_cat)
    return out


def _mean_of_deltas(layout, tensors, tasks: list[dict]):
    out = dict(tensors)
    n = len(tasks)
    for ly in layout.layers:
        b_cat = torch.cat([t["sB"][ly.name] for t in tasks], dim=1) / n
        a_cat = torch.cat([t["A"][ly.name] for t in tasks], dim=0)
        out[ly.a_key], out[ly.b_key] = ly.stored(a_cat, b_cat)
    return out


def _head(layout, tensors) -> dict:
    keys = [k for h in layout.heads for k in (h.weight_key, h.bias_key)]
    return {k: tensors[k].clone() for k in keys}


def _reproduction(layout, merged, tasks: list[dict]) -> list[float]:
    """Per task k: sum over layers of ||(Delta - s B_k A_k) X_k||^2 over ||s B_k A_k X_k||^2."""
    out = []
    for t in tasks:
        err = norm = 0.0
        for ly in layout.layers:
            delta = ly.matrix(merged[ly.b_key]).double() @ ly.matrix(merged[ly.a_key]).double()
            own = t["sB"][ly.name] @ t["A"][ly.name]
            err += energy(delta - own, t["G"][ly.name])
            norm += energy(own, t["G"][ly.name])
        out.append(err / norm if norm > 0 else 0.0)
    return out


def run_seed(cfg: RunConfig, num_clients: int, passes: int) -> list[dict]:
    layout = model_layout(model_of(cfg))
    clients = Clients(cfg, num_clients)
    scenario = clients.scenario
    strategy = strategy_class("lorm")(cfg, layout)
    tensors = initial_tensors(cfg)
    more = cfg.replace(augment=True, gram_passes=passes)
    tasks: list[dict] = []
    rows: list[dict] = []
    r = cfg.lora_rank
    for task in range(scenario.num_tasks):
        tensors = strategy.begin_task(task, tensors)
        for rnd in range(cfg.rounds_per_task):
            plan = strategy.instructions(rnd)
            gathered, _ = clients.train(plan, tensors)
            tensors = strategy.merge(plan, gathered, tensors).tensors
        captured: list = []
        model = strategy.end_task(task, tensors, clients.recording_query(captured))
        _, raw_more = clients.task_end(
            tensors, wire.Instructions(task=task, grams=strategy.task_grams), more
        )

        def total(raw):
            return {name: sum(g[name].double() for g, _ in raw) for name in raw[0][0]}

        tasks.append(
            {
                "G": total(captured[-1]),
                "G_more": total(raw_more),
                "sB": {ly.name: ly.scaling * ly.matrix(tensors[ly.b_key]).double()
                       for ly in layout.layers},
                "A": {ly.name: ly.matrix(tensors[ly.a_key]).double() for ly in layout.layers},
                "head": _head(layout, tensors),
                "factors": dict(tensors),
            }
        )  # fmt: skip
        rank = r * (task + 1)

        def score(t_tensors, at_task=task, rank_=rank):
            return accuracy_per_task(cfg, scenario, at_task, t_tensors, rank_, float(rank_))

        result = {
            VARIANTS[0]: accuracy_per_task(cfg, scenario, task, tensors, r, cfg.lora_alpha),
            VARIANTS[1]: accuracy_per_task(
                cfg, scenario, task, model.tensors, model.rank, model.alpha
            ),
        }
        own_adapter = ([], [])
        own_head = ([], [])
        for k, past in enumerate(tasks):
            inc, aware = accuracy_per_task(
                cfg, scenario, task, {**past["factors"], **tasks[-1]["head"]},
                r, cfg.lora_alpha,
            )  # fmt: skip
            own_adapter[0].append(inc[k])
            own_adapter[1].append(aware[k])
            inc, aware = accuracy_per_task(
                cfg, scenario, k, {**model.tensors, **past["head"]},
                model.rank, model.alpha,
            )  # fmt: skip
            own_head[0].append(inc[k])
            own_head[1].append(aware[k])
        result[VARIANTS[2]] = own_adapter
        result[VARIANTS[3]] = own_head
        equal = [1.0 / max(sum(float(_trace(g)) for g in t["G"].values()), 1e-300) for t in tasks]
        result[VARIANTS[4]] = score(_merged(layout, tensors, tasks, equal))
        result[VARIANTS[5]] = score(_merged(layout, tensors, tasks, [1.0] * len(tasks), "G_more"))
        result[VARIANTS[6]] = score(_mean_of_deltas(layout, tensors, tasks))
        reproduction = _reproduction(layout, model.tensors, tasks)
        rows.append({"task": task, "accuracy": result, "reproduction_error": reproduction})
        print(
            f"task {task}: LoRM {[round(a, 3) for a in result[VARIANTS[1]][0]]}, "
            f"task-aware {[round(a, 3) for a in result[VARIANTS[1]][1]]}, "
            f"reproduction error {[round(e, 3) for e in reproduction]}",
            flush=True,
        )
    return rows


def _trace(g: torch.Tensor) -> torch.Tensor:
    return g.sum() if g.dim() == 1 else torch.diagonal(g).sum()


def table(runs: dict[int, list[dict]]) -> str:
    """Per variant: the newest task and the older tasks' mean at each task end (t >= 1),
    averaged over task ends and seeds; class-incremental / task-aware."""
    lines = [
        (
            "| variant | newest task, class-incremental | older tasks, class-incremental "
            "| newest task, task-aware | older tasks, task-aware |"
        ),
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        cols = [[], [], [], []]
        for rows in runs.values():
            for row in rows[1:]:
                inc, aware = row["accuracy"][v]
                cols[0].append(inc[-1])
                cols[1].append(statistics.mean(inc[:-1]))
                cols[2].append(aware[-1])
                cols[3].append(statistics.mean(aware[:-1]))
        lines.append(f"| {v} | " + " | ".join(f"{statistics.mean(c):.3f}" for c in cols) + " |")
    errors_new, errors_old = [], []
    for rows in runs.values():
        for row in rows[1:]:
            errors_new.append(row["reproduction_error"][-1])
            errors_old.append(statistics.mean(row["reproduction_error"][:-1]))
    lines += [
        "",
        (
            "LoRM's merge reproduces each task's layers on that task's inputs with relative "
            f"error {statistics.mean(errors_new):.3f} for the newest task and "
            f"{statistics.mean(errors_old):.3f} for the older ones (mean over task ends 1-4 "
            "and seeds; 0 = exact)."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--passes", type=int, default=4, help="augmented passes of the variant")
    p.add_argument("--set", nargs="*", default=[], help="run-config key=value overrides")
    p.add_argument("--out", default="benchmarks/results/task_end_collapse")
    args = p.parse_args()
    overrides = dict(item.partition("=")[::2] for item in args.set)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {}
    if out.with_suffix(".json").exists():  # seeds done by an earlier invocation stay
        old = json.loads(out.with_suffix(".json").read_text())
        if old["config"] == overrides:
            runs = {int(s): rows for s, rows in old["runs"].items()}
    start = time.perf_counter()
    for seed in args.seeds:
        if seed in runs:
            continue
        cfg = RunConfig.from_mapping({**overrides, "strategy": "lorm", "seed": seed})
        print(f"seed {seed}", flush=True)
        runs[seed] = run_seed(cfg, args.clients, args.passes)
        out.with_suffix(".json").write_text(
            json.dumps({"config": overrides, "runs": runs}, indent=1)
        )
    text = "\n".join(
        [
            f"Command: `python -m benchmarks.task_end_collapse --seeds "
            f"{' '.join(map(str, args.seeds))} --passes {args.passes}"
            + (f" --set {' '.join(args.set)}" if args.set else "")
            + "`",
            (
                f"Date: {time.strftime('%Y-%m-%d')}; machine: 2-core CPU; "
                f"{time.perf_counter() - start:.0f} s for the seeds run now."
            ),
            "",
            table(runs),
        ]
    )
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
