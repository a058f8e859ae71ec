"""Instruction/response data for causal LMs (no Flower): the prompt template, the encoding
of pairs into one int32 array, and the GSM8K answer convention.

An encoded sample is ``BOS + prompt + response + EOS`` truncated to ``max_length``, right
padded with ``-1``. Prompt tokens are stored as ``-(id + 2)`` (so ``<= -2``) and response
tokens as ``id``, so one array says what the model reads (every token not ``-1``), where
the loss applies (the response, ``>= 0``) and where generation starts (after the last
prompt token).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np

from lorm_flwr.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "PAD",
    "PROMPT",
    "decode_ids",
    "encode_data",
    "encode_pairs",
    "final_answer",
    "is_exact_match",
    "prompt_ids",
    "response_mask",
]

PAD = -1
# Alpaca's no-input template, as the FedSA-LoRA reference's GSM8K runs use it.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's convention), commas removed, a trailing
    ``.0`` dropped; None when there is none."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def is_exact_match(generated: str, reference: str) -> bool:
    """Exact match of the final numeric answers (both must have one)."""
    want = final_answer(reference)
    return want is not None and final_answer(generated) == want


def encode_pairs(pairs: np.ndarray, tokenizer, max_length: int) -> np.ndarray:
    """``(N, 2)`` object array of (instruction, response) -> int32 ``(N, max_length)``
    (see the module docstring). A prompt longer than ``max_length - 1`` keeps its end
    (and so loses BOS); a response that does not fit is cut (EOS last of all)."""
    out = np.full((len(pairs), max_length), PAD, dtype=np.int32)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for i, (instruction, response) in enumerate(pairs):
        prompt = tokenizer(PROMPT.format(instruction=instruction), add_special_tokens=False)
        answer = tokenizer(str(response), add_special_tokens=False)
        head = ([bos] if bos is not None else []) + list(prompt["input_ids"])
        head = head[-(max_length - 1) :]  # at least one response token fits
        tail = (list(answer["input_ids"]) + [eos])[: max_length - len(head)]
        out[i, : len(head)] = -np.asarray(head, dtype=np.int64) - 2
        out[i, len(head) : len(head) + len(tail)] = tail
    return out


def encode_data(data, tokenizer, max_length: int):
    """A LabelledData of (instruction, response) pairs with every split encoded.

    A sample whose response ``max-length`` cuts is dropped (and counted in a warning):
    its stored answer would be a cut number, which exact match would score against.
    """
    out = {}
    for split in ("train", "test", "validation"):
        x, y = getattr(data, f"{split}_x"), getattr(data, f"{split}_y")
        if x is None:
            continue
        encoded = encode_pairs(x, tokenizer, max_length)
        whole = _ends_with(encoded, tokenizer.eos_token_id)
        if not whole.all():
            log.warning(
                "lorm-flwr: max-length=%d cuts the response of %d of %d %s samples; they are "
                "left out (give a larger max-length to keep them)",
                max_length, int((~whole).sum()), len(x), split,
            )  # fmt: skip
        if not whole.any():
            raise ConfigError(
                f"max-length={max_length} cuts the response of every {split} sample: give a "
                "larger max-length"
            )
        out[f"{split}_x"], out[f"{split}_y"] = encoded[whole], y[whole]
    return dataclasses.replace(data, **out)


def _ends_with(encoded: np.ndarray, eos: int) -> np.ndarray:
    """Which samples keep their whole response: the last real token is EOS."""
    length = (encoded != PAD).sum(axis=1)
    return encoded[np.arange(len(encoded)), np.maximum(length - 1, 0)] == eos


def response_mask(encoded: np.ndarray) -> np.ndarray:
    """Where the loss applies: the response tokens."""
    return encoded >= 0


def decode_ids(encoded: np.ndarray) -> np.ndarray:
    """Token ids of every position (``-1`` stays at padding)."""
    return np.where(encoded <= -2, -encoded - 2, encoded)


def prompt_ids(encoded_row: np.ndarray) -> list[int]:
    """The prompt's token ids of one encoded sample."""
    return [int(-t - 2) for t in encoded_row if t <= -2]
