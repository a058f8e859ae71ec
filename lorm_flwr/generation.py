"""Causal LMs on instruction data (pure torch and transformers; no Flower): the loss on the
response tokens, greedy generation from the prompts, and exact match of the final answer.

Inputs are encoded as :mod:`lorm_flwr.data.instructions` writes them: prompt tokens
``-(id + 2)``, response tokens ``id``, padding ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lorm_flwr.data.instructions import is_exact_match, prompt_ids

__all__ = ["GenerationScores", "response_loss", "score_generation"]


def response_loss(logits: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens only.

    ``logits: (B, L, V)`` for ``encoded: (B, L)``; position t predicts token t + 1, which
    counts when it is a response token (``>= 0``).
    """
    targets = encoded[:, 1:]
    counted = targets >= 0  # (B, L - 1)
    if not counted.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:, :-1][counted].float(), targets[counted])


@dataclass(frozen=True)
class GenerationScores:
    exact: np.ndarray  # (N,) bool: the generated final answer equals the reference's
    loss_sum: float  # summed response-token cross-entropy (teacher forced)
    tokens: int  # response tokens counted in loss_sum

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


@torch.no_grad()
def score_generation(
    peft_model,
    encoded: np.ndarray,
    tokenizer,
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> GenerationScores:
    """Greedy decoding (at most ``max_new_tokens``) from each sample's prompt, scored by
    exact match of the final ``#### answer`` against the sample's own response; plus the
    held-out loss on the responses. ``peft_model`` is a PeftModel over a
    :class:`~lorm_flwr.models.backbones.CausalLM`."""
    wrapper = peft_model.base_model.model  # the CausalLM, its layers carrying the adapters
    hf = wrapper.model
    pad = wrapper.pad_token_id
    peft_model.eval()
    exact = np.zeros(len(encoded), dtype=bool)
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        real = (rows != -1).any(axis=0)  # right padding: drop the all-padding columns
        rows = rows[:, : int(np.flatnonzero(real)[-1]) + 1 if real.any() else 1]
        x = torch.from_numpy(np.ascontiguousarray(rows)).long().to(device)
        logits = peft_model(x)
        targets = x[:, 1:]
        counted = targets >= 0
        if counted.any():
            loss_sum += float(
                F.cross_entropy(logits[:, :-1][counted].float(), targets[counted], reduction="sum")
            )
            tokens += int(counted.sum())
        prompts = [prompt_ids(r) for r in rows]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = hf.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        for i, row in enumerate(rows):
            generated = tokenizer.decode(out[i, width:].tolist(), skip_special_tokens=True)
            reference = tokenizer.decode([int(t) for t in row if t >= 0], skip_special_tokens=True)
            exact[start + i] = is_exact_match(generated, reference)
    return GenerationScores(exact, loss_sum, tokens)
