"""Flower objects and bytes of each message one client sends or receives, as built and packed.

For each strategy on the default configuration (``--run-config`` style overrides with
``--set key=value``), every message kind of ``lorm_flwr.wire.limits.message_shapes`` is
built with random float32 tensors of its shapes (random, so that no two arrays share
an object id: Flower sends identical objects once), then packed as the exchange does
(``lorm_flwr.wire.packing``). Reported per message: arrays, the Flower objects a hop moves
(``get_all_nested_objects``: the message, its records, arrays and array chunks),
Flower's byte count (``count_bytes``), and the time to pack and unpack it.

    python benchmarks/wire_packing.py --out benchmarks/results/wire_packing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import model_of
from lorm_flwr.wire.limits import message_shapes
from lorm_flwr.wire.packing import pack_content, unpack_content

STRATEGIES = ("lorm", "fedit", "ffa", "fedsa", "regmean")
# Messages built outside a run read dummy run, node and task ids.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _content(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> RecordDict:
    records: dict[str, dict[str, Array]] = {}
    for name, shape in shapes.items():
        record, key = name.split("/", 1)
        records.setdefault(record, {})[key] = Array(rng.standard_normal(shape).astype(np.float32))
    content = RecordDict({r: ArrayRecord(a) for r, a in records.items()})
    content[wire.CONFIG] = ConfigRecord({"task": 0})  # as small as a real message's
    return content


def _objects(content: RecordDict) -> int:
    return len(get_all_nested_objects(Message(content, dst_node_id=1, message_type="train")))


def measure(strategy: str, overrides: dict[str, str]) -> list[dict]:
    cfg = RunConfig.from_mapping({"strategy": strategy, **overrides})
    layout = model_layout(model_of(cfg))
    rng = np.random.default_rng(0)
    rows = []
    for name, shapes in message_shapes(strategy_class(strategy)(cfg, layout)).items():
        if not shapes:
            continue
        content = _content(shapes, rng)
        start = time.perf_counter()
        packed = pack_content(content)
        pack_s = time.perf_counter() - start
        start = time.perf_counter()
        back = unpack_content(packed)
        unpack_s = time.perf_counter() - start
        assert wire.record_bytes(back) == wire.record_bytes(content)
        rows.append({
            "strategy": strategy, "message": name, "arrays": len(shapes),
            "objects_as_built": _objects(content), "objects_packed": _objects(packed),
            "bytes_as_built": wire.record_bytes(content), "bytes_packed": wire.record_bytes(packed),
            "pack_seconds": pack_s, "unpack_seconds": unpack_s,
        })  # fmt: skip
    return rows


def _override(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, value): numbers and booleans as JSON writes them, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--set", nargs="*", default=[], type=_override,
                   help="run-config overrides, key=value")  # fmt: skip
    p.add_argument("--out", default="")
    args = p.parse_args()
    overrides = dict(args.set)
    rows = [row for s in args.strategies for row in measure(s, overrides)]
    lines = [
        (
            "| strategy | message (one client) | arrays | Flower objects as built | packed "
            "| bytes as built | packed | pack + unpack (ms) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['message']} | {r['arrays']} | {r['objects_as_built']} | "
            f"{r['objects_packed']} | {r['bytes_as_built']:,} | {r['bytes_packed']:,} | "
            f"{1000 * (r['pack_seconds'] + r['unpack_seconds']):.1f} |"
        )
    print("\n".join(lines))
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
