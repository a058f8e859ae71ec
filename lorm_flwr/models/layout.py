"""What server and clients both know of the adapted model: layers, tensor keys, shapes.

Pure torch; no peft, no Flower. :func:`lorm_flwr.models.adapters.adapter_layout`
reads it off a peft model; the server builds its strategy on it, and the wire
codec declares every message's tensors from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["GROUPS", "HEAD", "HEAD_MODULES", "AdaptedLayer", "HeadLayer", "ModelLayout", "group_of"]

HEAD = "linear_head"  # unique suffix: peft matches modules_to_save by name suffix
# The trained-in-full heads (peft ``modules_to_save``): the image Classifier's one Linear,
# and the head of a transformers ``*ForSequenceClassification`` held by SequenceClassifier
# (``model.classifier``: RoBERTa's dense + out_proj, BERT's one Linear).
HEAD_MODULES = (HEAD, "model.classifier")

# Tensor-key fragment -> the part of the model it belongs to. VeRA's trainable
# vectors take the roles of the factors: ``vera_lambda_d`` (rank side, shared like
# A) and ``vera_lambda_b`` (output side, kept local like B).
GROUPS: tuple[tuple[str, str], ...] = (
    (".lora_A.", "A"),
    (".lora_embedding_A", "A"),  # LoRA of an embedding: A (r, vocab), B (dim, r)
    (".lora_embedding_B", "B"),
    (".vera_lambda_d", "A"),
    (".lora_B.", "B"),
    (".vera_lambda_b", "B"),
)


def group_of(key: str) -> str:
    """Which part of the model a tensor key belongs to: ``A``, ``B`` or ``head``."""
    if key.startswith(tuple(m + "." for m in HEAD_MODULES)):
        return "head"
    for fragment, group in GROUPS:
        if fragment in key:
            return group
    raise KeyError(f"tensor {key!r} is neither a LoRA/VeRA factor nor the head")


@dataclass(frozen=True)
class AdaptedLayer:
    """One LoRA-adapted layer: ``W0 + scaling * B @ A``, ``A: (r, d_in)``, ``B: (d_out, r)``.

    ``a_key``/``b_key`` are the keys of A and B among the adapter tensors. For 1x1
    convolutions the stored tensors are ``(r, d_in, 1, 1)`` and ``(d_out, r, 1, 1)``;
    :meth:`matrix` and :meth:`stored` convert between the two forms.
    """

    name: str  # module path inside the Classifier, e.g. "backbone.blocks.0.0.conv_pw"
    a_key: str
    b_key: str
    d_in: int
    d_out: int
    rank: int
    scaling: float
    is_conv: bool

    @staticmethod
    def matrix(t: torch.Tensor) -> torch.Tensor:
        """A stored factor as a matrix: ``(r, k, 1, 1) -> (r, k)``; 2-D tensors unchanged."""
        return t.reshape(t.shape[0], t.shape[1]) if t.dim() == 4 else t

    def stored(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``A: (R, k)``, ``B: (d, R)`` of any rank R in this layer's stored form, fp32."""
        if self.is_conv:
            return a[:, :, None, None].float(), b[:, :, None, None].float()
        return a.float(), b.float()


@dataclass(frozen=True)
class HeadLayer:
    """One Linear of the head, trained in full: ``y = W x + b``, ``W: (d_out, d_in)``.

    ``name`` is its module path (``linear_head``, or ``model.classifier.dense`` and
    ``model.classifier.out_proj`` for RoBERTa's head); its Gram statistics travel
    under that name, and the Gram-based merges combine each head Linear by RegMean
    on its own inputs.
    """

    name: str
    weight_key: str
    bias_key: str


@dataclass(frozen=True)
class ModelLayout:
    """The adapted layers, the head's Linear layers (input to output) and the shape of
    every adapter tensor."""

    layers: tuple[AdaptedLayer, ...]
    heads: tuple[HeadLayer, ...]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def num_classes(self) -> int:
        """Rows of the last head Linear's weight (0 for a model without a head)."""
        return int(self.shapes[self.heads[-1].weight_key][0]) if self.heads else 0

    def keys_of(self, groups: frozenset[str] | set[str]) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of the tensors in ``groups`` (``A``, ``B``, ``head``)."""
        return {k: tuple(s) for k, s in self.shapes.items() if group_of(k) in groups}
