"""The reply checks: a reply holds exactly what its spec declares, or it is rejected.

:func:`decode_reply` checks a whole reply against its :class:`~lorm_flwr.wire.codecs.ReplySpec`
(records, keys, shapes before loading, dtypes, finiteness, metrics, PSD Grams) and
raises :class:`~lorm_flwr.wire.codecs.PayloadError` naming the node and the reason;
only a :class:`Reply` that passed reaches a merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from lorm_flwr.math.symmetric import PackedShape, unpack_upper
from lorm_flwr.wire.codecs import PayloadError, ReplySpec, Shapes, evaluation_keys
from lorm_flwr.wire.keys import (
    ARRAYS,
    CORRECT,
    GRAMS,
    MAX_EXAMPLES,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    SYMMETRIC_PARTS,
    TOTAL,
)
from lorm_flwr.wire.packing import npy_header

__all__ = [
    "PSD_TOLERANCE",
    "Reply",
    "check_gram",
    "decode_evaluation",
    "decode_hello",
    "decode_metrics",
    "decode_reply",
    "decode_tensors",
]


# -------------------------------------------------------------------- replies
@dataclass(frozen=True)
class Reply:
    """A decoded and checked reply: only this reaches a merge."""

    node: int
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(self.metrics[NUM_EXAMPLES])


def _record(node: int, content: RecordDict, name: str, kind: type) -> object:
    record = content[name]
    if not isinstance(record, kind):
        raise PayloadError(
            f"node {node}: record '{name}' is a {type(record).__name__}, expected {kind.__name__}"
        )
    return record


def _check_records(node: int, content: RecordDict, expected: dict[str, type]) -> None:
    names = set(content.keys())
    if names != set(expected):
        raise PayloadError(
            f"node {node}: reply has records {sorted(names)}, expected {sorted(expected)}"
        )
    for name, kind in expected.items():
        _record(node, content, name, kind)


def decode_metrics(
    node: int, record: MetricRecord, keys: tuple[str, ...] | frozenset[str]
) -> dict[str, float]:
    """Exactly ``keys``, each a finite number >= 0 (every metric of ours is a count, a
    cross-entropy loss, a duration or an id); ``num-examples`` a positive integer."""
    if set(record.keys()) != set(keys):
        missing = sorted(set(keys) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(keys))
        raise PayloadError(f"node {node}: metrics missing {missing}, unexpected {extra}")
    out: dict[str, float] = {}
    for key in keys:
        value = record[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"node {node}: metric {key}={value!r} is not a number")
        if not math.isfinite(value):
            raise PayloadError(f"node {node}: metric {key}={value!r} is not finite")
        if value < 0:
            raise PayloadError(f"node {node}: metric {key}={value!r} is negative")
        out[key] = value
    n = out.get(NUM_EXAMPLES)
    if n is not None and (n != int(n) or not 0 < n <= MAX_EXAMPLES):
        raise PayloadError(f"node {node}: {NUM_EXAMPLES}={n!r} must be a positive integer")
    return out


def _check_header(node: int, key: str, data: bytes, shape: tuple[int, ...]) -> None:
    """The array's header says ``shape`` and its bytes hold exactly that many elements,
    checked before NumPy loads it (``np.load`` allocates what a header declares first)."""
    try:
        got, _, dtype, start = npy_header(data)
    except ValueError as exc:
        raise PayloadError(f"node {node}: {key} cannot be decoded ({exc})") from None
    if got != shape:
        raise PayloadError(f"node {node}: {key} has shape {got}, expected {shape}")
    if len(data) - start != math.prod(shape) * dtype.itemsize:
        raise PayloadError(
            f"node {node}: {key} holds {len(data) - start} bytes; shape {shape} of {dtype} "
            f"needs {math.prod(shape) * dtype.itemsize}"
        )


def decode_tensors(
    node: int, record: ArrayRecord, expected: Shapes, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Exact key set and shapes, a float dtype, finite values; cast to ``dtype`` (the
    global tensors' dtype), still finite after the cast."""
    keys = set(record.keys())
    if keys != set(expected):
        missing = sorted(set(expected) - keys)[:3]
        extra = sorted(keys - set(expected))[:3]
        raise PayloadError(f"node {node}: wrong keys (missing {missing}, unexpected {extra})")
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        _check_header(node, key, record[key].data, tuple(shape))
        try:
            array = record[key].numpy()
        except Exception as exc:  # noqa: BLE001 - corrupt bytes, pickled objects, another serialisation
            raise PayloadError(f"node {node}: {key} cannot be decoded ({exc})") from None
        if array.dtype.kind != "f":  # (its shape is the header's, checked above)
            raise PayloadError(f"node {node}: {key} has dtype {array.dtype}, expected a float")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        if not _all_finite(tensor):
            raise PayloadError(f"node {node}: {key} holds NaN or Inf (as {dtype})")
        out[key] = tensor
    return out


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``. A NaN or Inf anywhere makes the sum non-finite, so
    a finite sum settles it (0.08 ms against 2.8 ms for ``isfinite().all()`` on 4M fp32
    numbers); only a non-finite sum, which finite values may also give by overflowing, is
    looked at element by element."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def decode_reply(
    msg: Message,
    spec: ReplySpec,
    dtype: torch.dtype = torch.float32,
    num_examples: int | None = None,
) -> Reply:
    """Check a whole reply against ``spec`` and decode it, or raise :class:`PayloadError`.

    ``num_examples``: the sample count this node must report (its shard size, which
    the server knows), so that no reply can claim another weight.
    """
    node = msg.metadata.src_node_id
    expected: dict[str, type] = {METRICS: MetricRecord}
    if spec.arrays is not None:
        expected[ARRAYS] = ArrayRecord
    if spec.grams is not None:
        expected[GRAMS] = ArrayRecord
    content = msg.content
    _check_records(node, content, expected)
    metrics = decode_metrics(node, content[METRICS], spec.metrics)
    if (
        num_examples is not None
        and NUM_EXAMPLES in metrics
        and metrics[NUM_EXAMPLES] != num_examples
    ):
        raise PayloadError(
            f"node {node}: {NUM_EXAMPLES}={metrics[NUM_EXAMPLES]!r}, but its shard has {num_examples}"
        )
    arrays = (
        decode_tensors(node, content[ARRAYS], spec.arrays, dtype) if spec.arrays is not None else {}
    )
    grams: dict[str, torch.Tensor] = {}
    if spec.grams is not None:
        grams = decode_tensors(node, content[GRAMS], spec.grams, torch.float32)
        for key, t in grams.items():
            shape = spec.grams[key]
            packed = isinstance(shape, PackedShape)
            if packed:
                grams[key] = t = unpack_upper(t, shape.side)
            if key.rsplit("|", 1)[-1] in SYMMETRIC_PARTS:
                check_gram(node, key, t, symmetric=packed)
    return Reply(node, arrays, grams, metrics)


