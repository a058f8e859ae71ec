"""The message protocol between ServerApp and ClientApps: every key in one place.

A train/query message from the server holds:
  ``arrays``  ArrayRecord  the global tensors the client needs
  ``config``  ConfigRecord the round's instructions (keys ``CFG_*`` below)
A reply holds:
  ``arrays``  ArrayRecord  the tensors the client shares
  ``stats``   ArrayRecord  input statistics (Gram sums or products), optional
  ``metrics`` MetricRecord ``num-examples`` and training metrics
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "STATS",
    "PayloadError",
    "arrays_to_tensors",
    "record_bytes",
    "tensors_to_arrays",
]

# Record names inside a RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
STATS = "stats"
METRICS = "metrics"

# ConfigRecord keys (server -> client).
CFG_SERVER_ROUND = "server-round"  # injected by Flower's FedAvg
CFG_TASK = "task"
CFG_ROUND_IN_TASK = "round-in-task"
CFG_TRAIN_A = "train-a"
CFG_TRAIN_B = "train-b"
CFG_TRAIN_HEAD = "train-head"
CFG_STATS = "stats"  # which statistics to reply with, see STATS_* below
CFG_SEED = "seed"
CFG_LOCAL = "local"  # comma-separated groups ("A", "B", "head") kept on the client
CFG_RANK = "rank"  # adapter rank of the tensors sent (end-of-task query)
CFG_ALPHA = "alpha"  # adapter alpha of the tensors sent

# What a client computes after training (value of CFG_STATS).
STATS_NONE = "none"
STATS_LORM_A = "lorm-a"  # A_i G_i and G_i per layer; W_i G_i and G_i for the head
STATS_LORM_B = "lorm-b"  # B_i A G_i A^T and A G_i A^T per layer; head as above
STATS_REGMEAN = "regmean"  # s B_i A_i G_i and G_i per layer; head as LoRM
STATS_GRAMS = "grams"  # G_i per layer and head, on the model as sent (end of task)

# Keys in the ``stats`` record: f"{layer}|{kind}" (see ``stat_key``).
STAT_AG = "AG"  # A_i G_i, (r, k)
STAT_G = "G"  # G_i, (k, k) or (k,) when gram-alpha = 0
STAT_BAGA = "BAGA"  # B_i A G_i A^T, (d, r)
STAT_AGA = "AGA"  # A G_i A^T, (r, r)
STAT_WG = "WG"  # head W_i G_i, (C, F)
STAT_DG = "DG"  # full LoRA delta times Gram, s B_i A_i G_i, (d, k)


def stat_key(layer: str, kind: str) -> str:
    return f"{layer}|{kind}"


# MetricRecord keys (client -> server).
MET_NUM_EXAMPLES = "num-examples"
MET_TRAIN_LOSS = "train-loss"
MET_TRAIN_SECONDS = "train-seconds"  # local training time of this reply
MET_STATS_SECONDS = "stats-seconds"  # Gram pass and products after training

# Query message types.
QUERY_HELLO = "query.hello"  # node -> partition-id / num-partitions
QUERY_TASK_STATS = "query.task_stats"  # end-of-task Grams on the merged model
MET_PARTITION_ID = "partition-id"
# Personalised evaluation (client -> server): per seen task k.
MET_CORRECT = "correct-task-{}"
MET_TOTAL = "total-task-{}"
LOCAL_STATE = "lorm-flwr-local"  # context.state key of a client's own tensors
MET_NUM_PARTITIONS = "num-partitions"


class PayloadError(ValueError):
    """A client reply does not have the expected content."""


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
    return dict(record.to_torch_state_dict())


def record_bytes(content: RecordDict) -> int:
    """Bytes of every record in a message's content, as Flower counts them."""
    return int(sum(rec.count_bytes() for rec in content.values()))


def reply_metrics(num_examples: int, **metrics: float) -> MetricRecord:
    values: dict[str, int | float] = {MET_NUM_EXAMPLES: int(num_examples)}
    values.update({k: float(v) for k, v in metrics.items()})
    return MetricRecord(values)


def num_examples(msg: Message) -> int:
    return int(msg.content[METRICS][MET_NUM_EXAMPLES])


def check_tensors(
    node: int,
    record: ArrayRecord,
    expected: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Validate a reply's tensors: exact key set, shapes, float dtype, finite values."""
    tensors = arrays_to_tensors(record)
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(expected))[:3]
        raise PayloadError(f"node {node}: wrong keys (missing {missing}, unexpected {extra})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise PayloadError(
                f"node {node}: {key} has shape {tuple(tensor.shape)}, expected {expected[key]}"
            )
        if not tensor.is_floating_point():
            raise PayloadError(f"node {node}: {key} has dtype {tensor.dtype}, expected float")
        if not torch.isfinite(tensor).all():
            raise PayloadError(f"node {node}: {key} holds NaN or Inf")
    return tensors


def check_gram(node: int, key: str, gram: torch.Tensor) -> None:
    """Reject a Gram that cannot be ``X X^T``: asymmetric, negative diagonal, or
    an entry above ``sqrt(G_ii G_jj)`` (Cauchy-Schwarz). O(k^2): cheap enough to
    run on every reply, and it catches corrupted or hand-crafted payloads.
    """
    g = gram.double()
    diag = g if g.dim() == 1 else torch.diagonal(g)
    scale = float(diag.abs().max()) if diag.numel() else 0.0
    tol = 1e-4 * scale + 1e-12
    if (diag < -tol).any():
        raise PayloadError(f"node {node}: {key} has a negative diagonal entry (not PSD)")
    if g.dim() == 2:
        if not torch.allclose(g, g.T, rtol=1e-4, atol=tol):
            raise PayloadError(f"node {node}: {key} is not symmetric")
        bound = torch.sqrt(diag.clamp(min=0).outer(diag.clamp(min=0)))
        if (g.abs() > bound * (1 + 1e-3) + tol).any():
            raise PayloadError(f"node {node}: {key} is not positive semi-definite")


def check_num_examples(node: int, msg: Message) -> int:
    try:
        n = msg.content[METRICS][MET_NUM_EXAMPLES]
    except KeyError:
        raise PayloadError(f"node {node}: reply has no '{MET_NUM_EXAMPLES}' metric") from None
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0 or n != int(n):
        raise PayloadError(f"node {node}: {MET_NUM_EXAMPLES}={n!r} must be a positive integer")
    return int(n)
