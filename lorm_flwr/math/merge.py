"""Closed-form merges of linear layers from client input statistics.

Pure torch, no Flower. Every merge is a least-squares optimum of

    min_W  sum_i w_i * || W X_i - W_i X_i ||_F^2

for a layer's inputs ``X_i: (k, n_i)`` on client ``i``, expressed through the Gram
matrix ``G_i = X_i X_i^T: (k, k)`` (or only its diagonal, ``(k,)``). Only sums over
clients enter the solutions, so every merge has a ``*_from_sums`` form that takes
the already-summed statistics (what a secure-aggregation server would see).

Conventions
-----------
- Grams are either full ``(k, k)`` symmetric PSD tensors or diagonals ``(k,)``.
  A list passed to one merge must not mix the two.
- All solves run in float64; results come back in the dtype of the first input
  factor.
- ``ridge`` is relative: ``ridge * trace(S) / k`` is added to the diagonal of the
  summed Gram ``S``. With ``ridge=0`` the merge is the exact minimum-norm optimum
  (the pseudo-inverse solution), also when ``S`` is singular.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor
# The server's log (the ServerApp's handlers show it); merges log only when a fallback solves.
_log = logging.getLogger("flwr.lorm")

# Eigenvalues below this fraction of the largest are treated as zero. Client
# statistics are fp32 products summed in fp64 and shipped as fp32, so they are
# resolved to about 1e-7 relative: an eigenvalue below ~1e-6 * lambda_max is
# round-off (dead ReLU features, LayerNorm's exact null direction, fewer tokens
# than dimensions), and inverting it would amplify that round-off into the merged
# weights. Directions cut here carry under a millionth of the input energy, so
# the merged layer's outputs do not notice.
PINV_RCOND = 1e-6

__all__ = [
    "PINV_RCOND",
    "client_weights",
    "cross_task_factors",
    "fedavg_mean",
    "gram_sum",
    "merge_from_sums",
    "project_gram",
    "psd_solve_right",
    "regmean_head",
    "smooth_gram",
    "times_gram",
    "truncate_to_rank",
    "weighted_mean",
]


def client_weights(n: int, weights: Sequence[float] | Tensor | None) -> list[float]:
    """``n`` per-client weights as floats (all 1 for None); finite and non-negative."""
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} clients")
    if any(not torch.isfinite(torch.tensor(x)) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    return w


def smooth_gram(gram: Tensor, alpha: float) -> Tensor:
    """RegMean smoothing ``alpha * G + (1 - alpha) * diag(G)``.

    Parameters
    ----------
    gram : (k, k) full Gram, or (k,) diagonal (returned unchanged: a diagonal is
        its own smoothing for every alpha).
    alpha : in [0, 1]; 1 keeps G, 0 keeps only its diagonal.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if gram.dim() == 1 or alpha == 1.0:
        return gram
    diag = torch.diagonal(gram)
    if alpha == 0.0:
        return torch.diag(diag)
    out = gram * alpha
    out.diagonal().copy_(diag)
    return out


