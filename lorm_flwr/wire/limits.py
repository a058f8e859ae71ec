"""Message sizes, known from the model's shapes before anything is sent.

Every message of a run has fixed tensor shapes (they depend on the strategy, the
round kind and the adapter layout, never on data), so the ServerApp computes
them all before the first round, records them in ``results.json`` and refuses
to start a run whose messages would exceed the limit: Flower's gRPC limit by
default, or ``max-message-mb``. The error names the largest tensor and the
run-config key that shrinks it, instead of a gRPC failure mid-run.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.common import GRPC_MAX_MESSAGE_LENGTH

from lorm_flwr import wire

__all__ = [
    "BYTES_PER_FLOAT",
    "MessageTooLarge",
    "check_message_sizes",
    "check_reply_size",
    "max_message_bytes",
    "message_shapes",
    "nbytes",
]

BYTES_PER_FLOAT = 4  # tensors travel as fp32

Shapes = Mapping[str, tuple[int, ...]]


def max_message_bytes(cfg) -> int:
    """The largest message allowed: ``max-message-mb``, or Flower's gRPC limit when 0 (the
    config stays free of Flower, so the limit is read here, on the wire's side)."""
    if cfg.max_message_mb <= 0:
        return int(GRPC_MAX_MESSAGE_LENGTH)
    return min(int(cfg.max_message_mb * 2**20), int(GRPC_MAX_MESSAGE_LENGTH))


class MessageTooLarge(ValueError):
    """A message would exceed the size limit; says which tensor and how to shrink it."""


def _npy_header_bytes(shape: tuple[int, ...]) -> int:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}
    )
    return len(buffer.getvalue())


def nbytes(shapes: Shapes) -> int:
    """Bytes of an ArrayRecord of fp32 tensors of these shapes, exactly as Flower counts
    them (``ArrayRecord.count_bytes``: each key, plus each array's ``.npy`` bytes)."""
    return sum(
        len(key.split("/", 1)[-1]) + _npy_header_bytes(s) + BYTES_PER_FLOAT * math.prod(s)
        for key, s in shapes.items()
    )


def message_shapes(strategy) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor shapes of every message one client sends or receives, by message name.

    ``round R down``/``round R up`` for each round kind (rounds alternate with a
    period of at most 2), and ``end-of-task down/up`` for a strategy with task-end
    statistics (LoRM). Keys are ``record/key``, as the replies carry them. A round's
    down message is its largest one (with ``lorm-round-grams=mean-delta``, the last
    task's, which carries every past task's factors).
    """
    down = {
        f"{wire.ARRAYS}/{k}": tuple(s) for k, s in strategy.shared(strategy.layout.shapes).items()
    }
    task_end_down = dict(down)
    cfg = strategy.cfg
    last = cfg.num_tasks - 1
    if getattr(cfg, "lorm_reference_grams", False):  # the last task's mean-delta model
        for layer in strategy.layout.layers:
            rank = layer.rank * cfg.num_tasks
            task_end_down[f"{wire.ARRAYS}/{layer.a_key}"] = (rank, layer.d_in)
            task_end_down[f"{wire.ARRAYS}/{layer.b_key}"] = (layer.d_out, rank)
    # LoRM with lorm-round-grams=mean-delta also sends the past tasks' factors with each
    # round, most at the last task: count that, the largest round message.
    if getattr(cfg, "lorm_round_grams", "trained") == "mean-delta" and last > 0:
        for layer in strategy.layout.layers:
            cols = layer.rank * last
            down[f"{wire.PAST_TASKS}/{wire.gram_key(layer.name, wire.PAST_B)}"] = (
                layer.d_out,
                cols,
            )
            down[f"{wire.PAST_TASKS}/{wire.gram_key(layer.name, wire.PAST_A)}"] = (cols, layer.d_in)
    plans = {
        f"round {r}": strategy.instructions(r) for r in range(min(strategy.cfg.rounds_per_task, 2))
    }
    if strategy.task_grams != wire.GRAMS_NONE:
        plans["end-of-task"] = wire.Instructions(task=0, grams=strategy.task_grams)
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, plan in plans.items():
        spec = strategy.reply_spec(plan)
        up = {f"{wire.ARRAYS}/{k}": tuple(s) for k, s in (spec.arrays or {}).items()}
        up.update({f"{wire.GRAMS}/{k}": s for k, s in (spec.grams or {}).items()})  # packed kept
        out[f"{name} down"] = task_end_down if name == "end-of-task" else down
        out[f"{name} up"] = up
    return out


def _remedy(key: str, cfg) -> str:
    layer = key.split("/")[-1].rpartition("|")[0]
    if key.endswith("|" + wire.G) and layer.startswith(wire.HEAD_MODULES):
        return "set head-gram-alpha=0 to send the head Gram's diagonal only"
    if key.endswith(("|" + wire.G, "|" + wire.AG)):
        return (
            f"set gram-alpha=0 (now {cfg.gram_alpha}) so clients send Gram diagonals (d_in floats "
            "instead of the upper triangle's d_in (d_in + 1) / 2), or adapt fewer layers with lora-targets"
        )
    if key.endswith("|" + wire.DG):
        return "regmean sends a dense d_out x d_in product per layer: adapt fewer layers with lora-targets, or use lorm"
    return f"use a lower lora-rank (now {cfg.lora_rank}) or fewer layers with lora-targets"


def _shape_text(shape: tuple[int, ...]) -> str:
    side = getattr(shape, "side", None)  # a symmetric statistic's upper triangle
    return f"{tuple(shape)}, the upper triangle of {side}x{side}," if side else str(tuple(shape))


def check_message_sizes(strategy, limit_bytes: int) -> dict[str, int]:
    """Bytes of every message (see :func:`message_shapes`); raise if one exceeds ``limit_bytes``."""
    shapes = message_shapes(strategy)
    sizes = {name: nbytes(s) for name, s in shapes.items()}
    for name, size in sizes.items():
        if size <= limit_bytes:
            continue
        key, shape = max(shapes[name].items(), key=lambda kv: math.prod(kv[1]))
        raise MessageTooLarge(
            f"each client's '{name}' message would be {size / 2**20:.1f} MiB, over the "
            f"{limit_bytes / 2**20:.1f} MiB limit (max-message-mb, or Flower's gRPC limit when 0). "
            f"Its largest tensor is {key} {_shape_text(shape)} "
            f"({BYTES_PER_FLOAT * math.prod(shape) / 2**20:.1f} MiB): {_remedy(key, strategy.cfg)}"
        )
    return sizes


def check_reply_size(content: RecordDict, cfg) -> None:
    """A client's last check before replying (the server checked the shapes already):
    the reply's bytes as Flower counts them against the limit; names the largest array."""
    limit, size = max_message_bytes(cfg), wire.record_bytes(content)
    if size <= limit:
        return
    arrays = {
        f"{name}/{key}": len(array.data)
        for name, record in content.items()
        if isinstance(record, ArrayRecord)
        for key, array in record.items()
    }
    key = max(arrays, key=arrays.__getitem__)
    raise MessageTooLarge(
        f"this reply would be {size / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB limit; its "
        f"largest tensor is {key} ({arrays[key] / 2**20:.1f} MiB): {_remedy(key, cfg)}"
    )
