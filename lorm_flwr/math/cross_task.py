"""LoRM across tasks: fold each task's merged layer into ``Delta W = R S^+``, kept low-rank.

Pure torch, no Flower. Per adapted layer, after task t,

    R = sum_{k<=t} s B_k A_k G_k,   S = sum_{k<=t} G_k,   Delta W = R S^+,

with ``G_k: (k, k)`` (or its diagonal) the sum over clients of task k's Grams on
the task's merged model. ``Delta W = B_cat A_cat`` with ``B_cat = [s B_0 ... s B_t]``
and ``A_cat = [A_0 G_0; ...; A_t G_t] S^+`` (:func:`~lorm_flwr.math.merge.cross_task_factors`),
a LoRA of rank (t+1) r: the dense delta is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from lorm_flwr.math.merge import cross_task_factors

Tensor = torch.Tensor

__all__ = ["TaskHistory", "fold_task", "mean_delta", "mean_delta_factors", "past_factors"]


@dataclass(frozen=True)
class TaskHistory:
    """What the server keeps of one layer across tasks (never a dense delta); fp64."""

    scaled_bs: list[Tensor] = field(default_factory=list)  # s B_k, (d, r)
    a_mats: list[Tensor] = field(default_factory=list)  # A_k, (r, k)
    a_grams: list[Tensor] = field(default_factory=list)  # A_k G_k, (r, k)
    gram_total: Tensor | None = None  # S = sum_k G_k, (k, k) or (k,)


def fold_task(
    history: TaskHistory, scaled_b: Tensor, a: Tensor, gram: Tensor, ridge: float = 0.0
) -> tuple[TaskHistory, Tensor, Tensor]:
    """Add task t to ``history``: ``R += s B_t A_t G_t``, ``S += G_t``.

    Parameters
    ----------
    scaled_b : (d, r), ``s B_t`` of the task's merged layer.
    a : (r, k), ``A_t``.
    gram : (k, k) or (k,), ``G_t``, fp64 (summed over the clients).

    Returns
    -------
    The new history, and ``B_cat: (d, R)``, ``A_cat: (R, k)`` (fp64) with
    ``B_cat A_cat = R S^+``, ``R = (t+1) r``.
    """
    a = a.double()
    a_gram = a * gram.unsqueeze(0) if gram.dim() == 1 else a @ gram
    total = gram if history.gram_total is None else history.gram_total + gram
    new = replace(
        history,
        scaled_bs=[*history.scaled_bs, scaled_b.double()],
        a_mats=[*history.a_mats, a],
        a_grams=[*history.a_grams, a_gram],
        gram_total=total,
    )
    b_cat, a_cat = cross_task_factors(new.scaled_bs, new.a_grams, total, ridge)
    return new, b_cat, a_cat


def mean_delta_factors(history: TaskHistory, scaled_b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of the mean delta over tasks so far, this one included (reference code).

    ``(sum_{k<=t} s B_k A_k) / (t+1) = B_cat A_cat`` with ``B_cat = [s B_0 ... s B_t] / (t+1)``
    and ``A_cat = [A_0; ...; A_t]``; ``scaled_b: (d, r)`` and ``a: (r, k)`` are task t's.
    Returns ``A_cat: (R, k)`` and ``B_cat: (d, R)``.
    """
    if not history.scaled_bs:
        return a, scaled_b
    past_b, past_a = past_factors(history)
    return mean_delta(past_b, past_a, scaled_b, a)


def past_factors(history: TaskHistory) -> tuple[Tensor, Tensor]:
    """The past tasks' merged factors side by side: ``[s B_0 ... s B_{t-1}]: (d, t r)`` and
    ``[A_0; ...; A_{t-1}]: (t r, k)``; the history must hold at least one task."""
    return torch.cat(history.scaled_bs, dim=1), torch.cat(history.a_mats, dim=0)


def mean_delta(
    past_b: Tensor, past_a: Tensor, scaled_b: Tensor, a: Tensor
) -> tuple[Tensor, Tensor]:
    """``W0 + (sum_{k<t} s B_k A_k + s B A) / (t+1)`` as factors (the reference's model).

    ``past_b: (d, t r)``, ``past_a: (t r, k)`` from :func:`past_factors` (t = ``past_a``'s
    rows / r); ``scaled_b: (d, r)``, ``a: (r, k)``. Returns ``A_cat: (R, k)`` and
    ``B_cat: (d, R)``, R = (t+1) r, in the dtype of ``scaled_b``.
    """
    tasks = past_a.shape[0] // a.shape[0] + 1
    b_cat = torch.cat([past_b.to(scaled_b.dtype), scaled_b], dim=1) / tasks
    a_cat = torch.cat([past_a.to(a.dtype), a], dim=0)
    return a_cat, b_cat
