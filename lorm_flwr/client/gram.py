"""Input Gram statistics of adapted layers, recorded with forward hooks (no Flower).

For a layer with inputs ``X: (k, n)`` (one column per token: every row of a
Linear input, every pixel of a 1x1-conv input) the recorder accumulates
``G = X X^T: (k, k)``, or only ``diag(G): (k,)``, or, given a projection
``A: (r, k)``, only the code Gram ``A G A^T = (A X)(A X)^T: (r, r)``, plus the
token count ``n``. Per-batch products run in the activations' dtype promoted to
at least fp32 (the GEMM sums over the batch's tokens in that precision). Sums
over batches are fp64, so long passes lose nothing to round-off; a pass of one
batch keeps its product as it is, since casting a single fp32 result to fp64
adds no precision and costs two passes over every ``(k, k)`` Gram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["GramRecorder", "GramStats", "gram_of", "layer_grams", "tokens_of"]

# Above twice this width a Gram is computed as upper block rows and mirrored. On
# EfficientNet-Lite0's shapes (k = 144-1280, 213-13632 tokens, one thread) this took
# 6-28% less time than one GEMM on 9 of 11, up to 10% more on the other two; of the
# widths 32-128 tried, 64 was best overall (an ad-hoc timing, not a benchmark script).
_SYMMETRIC_BLOCK = 64


def tokens_of(x: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Layer input -> token matrix ``(n, k)``.

    Linear: ``(..., k)`` -> ``(prod(...), k)``. Conv (1x1): ``(N, k, H, W)`` -> ``(N*H*W, k)``.
    """
    if is_conv:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def gram_of(t: torch.Tensor) -> torch.Tensor:
    """``t^T t: (k, k)`` for tokens ``t: (n, k)``, computing only the upper block rows."""
    k = t.shape[1]
    if k <= 2 * _SYMMETRIC_BLOCK:
        return t.T @ t
    out = torch.empty(k, k, dtype=t.dtype, device=t.device)
    for i in range(0, k, _SYMMETRIC_BLOCK):
        j = min(i + _SYMMETRIC_BLOCK, k)
        row = t[:, i:j].T @ t[:, i:]  # (b, k - i): the diagonal block and everything right of it
        out[i:j, i:] = row
        out[j:, i:j] = row[:, j - i :].T
    return out


@dataclass
class GramStats:
    """Running sums for one layer and the token count: fp64 once two batches are added.

    ``gram`` is ``(k, k)``; or ``(k,)`` when ``diagonal``; or ``(r, r)`` when a
    ``projection`` ``A: (r, k)`` is set (the Gram of the codes ``A x``).
    """

    diagonal: bool
    projection: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    tokens: int = 0

    def add(self, tokens: torch.Tensor) -> None:
        t = tokens.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # never accumulate in fp16/bf16
        # The hooks run inside the forward's autocast, which would run these products in
        # half precision (t.float() does not stop it): entries above 65504 would be inf.
        with torch.autocast(device_type=t.device.type, enabled=False):
            if self.projection is not None:
                t = t @ self.projection.to(device=t.device, dtype=t.dtype).T  # (n, r) codes
            part = (t * t).sum(dim=0) if self.diagonal else gram_of(t)  # (k,) or (k, k)
        if self.gram is None:
            self.gram = part
        else:  # from the second batch on, the running sum is fp64
            self.gram = self.gram.to(torch.float64).add_(part)
        self.tokens += int(t.shape[0])