# Negative eigenvalues up to this fraction of the trace are accepted as the round-off
# of fp32 Gram sums (a few ulps of lambda_max <= trace); a Gram more indefinite than
# that cannot be X X^T.
PSD_TOLERANCE = 1e-5


def check_gram(node: int, key: str, gram: torch.Tensor, *, symmetric: bool = False) -> None:
    """Reject a statistic that cannot be ``X X^T``.

    A diagonal ``(k,)`` must be non-negative; a full ``(k, k)`` one symmetric and
    positive semi-definite: the Cholesky factorisation of
    ``G + PSD_TOLERANCE * trace(G) * I`` (fp64) must succeed, which it does exactly
    when every eigenvalue is above ``-PSD_TOLERANCE * trace(G)``. Cost: one
    Cholesky per Gram, O(k^3 / 3) (see docs for the measured price).

    ``symmetric``: ``gram`` is exactly symmetric by construction (unpacked from its
    upper triangle), so the symmetry test and the averaging with its transpose, which
    would give back ``gram`` bit for bit, are skipped (over a third of the check's
    time at k = 1152).
    """
    g = gram.double()
    diag = g if g.dim() == 1 else torch.diagonal(g)
    trace = float(diag.clamp(min=0).sum())
    tol = PSD_TOLERANCE * trace + 1e-30
    if bool((diag < -tol).any()):
        raise PayloadError(f"node {node}: {key} has a negative diagonal entry (not PSD)")
    if g.dim() == 1:
        return
    if symmetric:
        shifted = g if g is not gram else g.clone()  # (a fp32 Gram's fp64 copy is our own)
    else:
        if not torch.allclose(g, g.T, rtol=1e-4, atol=tol):
            raise PayloadError(f"node {node}: {key} is not symmetric")
        shifted = (g + g.T) / 2
    shifted.diagonal().add_(tol)
    _, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        raise PayloadError(f"node {node}: {key} is not positive semi-definite")


def _counts(node: int, metrics: Mapping[str, float], keys: list[str]) -> list[int]:
    out = []
    for key in keys:
        value = metrics[key]
        if value != int(value) or value < 0:
            raise PayloadError(f"node {node}: {key}={value!r} must be a non-negative integer")
        out.append(int(value))
    return out


def decode_hello(msg: Message) -> tuple[int, int]:
    """A node's ``(partition-id, num-partitions)``, with ``0 <= partition-id < num-partitions``."""
    node = msg.metadata.src_node_id
    _check_records(node, msg.content, {METRICS: MetricRecord})
    metrics = decode_metrics(node, msg.content[METRICS], (PARTITION_ID, NUM_PARTITIONS))
    pid, num = _counts(node, metrics, [PARTITION_ID, NUM_PARTITIONS])
    if not 0 <= pid < num:
        raise PayloadError(f"node {node}: partition-id={pid} outside [0, num-partitions={num})")
    return pid, num


def decode_evaluation(
    msg: Message, task: int, totals: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """A personalised-evaluation reply: correct and total counts per seen task.

    Each count a non-negative integer, ``correct <= total``, and ``total`` the size
    of the node's test split of that task when the server knows it (``totals``).
    """
    node = msg.metadata.src_node_id
    _check_records(node, msg.content, {METRICS: MetricRecord})
    metrics = decode_metrics(node, msg.content[METRICS], evaluation_keys(task))
    correct = _counts(node, metrics, [CORRECT.format(t) for t in range(task + 1)])
    total = _counts(node, metrics, [TOTAL.format(t) for t in range(task + 1)])
    for t, (c, n) in enumerate(zip(correct, total)):
        if c > n:
            raise PayloadError(f"node {node}: task {t}: {c} correct out of {n}")
    if totals is not None and total != list(totals):
        raise PayloadError(
            f"node {node}: test counts {total}, but its test splits have {list(totals)}"
        )
    return correct, total