def gram_sum(grams: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``S = sum_i w_i G_i`` in float64; shape follows the inputs, (k, k) or (k,)."""
    w = client_weights(len(grams), weights)
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    for wi, g in zip(w, grams):
        total.add_(g.to(torch.float64), alpha=wi)
    return total


def _ridge(s: Tensor, ridge: float) -> float:
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0:
        return 0.0
    trace = s.sum() if s.dim() == 1 else torch.diagonal(s).sum()
    return ridge * float(trace) / s.shape[0]


def _divide_diag(rhs: Tensor, d: Tensor) -> Tensor:
    """``rhs @ pinv(diag(d))``, exactly: column j divided by ``d_j`` where ``d_j != 0``, zero
    where it is 0. A diagonal system has no round-off to guard against, so no cut-off:
    a low-energy feature keeps its (convex-combination) column. Entries that overflow
    (fp32, the global tensors' dtype), which sums from honest clients cannot produce
    (``|rhs_j| <= max|A| d_j``), are zero.
    """
    nonzero = d != 0
    out = torch.where(nonzero, rhs / torch.where(nonzero, d, torch.ones_like(d)), 0.0)
    # Finite as the fp32 global tensor it becomes, too.
    return torch.where(torch.isfinite(out.float()), out, 0.0)


def _pinv_diag(d: Tensor) -> Tensor:
    """Pseudo-inverse of eigenvalues: values below ``PINV_RCOND`` x the largest are round-off
    of a singular matrix's eigen-decomposition, and count as zero."""
    cutoff = PINV_RCOND * float(d.abs().max()) if d.numel() else 0.0
    safe = torch.where(d.abs() > cutoff, d, torch.ones_like(d))
    return torch.where(d.abs() > cutoff, 1.0 / safe, torch.zeros_like(d))


def _smallest_eigenvalue_bound(chol: Tensor, iters: int = 4, block: int = 4) -> float:
    """Upper bound on the smallest eigenvalue of ``S = L L^T`` by block inverse iteration.

    For a unit vector v, ``1 / ||S^-1 v|| >= lambda_min``. Each step costs two
    triangular solves, O(k^2 * block). A near-zero eigenvalue dominates the
    iteration within a step or two, so a singular matrix that Cholesky happened to
    factor is caught here.
    """
    k = chol.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(k, block, dtype=chol.dtype, generator=gen).to(chol.device)
    v = v / v.norm(dim=0, keepdim=True)
    bound = float("inf")
    for _ in range(iters):
        u = torch.linalg.solve_triangular(chol, v, upper=False)
        u = torch.linalg.solve_triangular(chol.mT, u, upper=True)  # S^-1 v
        norms = u.norm(dim=0)
        if not bool(torch.isfinite(norms).all()) or float(norms.min()) <= 0.0:
            return 0.0
        bound = min(bound, float(1.0 / norms.max()))
        v = u / norms
    return bound


def psd_solve_right(rhs: Tensor, s: Tensor, ridge: float = 0.0) -> Tensor:
    """Minimum-norm solution ``X = rhs @ pinv(S + ridge')`` for symmetric PSD ``S``.

    Parameters
    ----------
    rhs : (m, k), float64.
    s : (k, k) symmetric PSD, or (k,) for a diagonal S; float64.
    ridge : relative ridge, see the module docstring.

    Returns
    -------
    (m, k) float64. Uses a Cholesky solve when S is numerically positive definite
    (many times faster than an SVD on large k) and falls back to an eigenvalue
    pseudo-inverse with relative cut-off ``PINV_RCOND`` otherwise. A diagonal S is
    divided exactly (every nonzero entry, however small). Never NaN/Inf for finite
    inputs.
    """
    lam = _ridge(s, ridge)
    if s.dim() == 1:
        return _divide_diag(rhs, s + lam)
    k = s.shape[0]
    if lam:
        s = s + lam * torch.eye(k, dtype=s.dtype, device=s.device)
    # Cholesky and eigh read only the lower triangle: round-off asymmetry is harmless.
    lam_max_bound = float(torch.diagonal(s).sum())  # trace >= lambda_max for PSD
    if lam_max_bound <= 0.0:
        return torch.zeros_like(rhs)
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        lam_min = _smallest_eigenvalue_bound(chol)
        # lam_max >= trace / k, so this test only ever sends borderline cases to eigh.
        if lam_min > PINV_RCOND * lam_max_bound:
            return torch.cholesky_solve(rhs.T, chol).T
    try:
        evals, evecs = torch.linalg.eigh(s)
    except torch.linalg.LinAlgError:  # LAPACK's syevd did not converge: rare, never fatal
        return _solve_when_eigh_fails(rhs, s)
    inv = _pinv_diag(evals)
    return ((rhs @ evecs) * inv.unsqueeze(0)) @ evecs.T


def _solve_when_eigh_fails(rhs: Tensor, s: Tensor) -> Tensor:
    """``rhs @ pinv(S)`` when the eigendecomposition of ``S`` did not converge.

    ``pinv(c S) = pinv(S) / c``: retry on ``S`` scaled to unit largest entry and
    exactly symmetric, then with an SVD (a different LAPACK routine), and last with a
    ridge of ``PINV_RCOND`` (relative), whose Cholesky factorisation always exists for
    a PSD matrix. Only the runs that reach here change: they used to stop the server.
    """
    scale = float(s.abs().max())
    if not math.isfinite(scale) or scale <= 0.0:
        return torch.zeros_like(rhs)
    sn = (s + s.T) / (2.0 * scale)
    try:
        evals, evecs = torch.linalg.eigh(sn)
        _log.warning("merge: eigh did not converge; solved on the scaled system instead")
        return ((rhs @ evecs) * _pinv_diag(evals).unsqueeze(0)) @ evecs.T / scale
    except torch.linalg.LinAlgError:
        pass
    try:
        u, sv, vh = torch.linalg.svd(sn)
        _log.warning("merge: eigh did not converge; solved with an SVD instead")
        return ((rhs @ vh.T) * _pinv_diag(sv).unsqueeze(0)) @ u.T / scale
    except torch.linalg.LinAlgError:
        pass
    _log.warning(
        "merge: eigh and SVD did not converge; solved with a %.0e relative ridge", PINV_RCOND
    )
    k = sn.shape[0]
    ridge = PINV_RCOND * float(torch.diagonal(sn).sum()) / k + torch.finfo(sn.dtype).tiny
    chol = torch.linalg.cholesky(sn + ridge * torch.eye(k, dtype=sn.dtype, device=sn.device))
    return torch.cholesky_solve(rhs.T, chol).T / scale


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """``sum_i w_i T_i / sum_i w_i`` in float64, returned in the first input's dtype."""
    w = client_weights(len(tensors), weights)
    total = sum(w)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for wi, t in zip(w, tensors):
        acc.add_(t.to(torch.float64), alpha=wi / total)
    return acc.to(tensors[0].dtype)


def times_gram(m: Tensor, g: Tensor) -> Tensor:
    """``m @ G`` for a full ``(k, k)`` or diagonal ``(k,)`` Gram; m: (rows, k)."""
    return m * g.unsqueeze(0) if g.dim() == 1 else m @ g


def _anchored(product_sum: Tensor, gram_total: Tensor, anchor: Tensor | None) -> Tensor:
    """``M - anchor @ S``: moves the solve's origin to ``anchor``."""
    m = product_sum.to(torch.float64)
    if anchor is None:
        return m
    return m - times_gram(anchor.to(torch.float64), gram_total.to(torch.float64))


def merge_from_sums(
    product_sum: Tensor, gram_total: Tensor, ridge: float = 0.0, anchor: Tensor | None = None
) -> Tensor:
    """The least-squares merge of a linear map from client sums: ``X = M S^+``.

    Every closed-form step is this solve: LoRM's A-step (``M = sum_i A_i G_i``,
    ``S = sum_i G_i``), its B-step (``M = sum_i B_i A G_i A^T``, ``S = sum_i A G_i A^T``),
    RegMean of the head or of a whole delta (``M = sum_i W_i G_i``).

    Parameters
    ----------
    product_sum : (m, k), ``M = sum_i w_i X_i G_i``.
    gram_total : (k, k) or (k,), ``S = sum_i w_i G_i``.
    anchor : optional (m, k). Every minimiser differs only in directions that no
        client's inputs excite (the null space of S). Without an anchor the
        minimum-norm one is returned, ``M S^+`` (the paper's formula); with one,
        the minimiser closest to ``anchor``, ``anchor + (M - anchor S) S^+``, so
        that unexcited directions keep their current value instead of being zeroed.

    Returns
    -------
    (m, k) float64.
    """
    g = gram_total.to(torch.float64)
    out = psd_solve_right(_anchored(product_sum, g, anchor), g, ridge)
    return out if anchor is None else out + anchor.to(torch.float64)


def project_gram(A: Tensor, gram: Tensor) -> Tensor:
    """``A G A^T``: (r, r) Gram of the rank-r codes ``A X``; gram (k, k) or (k,)."""
    a = A.to(torch.float64)
    return times_gram(a, gram.to(torch.float64)) @ a.T


def cross_task_factors(
    scaled_bs: Sequence[Tensor],
    a_grams: Sequence[Tensor],
    gram_total: Tensor,
    ridge: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Low-rank factors of the cross-task merge ``Delta W = R S^+``.

    With ``R = sum_t B_t A_t G_t`` and ``S = sum_t G_t``,
    ``R S^+ = sum_t B_t (A_t G_t S^+) = B_cat @ A_cat``, a LoRA of rank
    ``sum_t r_t``; the dense ``(d, k)`` delta is never formed.

    Parameters
    ----------
    scaled_bs : per task, ``(d, r_t)`` up-projections with the LoRA scaling folded in.
    a_grams : per task, ``(r_t, k)`` products ``A_t G_t``.
    gram_total : ``S``, (k, k) or (k,).

    Returns
    -------
    ``B_cat: (d, R)`` and ``A_cat: (R, k)``, float64, ``R = sum_t r_t``.
    """
    if len(scaled_bs) != len(a_grams) or not scaled_bs:
        raise ValueError("need one (B, A G) pair per task, at least one")
    b_cat = torch.cat([b.to(torch.float64) for b in scaled_bs], dim=1)  # (d, R)
    ag_cat = torch.cat([ag.to(torch.float64) for ag in a_grams], dim=0)  # (R, k)
    a_cat = psd_solve_right(ag_cat, gram_total.to(torch.float64), ridge)  # (R, k)
    return b_cat, a_cat


def fedavg_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i (w_i / sum_j w_j) T_i`` with Flower FedAvg's arithmetic.

    As ``flwr``'s ``aggregate_arrayrecords``: the factors are Python floats, and each
    product and the running sum stay in the tensors' dtype (fp32 for LoRA factors),
    in client order. FedIT and FFA use it so that their numbers are FedAvg's.
    """
    w = client_weights(len(tensors), weights)
    total = sum(w)
    if total <= 0:
        raise ValueError("weights must not all be zero")
    acc = None
    for wi, t in zip(w, tensors):
        term = t.detach().cpu().numpy() * (wi / total)
        if acc is None:
            acc = term
        else:
            acc += term
    return torch.from_numpy(acc)


def regmean_head(
    weight_gram_sum: Tensor,
    gram_total: Tensor,
    biases: Sequence[Tensor],
    weights: Sequence[float],
    ridge: float = 0.0,
    anchor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The classifier head's merge: RegMean of the weight, weighted mean of the bias.

    Parameters
    ----------
    weight_gram_sum : (C, F), ``sum_i W_i G_i``.
    gram_total : (F, F) or (F,), ``sum_i G_i`` of the head's inputs.
    biases : per client, (C,).
    weights : per client, sample counts.

    Returns
    -------
    ``W: (C, F)`` float64 and ``b: (C,)`` in the biases' dtype.
    """
    return merge_from_sums(weight_gram_sum, gram_total, ridge, anchor), weighted_mean(
        biases, weights
    )


def truncate_to_rank(delta: Tensor, rank: int, scaling: float) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``delta: (d, k)`` with ``scaling * B @ A ~= delta``.

    Truncated SVD (Eckart-Young), the root of each singular value on either side.
    Returns ``B: (d, rank)``, ``A: (rank, k)`` (float64) and the relative Frobenius
    error ``||delta - scaling B A|| / ||delta||`` (0 for a zero delta).
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)
    b = u[:, :rank] * root  # (d, r)
    a = root[:, None] * vh[:rank]  # (r, k)
    total = float(torch.linalg.vector_norm(s))
    error = float(torch.linalg.vector_norm(s[rank:])) / total if total > 0 else 0.0
    return b, a, error
