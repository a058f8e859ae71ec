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

# One namespace for both sides (``from lorm_flwr import wire``; ``wire.decode_reply``):
# the names, the codecs and the checks, each kept in its own module.
from lorm_flwr.models.layout import HEAD, HEAD_MODULES  # noqa: F401 - the heads' tensor-key prefixes
from lorm_flwr.wire.checks import *
from lorm_flwr.wire.codecs import *
from lorm_flwr.wire.keys import (  # noqa: F401 - re-exported: wire.ARRAYS, wire.gram_key, ...
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
