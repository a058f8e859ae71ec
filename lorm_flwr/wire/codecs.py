"""The codecs of every message, declared once for both sides.

What the server sends (:class:`Instructions` in the ``config`` record, the global tensors
in ``arrays``), what a reply must hold (:class:`ReplySpec`, from :func:`train_reply_spec`),
and the records each side builds: tensors as ArrayRecords, metrics, the hello and
evaluation replies. The checks that hold a reply to its spec are
:mod:`lorm_flwr.wire.checks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from lorm_flwr.math.symmetric import PackedShape, pack_upper
from lorm_flwr.models.layout import ModelLayout
from lorm_flwr.wire.keys import (
    AG,
    AGA,
    ARRAYS,
    BAGA,
    CORRECT,
    DG,
    GRAM_KINDS,
    GRAMS,
    GRAMS_LORM_A,
    GRAMS_LORM_B,
    GRAMS_NONE,
    GRAMS_REGMEAN,
    GRAMS_TASK,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PAST_A,
    PAST_B,
    PAST_TASKS,
    PRODUCT_KINDS,
    TOTAL,
    TRAIN_METRICS,
    WG,
    G,
    gram_key,
)

Shapes = Mapping[str, tuple[int, ...]]


__all__ = [
    "Instructions",
    "PayloadError",
    "ReplySpec",
    "Shapes",
    "arrays_to_tensors",
    "decode_past_tasks",
    "evaluation_keys",
    "evaluation_reply",
    "gram_shapes",
    "hello_reply",
    "is_folder_name",
    "metrics_record",
    "pack_symmetric",
    "past_tasks_record",
    "record_bytes",
    "reply_content",
    "tensors_to_arrays",
    "train_reply_spec",
]


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


def is_folder_name(name: str) -> bool:
    """A bare folder name that ``export-to`` may carry (letters, digits, ``._-``)."""
    return bool(_FOLDER_NAME.fullmatch(name)) and name not in (".", "..")


def _folder_name(name: str) -> str:
    """A run folder's bare name: the client writes under its own output-dir, never
    elsewhere, whatever the server sends."""
    if name and (name in (".", "..") or not _FOLDER_NAME.fullmatch(name)):
        raise ValueError(f"export-to {name[:80]!r} is not a bare folder name")
    return name


def _split(name: str) -> str:
    if name not in ("test", "validation"):
        raise ValueError(f"split {name[:40]!r} is neither test nor validation")
    return name


_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


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
    # Personalised evaluation at the run's end: the run folder's name, under which the
    # client writes its own adapter (in its output-dir); "" otherwise.
    export_to: str = ""
    # Personalised evaluation: on the clients' shares of the test or the validation split.
    split: str = "test"

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
        if self.export_to:
            values["export-to"] = self.export_to
        if self.split != "test":
            values["split"] = self.split
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
                export_to=_folder_name(str(record.get("export-to", ""))),
                split=_split(str(record.get("split", "test"))),
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
    their shape is a :class:`~lorm_flwr.math.symmetric.PackedShape` ``(k (k + 1) / 2,)``.
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
        for head in layout.heads:
            c, f = layout.shapes[head.weight_key]
            shapes[gram_key(head.name, WG)] = (c, f)
            shapes[gram_key(head.name, G)] = (f,) if head_gram_alpha == 0 else PackedShape(f)
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
        bias = {h.bias_key: tuple(layout.shapes[h.bias_key]) for h in layout.heads}
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


def hello_reply(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict(
        {
            METRICS: MetricRecord(
                {PARTITION_ID: int(partition_id), NUM_PARTITIONS: int(num_partitions)}
            )
        }
    )


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
