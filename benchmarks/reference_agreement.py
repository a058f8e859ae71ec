"""Our LoRM server against the authors' (fed-mammoth), layer by layer, on identical inputs.

Needs a checkout of https://github.com/aimagelab/fed-mammoth (the user's; nothing of it is
copied here): its ``_models/lorm.py`` is imported at run time and its server methods
(``end_round_server``: the A- and B-steps and the head; ``end_task_server``: the
cross-task merge) are called on the same client factors and Gram statistics as our
strategy's ``merge`` and ``end_task``.

The clients are ours (``lorm_flwr.client.round``: local training, Gram passes, the
end-of-task statistics), run in this process on the offline default scenario (or
``--set`` overrides). Two things are reported:

1. **Each merge on the same inputs.** Along our run, every round's merge and every task
   end is also fed to the reference with the same client factors, Grams and server
   state; the largest absolute difference per layer (and relative to the layer's
   largest entry) of the merged A, B, head and task-end delta.
2. **A whole run on identical inputs.** A second trajectory whose server is the
   reference: the same clients, data, seeds and starting model, every round's merged
   factors and head from the reference's methods. Both trajectories' accuracy matrices.

    python -m benchmarks.reference_agreement --fed-mammoth ~/fed-mammoth \\
        --out benchmarks/results/reference_agreement
    python -m benchmarks.reference_agreement --fed-mammoth ~/fed-mammoth --set gram-alpha=0.0

The reference's ``_models/__init__.py`` imports every model file, one of which needs a
module missing from its repository, so only ``_models.lorm`` and what it imports are
loaded (stand-in package objects for ``_models`` and ``_networks``). Its server code
asks ``torch.cuda`` for the device's memory; without CUDA that query is answered with a
stand-in. Its LoRA keys are named ``layerN.weight`` here, since it treats every key
containing "head" as the classifier (EfficientNet's ``conv_head`` would be).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from benchmarks.inprocess import Clients, as_factors, energy
from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.evaluation import evaluate_global
from lorm_flwr.server.strategies.base import TaskModel

HEAD_W, HEAD_B, HEAD_GRAM = "model.head.weight", "model.head.bias", "head"


def load_reference(path: Path) -> type:
    """fed-mammoth's ``LoRM`` class, importing only ``_models/lorm.py`` and its imports."""
    root = str(path.resolve())
    if not (path / "_models" / "lorm.py").exists():
        raise SystemExit(f"{path} is not a fed-mammoth checkout (no _models/lorm.py)")
    sys.path.insert(0, root)
    for package, decorator in (("_models", "register_model"), ("_networks", "register_network")):
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(path / package)]
        setattr(stand_in, decorator, lambda name: lambda cls: cls)
        sys.modules[package] = stand_in
    if not torch.cuda.is_available():  # its merge reads the GPU's size to decide on emptying caches
        torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(total_memory=1 << 40)
        torch.cuda.memory_reserved = lambda *_: 0
        torch.cuda.empty_cache = lambda: None
    return importlib.import_module("_models.lorm").LoRM


