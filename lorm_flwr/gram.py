"""Input Gram statistics of adapted layers, recorded with forward hooks (no Flower).

For a layer with inputs ``X: (k, n)`` (one column per token: every row of a
Linear input, every pixel of a 1x1-conv input) the recorder accumulates
``G = X X^T: (k, k)``, or only ``diag(G): (k,)``, plus the token count ``n``.
Per-batch products run in the activations' dtype promoted to at least fp32; the
running sums are fp64, so long passes lose nothing to round-off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["GramRecorder", "GramStats", "tokens_of"]


def tokens_of(x: torch.Tensor, is_conv: bool) -> torch.Tensor:
    """Layer input -> token matrix ``(n, k)``.

    Linear: ``(..., k)`` -> ``(prod(...), k)``. Conv (1x1): ``(N, k, H, W)`` -> ``(N*H*W, k)``.
    """
    if is_conv:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@dataclass
class GramStats:
    """Running sums for one layer: ``gram`` (k, k) or (k,), fp64; ``tokens`` counted."""

    diagonal: bool
    gram: torch.Tensor | None = None
    tokens: int = 0

    def add(self, tokens: torch.Tensor) -> None:
        t = tokens.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # never accumulate in fp16/bf16
        part = (t * t).sum(dim=0) if self.diagonal else t.T @ t  # (k,) or (k, k)
        part = part.to(torch.float64)
        self.gram = part if self.gram is None else self.gram.add_(part)
        self.tokens += int(t.shape[0])


@dataclass
class GramRecorder:
    """Forward hooks that accumulate the input Gram of chosen modules.

    ``modules`` maps a name to ``(module, is_conv)``. ``token_mask``, when set,
    returns a boolean ``(n,)`` mask of the tokens to keep for the current batch
    (e.g. to drop padding tokens of text inputs).
    """

    modules: dict[str, tuple[nn.Module, bool]]
    diagonal: bool = False
    token_mask: Callable[[], torch.Tensor | None] | None = None
    stats: dict[str, GramStats] = field(default_factory=dict)

    @contextmanager
    def recording(self) -> Iterable[GramRecorder]:
        handles = []
        for name, (module, is_conv) in self.modules.items():
            self.stats.setdefault(name, GramStats(self.diagonal))
            handles.append(module.register_forward_hook(self._hook(name, is_conv)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str, is_conv: bool):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            tokens = tokens_of(args[0], is_conv)  # (n, k)
            if self.token_mask is not None:
                mask = self.token_mask()
                if mask is not None:
                    tokens = tokens[mask.reshape(-1).to(tokens.device)]
            self.stats[name].add(tokens)

        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """Summed Grams by name (fp64, CPU); zeros for a module that saw no token."""
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
) -> tuple[dict[str, torch.Tensor], int]:
    """One no-grad pass over ``images``; smoothed Grams ``G~`` per target, and the token count.

    ``alphas[name]`` is the RegMean smoothing of that target: 0 records only the
    diagonal (and returns ``(k,)``), otherwise the full Gram is smoothed.
    """
    from lorm_flwr.merge import smooth_gram
    from lorm_flwr.train import batches

    diag_names = {n for n in targets if alphas[n] == 0.0}
    full = GramRecorder({n: t for n, t in targets.items() if n not in diag_names}, diagonal=False)
    diag = GramRecorder({n: t for n, t in targets.items() if n in diag_names}, diagonal=True)
    model.eval()
    with torch.no_grad(), full.recording(), diag.recording():
        for idx in batches(len(images), batch_size, shuffle=False):
            model(inputs(images[idx], device))
    grams = {**diag.grams(), **{n: smooth_gram(g, alphas[n]) for n, g in full.grams().items()}}
    return grams, len(images)
