"""Every name on the wire, in one place: records, message types, Gram kinds and parts,
metrics. Plain constants (no Flower), shared by :mod:`lorm_flwr.wire` and the
client's statistics (:mod:`lorm_flwr.client.products`).
"""

from __future__ import annotations

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
GRAMS = "grams"
METRICS = "metrics"
# LoRM with lorm-round-grams=mean-delta, tasks t > 0: the past tasks' merged factors,
# f"{layer}|{PAST_B}" = [s B_0 ... s B_{t-1}] (d, t r) and f"{layer}|{PAST_A}" (t r, k).
PAST_TASKS = "past-tasks"
PAST_B = "sB"
PAST_A = "A"
# On the wire, an ArrayRecord of two or more arrays travels packed (lorm_flwr.wire.packing):
# one array PACKED, and beside it a ConfigRecord f"{record}{PACKED_LAYOUT}" with its layout.
PACKED = "packed"
PACKED_LAYOUT = ".layout"

# Message types of the two queries (train and evaluate use Flower's own types).
QUERY_HELLO = "query.hello"  # node -> partition-id / num-partitions
QUERY_TASK_GRAMS = "query.task_grams"  # end of task: Grams on the task's merged model

# Which Gram statistics a client replies with (``Instructions.grams``).
GRAMS_NONE = "none"
GRAMS_LORM_A = "lorm-a"  # A_i G_i and G_i per layer; W_i G_i and G_i for the head
GRAMS_LORM_B = "lorm-b"  # B_i A G_i A^T and A G_i A^T per layer; head as above
GRAMS_REGMEAN = "regmean"  # s B_i A_i G_i and G_i per layer; head as LoRM
GRAMS_TASK = "task"  # G_i per layer on the model sent (LoRM's end of task)
GRAM_KINDS = (GRAMS_NONE, GRAMS_LORM_A, GRAMS_LORM_B, GRAMS_REGMEAN, GRAMS_TASK)
# Kinds whose reply carries the products instead of the trained tensors (and the head's bias).
PRODUCT_KINDS = (GRAMS_LORM_A, GRAMS_LORM_B, GRAMS_REGMEAN)

# Keys in the ``grams`` record: f"{layer}|{part}" (see ``gram_key``).
G = "G"  # G_i, (k, k) or (k,) when the smoothing alpha is 0
AG = "AG"  # A_i G_i, (r, k)
BAGA = "BAGA"  # B_i A G_i A^T, (d, r)
AGA = "AGA"  # A G_i A^T, (r, r)
WG = "WG"  # head W_i G_i, (C, F)
DG = "DG"  # whole LoRA delta times Gram, s B_i A_i G_i, (d, k)
SYMMETRIC_PARTS = (G, AGA)  # must be X X^T of some X


# MetricRecord keys.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"  # local training time of this reply
GRAMS_SECONDS = "grams-seconds"  # Gram pass and products after training
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
CORRECT = "correct-task-{}"  # personalised evaluation: per seen task k
TOTAL = "total-task-{}"
TRAIN_METRICS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_SECONDS, GRAMS_SECONDS)

LOCAL_STATE = "lorm-flwr-local"  # context.state key of a client's own tensors
LOCAL_BEFORE = "lorm-flwr-local-before"  # ... as they were before the current round
LOCAL_ROUND = "lorm-flwr-local-round"  # ... which round that is (task, round in task)

# Largest sample count a reply may claim: float64 represents integers exactly up to here.
MAX_EXAMPLES = 2**53


def gram_key(layer: str, part: str) -> str:
    """The key of a Gram statistic: ``"{layer}|{part}"``, e.g. ``"blocks.0.mlp.fc1|AG"``."""
    return f"{layer}|{part}"