class _Weights(nn.Module):
    """The reference server's ``network``: only its state dict is read and written."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = dict(state)

    def state_dict(self, *args, **kwargs):
        return dict(self._state)

    def load_state_dict(self, state, strict: bool = True):
        self._state.update(state)

    def to(self, *args, **kwargs):
        return self


class Reference:
    """A fed-mammoth LoRM server over our layout: keys ``layerN.weight`` and ``model.head``."""

    def __init__(
        self, lorm_class: type, layout, tensors: dict[str, torch.Tensor], rcond: float = 0.0
    ) -> None:
        self.layout, self.rcond = layout, rcond
        self.keys = [f"layer{i}.weight" for i in range(len(layout.layers))]
        head = layout.heads[0]
        m = lorm_class.__new__(lorm_class)
        nn.Module.__init__(m)
        state = {k: torch.zeros(ly.d_out, ly.d_in) for k, ly in zip(self.keys, layout.layers)}
        state |= {HEAD_W: tensors[head.weight_key].float(), HEAD_B: tensors[head.bias_key].float()}
        m.network = _Weights(state)
        m.device, m.avg_type, m.regmean_all = "cpu", "weighted", True
        m.reg_dtype_64, m.gram_dtype, m.lora_head = True, torch.float32, False
        m.lora_keys = list(self.keys)
        m.middle_names = {k: f"layer{i}" for i, k in enumerate(self.keys)} | {HEAD_W: HEAD_GRAM}
        m.gram_modules = [f"layer{i}" for i in range(len(self.keys))] + [HEAD_GRAM]
        m.head_keys = [HEAD_W, HEAD_B]
        m.head = {HEAD_W: state[HEAD_W], HEAD_B: state[HEAD_B]}
        m.old_delta = {k: torch.zeros_like(state[k]) for k in self.keys}
        m.cur_task, m.cur_train_matrix = 0, "B"
        m.cur_A, m.cur_B = {}, {}
        m.features = {name: torch.zeros(0) for name in m.gram_modules}  # the clients' side only
        self.m = m
        self.inverse_failed = 0
        self.set_factors(tensors)

    @contextlib.contextmanager
    def _solves(self):
        """Its solves as they are, but: a failed exact inverse falls back to the
        pseudo-inverse (counted), and with ``rcond`` every pseudo-inverse cuts singular
        values below ``rcond`` x the largest (ours: 1e-6) instead of torch's 1e-15."""
        exact, pinverse = torch.inverse, torch.pinverse

        def inverse(x: torch.Tensor) -> torch.Tensor:
            try:
                return exact(x)
            except torch.linalg.LinAlgError:
                self.inverse_failed += 1
                return torch.pinverse(x)

        torch.inverse = inverse
        if self.rcond:
            torch.pinverse = lambda x, rcond=self.rcond: pinverse(x, rcond=rcond)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Merging Bs"
                yield
        finally:
            torch.inverse, torch.pinverse = exact, pinverse

    def set_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, ly in zip(self.keys, self.layout.layers):
            self.m.cur_A[key] = ly.matrix(tensors[ly.a_key]).float().clone()
            self.m.cur_B[key] = ly.matrix(tensors[ly.b_key]).float().clone()

    def client_info(self, tensors, grams, n: int) -> dict:
        """One client's dict as its ``get_client_info`` builds it; Grams as (k, k) matrices."""
        head = self.layout.heads[0]

        info = {
            "cur_A": {k: ly.matrix(tensors[ly.a_key]).float().clone()
                      for k, ly in zip(self.keys, self.layout.layers)},
            "cur_B": {k: ly.matrix(tensors[ly.b_key]).float().clone()
                      for k, ly in zip(self.keys, self.layout.layers)},
            "grams": {f"layer{i}": _square(grams[ly.name])
                      for i, ly in enumerate(self.layout.layers)},
            "num_train_samples": n,
        }  # fmt: skip
        if head.name in grams:
            info["grams"][HEAD_GRAM] = _square(grams[head.name])
            info["state_dict"] = {
                HEAD_W: tensors[head.weight_key].float().clone(),
                HEAD_B: tensors[head.bias_key].float().clone(),
            }
        return info

    def merge_round(self, factor: str, clients: list[dict]) -> dict[str, torch.Tensor]:
        """``end_round_server``: the trained factor of every layer and the head, as matrices.

        Its head merge inverts the summed head Gram exactly (``torch.inverse``), which
        fails when a feature is zero on every client (EfficientNet's ReLU6 leaves some
        dead); then, and only then, the pseudo-inverse stands in (:meth:`_solves`).
        """
        self.m.cur_train_matrix = factor
        with self._solves():
            self.m.end_round_server(copy.deepcopy(clients))
        state = self.m.network.state_dict()
        out = {HEAD_W: state[HEAD_W].clone(), HEAD_B: state[HEAD_B].clone()}
        side = self.m.cur_A if factor == "A" else self.m.cur_B
        out |= {k: side[k].detach().clone() for k in self.keys}
        return out

    def end_task(self, task: int, tensors, clients: list[dict]) -> dict[str, torch.Tensor]:
        """``end_task_server`` with the task's merged factors; the dense delta per layer
        (after task 0 the reference keeps ``B_0 A_0``)."""
        self.m.cur_task = task
        self.set_factors(tensors)
        with self._solves():
            self.m.end_task_server(copy.deepcopy(clients))
        if task == 0:
            return {k: self.m.cur_B[k] @ self.m.cur_A[k] for k in self.keys}
        return {k: self.m.optimization_dict[k].detach().clone() for k in self.keys}


