"""Tokenisation of text data sets, once per process (no Flower).

Raw text becomes int32 token ids ``(N, L)`` with ``-1`` in padding positions, so
a batch is a plain array slice: the attention mask is ``ids >= 0``, training
never re-tokenises, and shards are index arrays as for images.
"""

from __future__ import annotations

import numpy as np

from lorm_flwr.data.datasets import LabelledData

__all__ = ["PAD", "encode", "encode_texts"]

PAD = -1  # marks a padding position in encoded ids


def encode_texts(texts: np.ndarray, tokenizer, max_length: int, chunk: int = 512) -> np.ndarray:
    """Strings ``(N,)`` or sentence pairs ``(N, 2)`` -> int32 ids ``(N, max_length)``, -1 = pad."""
    out = np.full((len(texts), max_length), PAD, dtype=np.int32)
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        args = (list(part[:, 0]), list(part[:, 1])) if part.ndim == 2 else (list(part),)
        enc = tokenizer(
            *args, truncation=True, max_length=max_length, padding="max_length",
            return_attention_mask=True, return_tensors="np",
        )  # fmt: skip
        ids = enc["input_ids"].astype(np.int32)
        ids[enc["attention_mask"] == 0] = PAD
        out[start : start + len(part)] = ids
    return out


def encode(data: LabelledData, tokenizer, max_length: int) -> LabelledData:
    """The same data set with its text replaced by token ids."""
    held = data.validation_x
    return LabelledData(
        encode_texts(data.train_x, tokenizer, max_length),
        data.train_y,
        encode_texts(data.test_x, tokenizer, max_length),
        data.test_y,
        data.class_names,
        None if held is None else encode_texts(held, tokenizer, max_length),
        data.validation_y,
    )
