"""An offline instruction data set the code builds itself: seeded arithmetic word problems
in GSM8K's ``#### answer`` format, and a tokenizer trained on them in code (no download).

Three kinds of problem (adding, taking away, doubling) with numbers 0-9; the kind is the
label that splits the data over clients (Dirichlet over kinds, as classes elsewhere).
The response shows the computation, then ``#### <answer>``.
"""

from __future__ import annotations

import functools
import random

import numpy as np

from lorm_flwr.data.instructions import PROMPT

__all__ = ["KINDS", "arithmetic_pairs", "arithmetic_tokenizer"]

KINDS = ("add", "take away", "double")
_NAMES = ("Ann", "Bob", "Cara", "Dev", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jon")
_THINGS = ("apples", "pens", "books", "cards", "shells", "coins", "stamps", "marbles")


def _problem(rng: random.Random, kind: int) -> tuple[str, str]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if kind == 0:
        question = (
            f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        )
        return question, f"{a}+{b}={a + b}\n#### {a + b}"
    if kind == 1:
        a, b = max(a, b), min(a, b)
        question = (
            f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have now?"
        )
        return question, f"{a}-{b}={a - b}\n#### {a - b}"
    question = f"{name} has {a} {thing}. A friend gives {name} as many again. How many {thing} now?"
    return question, f"{a}+{a}={2 * a}\n#### {2 * a}"


def arithmetic_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded problems: object array ``(n, 2)`` of (instruction, response) and their
    kinds ``(n,)`` int64 (balanced, shuffled)."""
    rng = random.Random(seed)
    kinds = np.array([i % len(KINDS) for i in range(n)], dtype=np.int64)
    rng.shuffle(kinds)  # type: ignore[arg-type]
    pairs = np.empty((n, 2), dtype=object)
    for i, kind in enumerate(kinds):
        pairs[i] = _problem(rng, int(kind))
    return pairs, kinds


@functools.lru_cache(maxsize=1)
def arithmetic_tokenizer():
    """A byte-level BPE tokenizer (400 tokens, digits kept single) trained in code on a fixed
    set of formatted problems: the same on every machine, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    pairs, _ = arithmetic_pairs(3000, seed=12345)
    corpus = [PROMPT.format(instruction=q) + r for q, r in pairs]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
