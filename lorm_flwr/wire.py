"""The wire: every message between ServerApp and ClientApps, declared once for both sides.

A message from the server holds:
  ``arrays``   ArrayRecord   the global tensors the client needs
  ``config``   ConfigRecord  the :class:`Instructions` (task, round, what trains, ...)
A reply holds exactly the records its :class:`ReplySpec` declares:
  ``arrays``   ArrayRecord   the tensors the client shares (absent when none)
  ``grams``    ArrayRecord   Gram statistics: Grams ``G`` and products with them
  ``metrics``  MetricRecord  ``num-examples`` and the round's training figures

The client builds its reply from the spec (:func:`train_reply_spec`); the server
decodes every reply against the same spec (:func:`decode_reply`), which rejects
anything else with a :class:`PayloadError` naming the node and the reason. Only
what the checks passed reaches a merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from lorm_flwr.keys import (  # noqa: F401 - re-exported: wire.ARRAYS, wire.gram_key, ...
    AG,
    AGA,
    ARRAYS,
    BAGA,
    CONFIG,
    CORRECT,
    DG,
    GRAM_KINDS,
    GRAMS,
    GRAMS_LORM_A,
    GRAMS_LORM_B,
    GRAMS_NONE,
    GRAMS_REGMEAN,
    GRAMS_SECONDS,
    GRAMS_TASK,
    LOCAL_BEFORE,
    LOCAL_ROUND,
    LOCAL_STATE,
    MAX_EXAMPLES,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PACKED,
    PACKED_LAYOUT,
    PARTITION_ID,
    PAST_A,
    PAST_B,
    PAST_TASKS,
    PRODUCT_KINDS,
    QUERY_HELLO,
    QUERY_TASK_GRAMS,
    SYMMETRIC_PARTS,
    TOTAL,
    TRAIN_LOSS,
    TRAIN_METRICS,
    TRAIN_SECONDS,
    WG,
    G,
    gram_key,
)
from lorm_flwr.layout import HEAD, ModelLayout
from lorm_flwr.packing import npy_header
from lorm_flwr.symmetric import PackedShape, pack_upper, unpack_upper

__all__ = [
    "ARRAYS",
    "CONFIG",
    "GRAMS",
    "METRICS",
    "Instructions",
    "PayloadError",
    "Reply",
    "ReplySpec",
    "arrays_to_tensors",
    "check_gram",
    "decode_past_tasks",
    "decode_reply",
    "gram_key",
    "gram_shapes",
    "pack_symmetric",
    "past_tasks_record",
    "record_bytes",
    "tensors_to_arrays",
    "train_reply_spec",
]

Shapes = Mapping[str, tuple[int, ...]]


class PayloadError(ValueError):
    """A reply does not have the expected content; the message names node and reason."""


# --------------------------------------------------------------- instructions
def _flag(record: ConfigRecord, key: str) -> bool:
    """A yes/no instruction: a bool, or its spelling ``"true"``/``"false"`` (any case).
    ``bool("false")`` would be True, so anything else is malformed."""
    value = record[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key}={value!r} is not true or false")


@dataclass(frozen=True)
class Instructions:
    """What the server asks of a client, for every kind of message it sends.

    ``rank``/``alpha`` describe the adapter sent when it is not the run's own
    (LoRM's end-of-task model, of rank (t+1) r); 0 means the run's.
    """

    task: int
    round_in_task: int = 0
    train_a: bool = False
    train_b: bool = False
    train_head: bool = False
    grams: str = GRAMS_NONE
    seed: int = 0
    local: frozenset[str] = frozenset()  # groups ("A", "B", "head") kept on the client
    rank: int = 0
    alpha: float = 0.0

    @property
    def trained(self) -> frozenset[str]:
        on = (("A", self.train_a), ("B", self.train_b), ("head", self.train_head))
        return frozenset(g for g, flag in on if flag)

    def to_config(self) -> ConfigRecord:
        values: dict[str, int | float | bool | str] = {
            "task": self.task,
            "round-in-task": self.round_in_task,
            "train-a": self.train_a,
            "train-b": self.train_b,
            "train-head": self.train_head,
            "grams": self.grams,
            "seed": self.seed,
            "rank": self.rank,
            "alpha": float(self.alpha),
        }
        if self.local:  # Flower cannot count the bytes of an empty string
            values["local"] = ",".join(sorted(self.local))
        return ConfigRecord(values)

    @classmethod
    def from_config(cls, record: ConfigRecord) -> Instructions:
        try:
            grams = str(record["grams"])
            if grams not in GRAM_KINDS:
                raise ValueError(f"unknown Gram statistics {grams!r}")
            return cls(
                task=int(record["task"]),
                round_in_task=int(record["round-in-task"]),
                train_a=_flag(record, "train-a"),
                train_b=_flag(record, "train-b"),
                train_head=_flag(record, "train-head"),
                grams=grams,
                seed=int(record["seed"]),
                local=frozenset(g for g in str(record.get("local", "")).split(",") if g),
                rank=int(record["rank"]),
                alpha=float(record["alpha"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PayloadError(f"the server's instructions are malformed: {exc}") from None


# ---------------------------------------------------------------- reply specs
@dataclass(frozen=True)
class ReplySpec:
    """The records of a valid reply: ``None`` means the record must be absent."""

    arrays: Shapes | None
    grams: Shapes | None
    metrics: tuple[str, ...] = (NUM_EXAMPLES,)


def gram_shapes(
    kind: str, layout: ModelLayout, gram_alpha: float, head_gram_alpha: float
) -> dict[str, tuple[int, ...]]:
    """Keys and wire shapes of the ``grams`` record of kind ``kind``.

    Symmetric statistics (full Grams, ``A G Aᵀ``) travel as their upper triangle:
    their shape is a :class:`~lorm_flwr.symmetric.PackedShape` ``(k (k + 1) / 2,)``.
    A Gram at smoothing 0 is its diagonal ``(k,)``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layout.layers:
        k, r, d = layer.d_in, layer.rank, layer.d_out
        gram = (k,) if gram_alpha == 0 else PackedShape(k)
        if kind == GRAMS_LORM_A:
            shapes[gram_key(layer.name, AG)] = (r, k)
            shapes[gram_key(layer.name, G)] = gram
        elif kind == GRAMS_LORM_B:
            shapes[gram_key(layer.name, BAGA)] = (d, r)
            shapes[gram_key(layer.name, AGA)] = PackedShape(r)
        elif kind == GRAMS_REGMEAN:
            shapes[gram_key(layer.name, DG)] = (d, k)
            shapes[gram_key(layer.name, G)] = gram
        elif kind == GRAMS_TASK:
            shapes[gram_key(layer.name, G)] = gram
        else:
            raise ValueError(f"no Gram statistics of kind {kind!r}")
    if kind in PRODUCT_KINDS:
        c, f = layout.shapes[layout.head_weight]
        shapes[gram_key(HEAD, WG)] = (c, f)
        shapes[gram_key(HEAD, G)] = (f,) if head_gram_alpha == 0 else PackedShape(f)
    return shapes


def train_reply_spec(
    layout: ModelLayout, plan: Instructions, gram_alpha: float, head_gram_alpha: float
) -> ReplySpec:
    """What a client must send back for ``plan`` (a train round or the end-of-task query).

    With Gram products the client sends them and the head's bias (the merges need
    only sums of products); otherwise the tensors it trained, less its local ones.
    """
    if plan.grams == GRAMS_TASK:
        return ReplySpec(None, gram_shapes(plan.grams, layout, gram_alpha, head_gram_alpha))
    if plan.grams in PRODUCT_KINDS:
        grams = gram_shapes(plan.grams, layout, gram_alpha, head_gram_alpha)
        bias = {layout.head_bias: tuple(layout.shapes[layout.head_bias])}
        return ReplySpec(bias, grams, TRAIN_METRICS)
    return ReplySpec(layout.keys_of(plan.trained - plan.local), None, TRAIN_METRICS)


# ------------------------------------------------------------------- records
def tensors_to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """CPU tensors -> ArrayRecord; bf16 (which ArrayRecord rejects) goes as fp32."""
    clean = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu")
        if v.dtype == torch.bfloat16:
            v = v.float()
        clean[k] = v.contiguous()
    return ArrayRecord(clean)


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Our own records (the server's messages, checkpoints); replies go through
    :func:`decode_reply`."""
    return dict(record.to_torch_state_dict())


def past_tasks_record(past: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> ArrayRecord:
    """The past tasks' factors, ``{layer: (past_b (d, t r), past_a (t r, k))}``, as a record."""
    tensors = {}
    for layer, (past_b, past_a) in past.items():
        tensors[gram_key(layer, PAST_B)] = past_b.float()
        tensors[gram_key(layer, PAST_A)] = past_a.float()
    return tensors_to_arrays(tensors)


def decode_past_tasks(
    content: RecordDict, layout: ModelLayout, task: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """The client's side of :func:`past_tasks_record`: None when the message has none;
    ``ValueError`` (``TypeError`` for another kind of record) unless it holds exactly every layer's two factors of task ``task``'s
    shapes, finite."""
    if PAST_TASKS not in content:
        return None
    if task < 1:
        raise ValueError(f"a '{PAST_TASKS}' record came with task {task}: it has no past tasks")
    record = content[PAST_TASKS]
    if not isinstance(record, ArrayRecord):
        raise TypeError(f"'{PAST_TASKS}' is a {type(record).__name__}, not an ArrayRecord")
    tensors = arrays_to_tensors(record)
    out, expected = {}, set()
    for layer in layout.layers:
        cols = layer.rank * task
        shapes = {PAST_B: (layer.d_out, cols), PAST_A: (cols, layer.d_in)}
        pair = []
        for part, shape in shapes.items():
            key = gram_key(layer.name, part)
            expected.add(key)
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape or not bool(torch.isfinite(t).all()):
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"'{PAST_TASKS}' entry {key}: {got}, expected finite {shape}")
            pair.append(t.float())
        out[layer.name] = (pair[0], pair[1])
    if extra := sorted(set(tensors) - expected):
        raise ValueError(f"'{PAST_TASKS}' has unexpected entries {extra[:3]}")
    return out


def record_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message's content, as Flower counts them."""
    return int(sum(rec.count_bytes() for rec in content.values()))


def metrics_record(values: Mapping[str, int | float]) -> MetricRecord:
    """A reply's metrics: the sample count as an int, everything else as a float."""
    return MetricRecord({k: int(v) if k == NUM_EXAMPLES else float(v) for k, v in values.items()})


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
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"node {node}: {key} holds NaN or Inf (as {dtype})")
        out[key] = tensor
    return out


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
            if isinstance(shape, PackedShape):
                grams[key] = t = unpack_upper(t, shape.side)
            if key.rsplit("|", 1)[-1] in SYMMETRIC_PARTS:
                check_gram(node, key, t)
    return Reply(node, arrays, grams, metrics)


# Negative eigenvalues up to this fraction of the trace are accepted as the round-off
# of fp32 Gram sums (a few ulps of lambda_max <= trace); a Gram more indefinite than
# that cannot be X X^T.
PSD_TOLERANCE = 1e-5


def check_gram(node: int, key: str, gram: torch.Tensor) -> None:
    """Reject a statistic that cannot be ``X X^T``.

    A diagonal ``(k,)`` must be non-negative; a full ``(k, k)`` one symmetric and
    positive semi-definite: the Cholesky factorisation of
    ``G + PSD_TOLERANCE * trace(G) * I`` (fp64) must succeed, which it does exactly
    when every eigenvalue is above ``-PSD_TOLERANCE * trace(G)``. Cost: one
    Cholesky per Gram, O(k^3 / 3) (see docs for the measured price).
    """
    g = gram.double()
    diag = g if g.dim() == 1 else torch.diagonal(g)
    trace = float(diag.clamp(min=0).sum())
    tol = PSD_TOLERANCE * trace + 1e-30
    if bool((diag < -tol).any()):
        raise PayloadError(f"node {node}: {key} has a negative diagonal entry (not PSD)")
    if g.dim() == 1:
        return
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


def hello_reply(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict(
        {
            METRICS: MetricRecord(
                {PARTITION_ID: int(partition_id), NUM_PARTITIONS: int(num_partitions)}
            )
        }
    )


def decode_hello(msg: Message) -> tuple[int, int]:
    """A node's ``(partition-id, num-partitions)``, with ``0 <= partition-id < num-partitions``."""
    node = msg.metadata.src_node_id
    _check_records(node, msg.content, {METRICS: MetricRecord})
    metrics = decode_metrics(node, msg.content[METRICS], (PARTITION_ID, NUM_PARTITIONS))
    pid, num = _counts(node, metrics, [PARTITION_ID, NUM_PARTITIONS])
    if not 0 <= pid < num:
        raise PayloadError(f"node {node}: partition-id={pid} outside [0, num-partitions={num})")
    return pid, num


def evaluation_keys(task: int) -> tuple[str, ...]:
    return (NUM_EXAMPLES,) + tuple(
        k for t in range(task + 1) for k in (CORRECT.format(t), TOTAL.format(t))
    )


def evaluation_reply(correct: list[int], total: list[int]) -> RecordDict:
    values: dict[str, int] = {NUM_EXAMPLES: max(sum(total), 1)}
    for k, (c, t) in enumerate(zip(correct, total)):
        values[CORRECT.format(k)] = int(c)
        values[TOTAL.format(k)] = int(t)
    return RecordDict({METRICS: MetricRecord(values)})


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


def reply_content(
    spec: ReplySpec,
    tensors: Mapping[str, torch.Tensor],
    grams: Mapping[str, torch.Tensor],
    metrics: Mapping[str, int | float],
) -> RecordDict:
    """A client's reply: exactly the records, keys and metrics of ``spec``.

    Raises ``ValueError`` when the client did not compute what the spec asks (a
    bug on this side, reported as the client's error instead of a bad payload).
    """
    content = RecordDict({METRICS: metrics_record({k: metrics[k] for k in spec.metrics})})
    if spec.arrays is not None:
        missing = sorted(set(spec.arrays) - set(tensors))
        if missing:
            raise ValueError(f"the reply needs tensors this client lacks: {missing[:3]}")
        content[ARRAYS] = tensors_to_arrays({k: tensors[k] for k in spec.arrays})
    if spec.grams is not None:
        if set(grams) != set(spec.grams):
            raise ValueError(
                f"computed Gram statistics {sorted(grams)[:3]}... differ from those asked, {sorted(spec.grams)[:3]}..."
            )
        content[GRAMS] = tensors_to_arrays(pack_symmetric(spec, grams))
    return content


def pack_symmetric(spec: ReplySpec, grams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The statistics as they travel: each one ``spec`` declares packed, as its upper
    triangle (the client computes full ``(k, k)`` matrices)."""
    out = {}
    for key, t in grams.items():
        shape = (spec.grams or {}).get(key)
        if isinstance(shape, PackedShape) and t.dim() == 2:
            if tuple(t.shape) != (shape.side, shape.side):
                raise ValueError(
                    f"{key}: computed {tuple(t.shape)}, asked for a {shape.side}-square"
                )
            t = pack_upper(t)
        out[key] = t
    return out