@dataclass
class GramRecorder:
    """Forward hooks that accumulate the input Gram of chosen modules.

    ``modules`` maps a name to ``(module, is_conv)``. ``token_mask``, when set,
    returns a boolean ``(n,)`` mask of the tokens to keep for the current batch
    (e.g. to drop padding tokens of text inputs); it applies to the modules in
    ``masked`` (all when None), not to e.g. a head that sees one pooled vector per
    sample. ``projections`` maps some names to ``A: (r, k)``: those record
    ``A G A^T`` instead of ``G``.
    """

    modules: dict[str, tuple[nn.Module, bool]]
    diagonal: bool = False
    token_mask: Callable[[], torch.Tensor | None] | None = None
    projections: dict[str, torch.Tensor] = field(default_factory=dict)
    masked: frozenset[str] | None = None
    stats: dict[str, GramStats] = field(default_factory=dict)

    @contextmanager
    def recording(self) -> Iterable[GramRecorder]:
        handles = []
        for name, (module, is_conv) in self.modules.items():
            self.stats.setdefault(name, GramStats(self.diagonal, self.projections.get(name)))
            handles.append(module.register_forward_hook(self._hook(name, is_conv)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, is_conv: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            tokens = tokens_of(args[0], is_conv)  # (n, k)
            if self.token_mask is not None and (self.masked is None or name in self.masked):
                mask = self.token_mask()
                if mask is not None:
                    tokens = tokens[mask.reshape(-1).to(tokens.device)]
            self.stats[name].add(tokens)

        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """Summed Grams by name, on CPU: fp64 over several batches, fp32 (or fp64 input's) over one."""
        out = {}
        for name, s in self.stats.items():
            if s.gram is None:
                raise RuntimeError(f"no input reached {name}: was the recorder used?")
            out[name] = s.gram.cpu()
        return out


def layer_grams(
    model: nn.Module,
    targets: dict[str, tuple[nn.Module, bool]],
    images,
    *,
    inputs,
    batch_size: int,
    device: torch.device,
    alphas: dict[str, float],
    projections: dict[str, torch.Tensor] | None = None,
    unmasked: frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], int]:
    """One no-grad pass over ``images``; smoothed Grams ``G~`` per target, and the token count.

    ``alphas[name]`` is the RegMean smoothing of that target: 0 records only the
    diagonal (and returns ``(k,)``), otherwise the full Gram is smoothed. For a
    target in ``projections`` (``A: (r, k)``) the result is ``A G~ A^T: (r, r)``,
    recorded as the codes' Gram ``(A X)(A X)^T`` (plus ``diag(G)`` when alpha < 1),
    so the ``(k, k)`` Gram is never formed: a LoRM B-round needs only that.

    For encoded text, padding positions never enter a Gram, except for targets
    in ``unmasked`` (the head: one pooled vector per sample, no padding).
    """
    from lorm_flwr.math.merge import project_gram, smooth_gram
    from lorm_flwr.train import batches, padding_mask

    projections = projections or {}
    need_diag = {n for n in targets if alphas[n] < 1.0 and (alphas[n] == 0.0 or n in projections)}
    need_codes = {n for n in projections if alphas[n] > 0.0}
    need_full = {n for n in targets if alphas[n] > 0.0 and n not in projections}
    batch_mask: list[torch.Tensor | None] = [None]
    masked = frozenset(targets) - unmasked
    common = {"token_mask": lambda: batch_mask[0], "masked": masked}
    full = GramRecorder({n: targets[n] for n in need_full}, **common)
    diag = GramRecorder({n: targets[n] for n in need_diag}, diagonal=True, **common)
    codes = GramRecorder(
        {n: targets[n] for n in need_codes},
        projections={
            n: projections[n].detach().to(device=device, dtype=torch.float32) for n in need_codes
        },
        **common,
    )
    if model.training:  # eval() walks every module; statistics passes run each round
        model.eval()
    with torch.no_grad(), full.recording(), diag.recording(), codes.recording():
        for idx in batches(len(images), batch_size, shuffle=False):
            x = inputs(images[idx], device)
            batch_mask[0] = padding_mask(x)
            model(x)
    full_g, diag_g, codes_g = full.grams(), diag.grams(), codes.grams()
    grams: dict[str, torch.Tensor] = {}
    for n in targets:
        a = alphas[n]
        if n in projections:
            A = projections[n].to(torch.float64)
            g = a * codes_g[n] if a > 0.0 else 0.0
            if a < 1.0:
                g = g + (1.0 - a) * project_gram(A, diag_g[n])
            grams[n] = g
        elif a == 0.0:
            grams[n] = diag_g[n]
        else:
            grams[n] = smooth_gram(full_g[n], a)
    return grams, len(images)
