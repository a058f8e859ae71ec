"""Every field of a checkpoint checked before a resume uses any of it, like a reply.

A checkpoint's SHA-256 sits in the same file as the state it covers: it catches
accidental damage (a torn copy, a flipped bit), but whoever edits the file can write
a new one. So :func:`check_fields` checks each field against what this run itself
would have written: the task and round against the run's schedule; every tensor's
key, shape, dtype and finiteness against the global tensors the run starts from;
the RNG states by decoding them into fresh generators; the strategy's state and the
results so far against their layout. It reads only; no global state changes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from lorm_flwr.config import ConfigError, RunConfig

__all__ = ["CheckpointError", "Invalid", "check_fields", "check_rng", "check_schedule"]

MT_WORDS = 624  # Mersenne Twister state words (Python's random, NumPy's RandomState)
HISTORY_FIELDS = ("scaled_bs", "a_mats", "a_grams", "gram_total")  # LoRM's TaskHistory


class CheckpointError(ConfigError):
    """``resume-from`` names a checkpoint this run cannot resume from; the message names
    the file and the field."""


class Invalid(ValueError):
    """One field of a checkpoint is wrong; the message names the field and what is wrong."""


def _is_int(value: Any) -> bool:
    return type(value) is int


def _keys(where: str, value: Any, expected: set[str], ignored: frozenset[str] = frozenset()):
    """``value`` must be a dict with exactly the keys ``expected`` (plus any of ``ignored``)."""
    if not isinstance(value, dict):
        raise Invalid(f"{where} is a {type(value).__name__}, not a mapping")
    missing = sorted(map(str, expected - set(value)))
    extra = sorted(map(repr, set(value) - expected - ignored))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}"] if extra else []
        )
        counts = (
            f" ({len(missing)} missing, {len(extra)} unexpected)"
            if len(missing + extra) > 3
            else ""
        )
        raise Invalid(f"{where} does not hold the expected keys: {'; '.join(parts)}{counts}")


def check_tensor(where: str, t: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A dense CPU tensor of exactly ``shape`` and ``dtype``, finite if floating."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
        raise Invalid(f"{where} is a {type(t).__name__}, not a dense tensor")
    if t.dtype != dtype:
        raise Invalid(f"{where} has dtype {t.dtype}; this run's is {dtype}")
    if tuple(t.shape) != tuple(shape):
        raise Invalid(f"{where} has shape {tuple(t.shape)}; this run's is {tuple(shape)}")
    if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
        raise Invalid(f"{where} holds NaN or infinite values")


# ------------------------------------------------------------------- schedule
def check_schedule(task: Any, round_in_task: Any, cfg: RunConfig) -> None:
    """A point the run saves at: ``round_in_task`` rounds of ``task`` done (``rounds-per-task``:
    only the task's end is left), or ``task == num-tasks``, round 0: every task done."""
    n, r = cfg.num_tasks, cfg.rounds_per_task
    if not (_is_int(task) and _is_int(round_in_task)):
        raise Invalid(f"task={task!r}, round_in_task={round_in_task!r} must be integers")
    if not (0 <= task < n and 0 <= round_in_task <= r) and (task, round_in_task) != (n, 0):
        raise Invalid(
            f"task={task}, round_in_task={round_in_task} is not a point of this run's schedule "
            f"(num-tasks={n}, rounds-per-task={r}): task 0..{n - 1} with round_in_task "
            f"0..{r}, or task {n} with round_in_task 0 (every task done)"
        )


# ------------------------------------------------------------------------ RNG
def check_rng(state: Any) -> None:
    """The Python, NumPy and torch states of :func:`~lorm_flwr.server.checkpoint.capture_rng`,
    each loaded into a fresh generator (never the process's own)."""
    _keys("rng", state, {"python", "numpy", "torch"})
    _python_rng(state["python"])
    _numpy_rng(state["numpy"])
    t = state["torch"]
    check_tensor("rng['torch']", t, tuple(torch.get_rng_state().shape), torch.uint8)
    try:
        torch.Generator().set_state(t.clone())
    except (RuntimeError, ValueError) as exc:
        raise Invalid(f"rng['torch'] is not a torch generator state: {exc}") from None


def _python_rng(py: Any) -> None:
    where = "rng['python']"
    if not isinstance(py, list) or len(py) != MT_WORDS + 3:
        raise Invalid(f"{where} is not a list of {MT_WORDS + 3} entries "
                      "(state words, position, version, gauss)")  # fmt: skip
    words, pos, version, gauss = py[:MT_WORDS], py[MT_WORDS], py[-2], py[-1]
    if not all(_is_int(w) and 0 <= w < 2**32 for w in words):
        raise Invalid(f"{where}: its first {MT_WORDS} entries are not 32-bit words")
    if not (_is_int(pos) and 0 <= pos <= MT_WORDS):
        raise Invalid(f"{where}: position {pos!r} is not in 0..{MT_WORDS}")
    if not _is_int(version) or version != random.Random().getstate()[0]:
        raise Invalid(f"{where}: version {version!r} is not this Python's")
    if gauss is not None and not (type(gauss) is float and math.isfinite(gauss)):
        raise Invalid(f"{where}: gauss {gauss!r} is neither None nor a finite float")
    try:
        random.Random().setstate((version, (*words, pos), gauss))
    except (TypeError, ValueError, OverflowError) as exc:
        raise Invalid(f"{where} is not a state of Python's random: {exc}") from None


def _numpy_rng(n: Any) -> None:
    where = "rng['numpy']"
    _keys(where, n, {"kind", "keys", "pos", "has_gauss", "gauss"})
    if n["kind"] != "MT19937":
        raise Invalid(f"{where}['kind'] is {n['kind']!r}, not 'MT19937'")
    keys = n["keys"]
    check_tensor(f"{where}['keys']", keys, (MT_WORDS,), torch.int64)
    if bool(((keys < 0) | (keys >= 2**32)).any()):
        raise Invalid(f"{where}['keys'] are not 32-bit words")
    if not (_is_int(n["pos"]) and 0 <= n["pos"] <= MT_WORDS):
        raise Invalid(f"{where}['pos'] {n['pos']!r} is not in 0..{MT_WORDS}")
    if not _is_int(n["has_gauss"]) or n["has_gauss"] not in (0, 1):
        raise Invalid(f"{where}['has_gauss'] {n['has_gauss']!r} is not 0 or 1")
    if not (type(n["gauss"]) is float and math.isfinite(n["gauss"])):
        raise Invalid(f"{where}['gauss'] {n['gauss']!r} is not a finite float")
    try:
        np.random.RandomState().set_state(
            ("MT19937", keys.numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
        )
    except (TypeError, ValueError) as exc:
        raise Invalid(f"{where} is not a NumPy generator state: {exc}") from None


# ------------------------------------------------------------------- recorder
_RECORDER_TYPES = {
    "rounds": list, "accuracy_matrix": list, "task_end": list, "accuracy_kind": str,
    "resumed": list, "handshakes": list, "provenance": dict, "shard_sizes": list,
    "untrained": dict,
}  # fmt: skip


def check_recorder(rec: Any, task: int, round_in_task: int, cfg: RunConfig, version: int) -> None:
    """The results so far: one round row per round done, one matrix row per task done."""
    from lorm_flwr.server.results import RunRecorder

    allowed = set(RunRecorder._STATE) | {"shard_sizes"}
    if not isinstance(rec, dict):
        raise Invalid(f"recorder is a {type(rec).__name__}, not a mapping")
    extra = sorted(map(repr, set(rec) - allowed))
    if extra and version >= 3:  # older formats held more, which a reader ignores
        raise Invalid(f"recorder holds unexpected keys {', '.join(extra[:3])}")
    for key in allowed & set(rec):
        kind = _RECORDER_TYPES.get(key)
        if kind is not None and not isinstance(rec[key], kind):
            raise Invalid(
                f"recorder[{key!r}] is a {type(rec[key]).__name__}, not a {kind.__name__}"
            )
    for key in ("rounds", "task_end", "resumed", "handshakes"):
        if not all(isinstance(row, dict) for row in rec.get(key, [])):
            raise Invalid(f"recorder[{key!r}] holds entries that are not mappings")
    r, n = cfg.rounds_per_task, cfg.num_tasks
    if "rounds" in rec:
        done = [(k, i) for k in range(task) for i in range(r)]
        done += [(task, i) for i in range(round_in_task)]
        rows = [(row.get("task"), row.get("round_in_task")) for row in rec["rounds"]]
        if rows != done:
            raise Invalid(f"recorder['rounds'] holds {len(rows)} rounds that are not the "
                          f"{len(done)} rounds before task {task} round {round_in_task}")  # fmt: skip
    for key in ("accuracy_matrix", "task_end"):
        if key in rec and len(rec[key]) != task:
            raise Invalid(f"recorder[{key!r}] has {len(rec[key])} rows; {task} tasks are done")
    for row in rec.get("accuracy_matrix", []):
        if not (isinstance(row, list) and len(row) == n and all(
            v is None or (type(v) in (int, float)) for v in row
        )):  # fmt: skip
            raise Invalid(f"recorder['accuracy_matrix'] has a row that is not {n} numbers or None")
    sizes = rec.get("shard_sizes", [])
    if not all(isinstance(s, list) and all(_is_int(v) and v >= 0 for v in s) for s in sizes):
        raise Invalid("recorder['shard_sizes'] is not lists of sample counts")
    provenance = rec.get("provenance", {})
    if provenance and not isinstance(provenance.get("flower_run_ids"), list):
        raise Invalid("recorder['provenance'] has no list of flower_run_ids")
    if not isinstance(provenance.get("resumed_with", []), list):
        raise Invalid("recorder['provenance']['resumed_with'] is not a list")


# ------------------------------------------------------------------- strategy
def check_strategy(
    state: Any, template: Mapping[str, Any], layout, cfg: RunConfig, task: int,
    round_in_task: int, version: int,
) -> None:  # fmt: skip
    """The strategy's state has the keys of a fresh one's (``template``): its task, and
    LoRM's cross-task history of one entry per task done, per adapted layer."""
    ignored = frozenset({"rounds"}) if version == 1 else frozenset()  # format 1's round log
    _keys("strategy", state, set(template), ignored)
    # Saved after a round of ``task``, or (round 0) after the end of task - 1.
    expected = task - 1 if round_in_task == 0 and task > 0 else task
    if not _is_int(state["task"]) or state["task"] != expected:
        raise Invalid(f"strategy['task'] is {state['task']!r}; at task {task} round "
                      f"{round_in_task} it is {expected}")  # fmt: skip
    for key, value in template.items():
        if key == "history":
            _check_history(state["history"], layout, cfg, done=task)
        elif key != "task" and type(state[key]) is not type(value):
            raise Invalid(f"strategy[{key!r}] is a {type(state[key]).__name__}, "
                          f"not a {type(value).__name__}")  # fmt: skip


def _check_history(history: Any, layout, cfg: RunConfig, done: int) -> None:
    from lorm_flwr.wire import PayloadError, check_gram

    _keys("strategy['history']", history, {layer.name for layer in layout.layers})
    for layer in layout.layers:
        where = f"strategy['history'][{layer.name!r}]"
        h = history[layer.name]
        _keys(where, h, set(HISTORY_FIELDS))
        k, r, d = layer.d_in, layer.rank, layer.d_out
        for name, shape in (("scaled_bs", (d, r)), ("a_mats", (r, k)), ("a_grams", (r, k))):
            items = h[name]
            if not isinstance(items, list) or len(items) != done:
                raise Invalid(
                    f"{where}[{name!r}] is not a list of {done} tensors (one per task done)"
                )
            for i, t in enumerate(items):
                check_tensor(f"{where}[{name!r}][{i}]", t, shape, torch.float64)
        total, at = h["gram_total"], f"{where}['gram_total']"
        if done == 0:
            if total is not None:
                raise Invalid(f"{at} is set, but no task is done")
            continue
        check_tensor(at, total, (k,) if cfg.gram_alpha == 0 else (k, k), torch.float64)
        try:  # a sum of checked Grams is one: non-negative, symmetric, PSD
            check_gram(0, at, total)
        except PayloadError as exc:
            raise Invalid(str(exc).partition(": ")[2]) from None


# ---------------------------------------------------------------------- all
def _this_run(cfg: RunConfig):
    """The global tensors this run starts from, its layout and a fresh strategy's state:
    the server's own model (:func:`~lorm_flwr.runtime.model_of`, cached, so the run
    builds nothing twice)."""
    from lorm_flwr.models.adapters import get_tensors, model_layout
    from lorm_flwr.registry import strategy_class
    from lorm_flwr.runtime import model_of

    model = model_of(cfg)
    layout = model_layout(model)
    return get_tensors(model), layout, strategy_class(cfg.strategy)(cfg, layout).state_dict()


def check_fields(checkpoint, cfg: RunConfig) -> None:
    """Every field of ``checkpoint`` (a :class:`~lorm_flwr.server.checkpoint.Checkpoint` whose
    config matches ``cfg``) against this run; :class:`Invalid` names the first wrong one."""
    c = checkpoint
    check_schedule(c.task, c.round_in_task, cfg)
    if type(c.elapsed_seconds) not in (int, float) or not (
        math.isfinite(c.elapsed_seconds) and c.elapsed_seconds >= 0
    ):
        raise Invalid(f"elapsed_seconds={c.elapsed_seconds!r} is not a finite number >= 0")
    check_rng(c.rng)
    check_recorder(c.recorder, c.task, c.round_in_task, cfg, c.version)
    expected, layout, template = _this_run(cfg)
    _keys("tensors", c.tensors, set(expected))
    for key, ref in expected.items():
        check_tensor(f"tensors[{key!r}]", c.tensors[key], tuple(ref.shape), ref.dtype)
    check_strategy(c.strategy, template, layout, cfg, c.task, c.round_in_task, c.version)