def _difference(a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """How far ``a`` is from ``b`` (both ``(m, k)``), as weights and on the inputs.

    The weights: the largest absolute difference over the largest entry of ``b``. On the
    inputs: ``||(a - b) X|| / ||b X||`` over the inputs ``X`` whose Gram is ``gram``
    (``(k, k)`` or its diagonal ``(k,)``), i.e. ``sqrt(tr(D G D^T) / tr(b G b^T))``: what
    the layer's outputs see. Directions no input excites change the first, not the second.
    """
    a, b = a.double(), b.double()
    d = a - b
    scale = float(b.abs().max())
    weights = float(d.abs().max()) / scale if scale > 0 else 0.0
    base = energy(b, gram)
    outputs = (max(energy(d, gram), 0.0) / base) ** 0.5 if base > 0 else 0.0
    return weights, outputs


def _reference_model(layout, ref_delta: dict, head: dict, tensors, rank: int) -> TaskModel:
    """The reference's task-end model (dense deltas) as exact rank-``rank`` factors."""
    out = dict(tensors)
    for key, ly in zip([f"layer{i}.weight" for i in range(len(layout.layers))], layout.layers):
        out[ly.a_key], out[ly.b_key] = as_factors(ly, ref_delta[key], rank)
    h = layout.heads[0]
    out[h.weight_key], out[h.bias_key] = head[HEAD_W], head[HEAD_B]
    return TaskModel(out, rank=rank, alpha=float(rank))


def run(
    cfg: RunConfig, num_clients: int, lorm_class: type, tasks: int = 0, rcond: float = 0.0
) -> dict:
    layout = model_layout(model_of(cfg))
    clients = Clients(cfg, num_clients)
    tasks = min(tasks or clients.scenario.num_tasks, clients.scenario.num_tasks)
    ours = strategy_class("lorm")(cfg, layout)
    theirs_strategy = strategy_class("lorm")(cfg, layout)  # only for its round plans
    start = initial_tensors(cfg)
    ours_t, theirs_t = dict(start), dict(start)
    shadow = Reference(lorm_class, layout, start, rcond)  # fed our trajectory: item 1
    ref = Reference(lorm_class, layout, start, rcond)  # its own trajectory: item 2
    merges: list[dict] = []
    matrices: dict[str, list[list[float]]] = {"ours": [], "reference merge, our run": [],
                                              "reference": []}  # fmt: skip
    for task in range(tasks):
        ours_t = ours.begin_task(task, ours_t)
        theirs_t = theirs_strategy.begin_task(task, theirs_t)
        ref.set_factors(theirs_t)
        for r in range(cfg.rounds_per_task):
            plan = ours.instructions(r)
            factor = "A" if plan.grams == wire.GRAMS_LORM_A else "B"
            gathered, raw = clients.train(plan, ours_t, raw_grams=True)
            shadow.set_factors(ours_t)
            shadow.m.network.load_state_dict(_head_of(layout, ours_t))
            theirs_merge = shadow.merge_round(factor, [shadow.client_info(*x) for x in raw])
            ours_t = ours.merge(plan, gathered, ours_t).tensors
            merges.append(_compare_round(layout, task, r, factor, ours_t, theirs_merge, raw))
            # the reference's own trajectory
            _, raw_ref = clients.train(plan, theirs_t, raw_grams=True)
            merged = ref.merge_round(factor, [ref.client_info(*x) for x in raw_ref])
            theirs_t = _with_reference(layout, theirs_t, merged, factor)
            print(f"task {task} round {r} ({factor}): {merges[-1]['summary']}", flush=True)
        # task end, ours (and the shadow reference on the same Grams)
        seen: list = []
        model = ours.end_task(task, ours_t, clients.recording_query(seen))
        shadow_delta = shadow.end_task(
            task, ours_t, [{"grams": {_short(layout, n): _square(g) for n, g in grams.items()}}
                           for grams, _ in seen[-1]]
        )  # fmt: skip
        merges.append(_compare_task_end(layout, task, model, shadow_delta, ours.history))
        print(f"task {task} end: {merges[-1]['summary']}", flush=True)
        matrices["ours"].append(
            evaluate_global(cfg, clients.scenario, task, model.tensors,
                            rank=model.rank, alpha=model.alpha).per_task
        )  # fmt: skip
        # the reference's task-end merge of exactly our run's factors and Grams
        shadow_model = _reference_model(
            layout, shadow_delta, _head_of(layout, ours_t), ours_t, cfg.lora_rank * (task + 1)
        )
        matrices["reference merge, our run"].append(
            evaluate_global(cfg, clients.scenario, task, shadow_model.tensors,
                            rank=shadow_model.rank, alpha=shadow_model.alpha).per_task
        )  # fmt: skip
        # task end, the reference's trajectory (Grams on its task model W0 + B_t A_t)
        _, raw_end = clients.task_end(theirs_t, wire.Instructions(task=task, grams=wire.GRAMS_TASK))
        delta = ref.end_task(
            task, theirs_t, [{"grams": {_short(layout, n): _square(g) for n, g in grams.items()}}
                             for grams, _ in raw_end]
        )  # fmt: skip
        rank = cfg.lora_rank * (task + 1)
        ref_model = _reference_model(layout, delta, _head_of(layout, theirs_t), theirs_t, rank)
        matrices["reference"].append(
            evaluate_global(cfg, clients.scenario, task, ref_model.tensors,
                            rank=ref_model.rank, alpha=ref_model.alpha).per_task
        )  # fmt: skip
        print(f"after task {task}: " + "; ".join(f"{k} {v[-1]}" for k, v in matrices.items()),
              flush=True)  # fmt: skip
    return {
        "merges": merges,
        "accuracy_matrix": matrices,
        "inverse_failed": [shadow.inverse_failed, ref.inverse_failed],
    }


def _square(g: torch.Tensor) -> torch.Tensor:
    """A Gram as the reference holds it: (k, k), also when only its diagonal (k,) was kept."""
    return torch.diag(g).float() if g.dim() == 1 else g.float()


def _short(layout, name: str) -> str:
    for i, ly in enumerate(layout.layers):
        if ly.name == name:
            return f"layer{i}"
    raise KeyError(name)


def _head_of(layout, tensors) -> dict[str, torch.Tensor]:
    h = layout.heads[0]
    return {HEAD_W: tensors[h.weight_key].float(), HEAD_B: tensors[h.bias_key].float()}


def _with_reference(layout, tensors, merged: dict, factor: str) -> dict:
    out = dict(tensors)
    for i, ly in enumerate(layout.layers):
        m = merged[f"layer{i}.weight"]
        key = ly.a_key if factor == "A" else ly.b_key
        out[key] = m.reshape(tensors[key].shape).to(tensors[key].dtype)
    h = layout.heads[0]
    out[h.weight_key], out[h.bias_key] = merged[HEAD_W], merged[HEAD_B]
    return out


def _code_gram(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    a, g = a.double(), gram.double()
    return (a * g) @ a.T if g.dim() == 1 else a @ g @ a.T


def _objective(merged: torch.Tensor, own: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """LoRM's least-squares objective ``sum_i ||(M - M_i) X_i||^2`` over ``(M_i, G_i)``."""
    return sum(energy(merged.double() - m.double(), g) for m, g in own)


def _summed(raw: list[tuple], name: str) -> torch.Tensor:
    return sum(grams[name].double() for _, grams, _ in raw)


def _compare_round(layout, task, r, factor, ours_t, theirs, raw) -> dict:
    """Per layer: the merged factor (A: on the layer's inputs X; B: on the codes A X)."""
    rows = []
    for i, ly in enumerate(layout.layers):
        gram = _summed(raw, ly.name)
        key = ly.a_key if factor == "A" else ly.b_key
        ours, ref = ly.matrix(ours_t[key]), theirs[f"layer{i}.weight"]
        if factor == "A":
            own = [(ly.matrix(t[key]), g[ly.name]) for t, g, _ in raw]
        else:  # B acts on the codes A X, whose Gram is A G A^T (A is the server's, shared)
            a = ly.matrix(ours_t[ly.a_key])
            gram = _code_gram(a, gram)
            own = [(ly.matrix(t[key]), _code_gram(a, g[ly.name])) for t, g, _ in raw]
        rows.append((ly.name, *_difference(ours, ref, gram), _ratio(ref, ours, own)))
    h = layout.heads[0]
    gram = _summed(raw, h.name)
    own = [(t[h.weight_key], g[h.name]) for t, g, _ in raw]
    rows.append((h.weight_key, *_difference(ours_t[h.weight_key], theirs[HEAD_W], gram),
                 _ratio(theirs[HEAD_W], ours_t[h.weight_key], own)))  # fmt: skip
    bias = _difference(ours_t[h.bias_key][None], theirs[HEAD_B][None], torch.ones(1))
    rows.append((h.bias_key, *bias, (0.0, 0.0)))
    return _summary(f"task {task} round {r}: {factor}-step and head", rows)


def _ratio(ref: torch.Tensor, ours: torch.Tensor, own: list) -> tuple[float, float]:
    """The objective of ours and of the reference's, each over ``sum_i ||M_i X_i||^2``
    (the clients' own outputs): how much of what the clients' layers compute is lost."""
    norm = sum(energy(m, g) for m, g in own)
    if norm <= 0:
        return 0.0, 0.0
    return _objective(ours, own) / norm, _objective(ref, own) / norm


def _summary(what: str, rows: list[tuple]) -> dict:
    worst_w = max(rows, key=lambda x: x[1])
    worst_o = max(rows, key=lambda x: x[2])
    ours_worst = max(rows, key=lambda x: x[3][0])
    ref_worst = max(rows, key=lambda x: x[3][1])
    return {
        "what": what,
        "layers": rows,
        "worst_weights": worst_w[:2],
        "worst_outputs": (worst_o[0], worst_o[2]),
        "worst_objective": {"ours": (ours_worst[0], ours_worst[3][0]),
                            "reference": (ref_worst[0], ref_worst[3][1])},
        "summary": f"weights {worst_w[1]:.1e} ({worst_w[0]}), outputs {worst_o[2]:.1e} "
        f"({worst_o[0]}), relative objective ours {ours_worst[3][0]:.1e}, reference "
        f"{ref_worst[3][1]:.1e}",
    }  # fmt: skip


def _task_objective(delta: torch.Tensor, h) -> float:
    """``sum_t ||(Delta - s B_t A_t) X_t||^2`` from the history's sums: ``tr(D S D^T)
    - 2 sum_t tr(D (A_t G_t)^T (s B_t)^T) + sum_t tr(s B_t (A_t G_t) A_t^T (s B_t)^T)``."""
    d = delta.double()
    total = energy(d, h.gram_total)
    for sb, a, ag in zip(h.scaled_bs, h.a_mats, h.a_grams):
        total -= 2 * float((d * (sb @ ag)).sum())
        total += float(torch.trace(sb @ (ag @ a.T) @ sb.T))
    return total


def _compare_task_end(layout, task, model: TaskModel, theirs: dict, history) -> dict:
    """Per layer: the task-end delta, on every task's inputs so far (S = sum_t G_t)."""
    rows = []
    scaling = model.alpha / model.rank
    for i, ly in enumerate(layout.layers):
        a = ly.matrix(model.tensors[ly.a_key]).double()
        b = ly.matrix(model.tensors[ly.b_key]).double()
        h = history[ly.name]
        ours, ref = scaling * b @ a, theirs[f"layer{i}.weight"].double()
        norm = sum(float(torch.trace(sb @ (ag @ a.T) @ sb.T))
                   for sb, a, ag in zip(h.scaled_bs, h.a_mats, h.a_grams))  # fmt: skip
        objective = (_task_objective(ours, h) / norm, _task_objective(ref, h) / norm)
        rows.append((ly.name, *_difference(ours, ref, h.gram_total), objective))
    what = (
        "task 0 end: our fold (R S^+) against the reference's B_0 A_0, kept"
        if task == 0
        else f"task {task} end: cross-task delta (R S^+)"
    )
    return _summary(what, rows)


def report(saved: dict) -> str:
    """The Markdown of a saved result (``OUT.json``)."""
    lines = [
        f"Command: `{saved['command']}`",
        (
            f"Date: {saved['date']}; machine: 2-core CPU; fed-mammoth "
            f"{saved['fed_mammoth']}; {saved['seconds']:.0f} s."
        ),
        "",
        (
            "1. Each merge on the same inputs. Outputs: ||(ours - reference) X|| / "
            "||reference X|| on the layer's inputs X (the clients' summed Gram; a B-step on "
            "the codes A X), worst backbone layer and the head's weight; weights: the largest "
            "difference over the largest entry, worst backbone layer; objective: the merge's "
            "least-squares loss sum_i ||(M - M_i) X_i||^2 over sum_i ||M_i X_i||^2 (task "
            "ends: over the tasks), worst backbone layer, ours and the reference's."
        ),
        "",
        (
            "| merge | outputs, backbone | outputs, head | weights, backbone "
            "| objective, ours | objective, reference |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for m in saved["merges"]:
        rows = [r for r in m["layers"] if not r[0].startswith(("linear_head", "model.head"))]
        head = [r for r in m["layers"] if r[0].endswith("head.weight")]
        out = max(rows, key=lambda r: r[2])
        weights = max(rows, key=lambda r: r[1])
        ours = max(rows, key=lambda r: r[3][0])
        ref = max(rows, key=lambda r: r[3][1])
        lines.append(
            f"| {m['what']} | {out[2]:.1e} ({_short_name(out[0])}) | "
            + (f"{head[0][2]:.1e}" if head else "–")
            + f" | {weights[1]:.1e} | {ours[3][0]:.2e} | {ref[3][1]:.2e} |"
        )
    failed = saved["inverse_failed"]
    lines += [
        "",
        (
            f"The reference's exact head inverse failed (singular summed head Gram) in "
            f"{failed[0]} of the merges above and {failed[1]} of its own run's; the "
            "pseudo-inverse stood in."
        ),
        "",
        (
            "2. Accuracy per seen task after each task (final average accuracy last): our "
            "run; the reference's task-end merge of our run's factors and Grams; the "
            "reference's own run (its round and task-end merges throughout, our clients):"
        ),
        "",
    ]
    for name, rows in saved["accuracy_matrix"].items():
        final = sum(rows[-1]) / len(rows[-1])
        lines.append(f"- {name}: " + "; ".join(
            "[" + ", ".join(f"{a:.3f}" for a in row) + "]" for row in rows
        ) + f"; final {final:.3f}")  # fmt: skip
    return "\n".join(lines)


def _short_name(layer: str) -> str:
    return layer.removeprefix("backbone.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fed-mammoth", type=Path, help="a fed-mammoth checkout")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--tasks", type=int, default=0, help="stop after this many tasks (0: all)")
    p.add_argument(
        "--reference-rcond",
        type=float,
        default=0.0,
        help="run the reference's pseudo-inverses with this cut-off (0: its own, torch's)",
    )
    p.add_argument("--set", nargs="*", default=[], help="run-config key=value overrides")
    p.add_argument("--out", default="benchmarks/results/reference_agreement")
    p.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.report_only:
        text = report(json.loads(out.with_suffix(".json").read_text()))
        out.with_suffix(".md").write_text(text + "\n")
        print(text)
        return
    if args.fed_mammoth is None:
        p.error("--fed-mammoth PATH is required (a checkout of aimagelab/fed-mammoth)")
    lorm_class = load_reference(args.fed_mammoth)
    overrides = dict(item.partition("=")[::2] for item in args.set)
    cfg = RunConfig.from_mapping({"strategy": "lorm", **overrides})
    start = time.perf_counter()
    result = run(cfg, args.clients, lorm_class, args.tasks, args.reference_rcond)
    saved = {
        "command": "python -m benchmarks.reference_agreement --fed-mammoth PATH"
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --reference-rcond {args.reference_rcond}" if args.reference_rcond else ""),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": time.perf_counter() - start,
        "config": overrides,
        "fed_mammoth": _commit(args.fed_mammoth),
        **result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(saved, indent=1))
    text = report(saved)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


def _commit(path: Path) -> str:
    import subprocess

    done = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown commit"


if __name__ == "__main__":
    main()
