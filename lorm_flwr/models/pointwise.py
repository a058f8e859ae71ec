"""Pointwise (1x1) convolutions as matrix products, for no-grad statistics passes.

A 1x1 convolution with stride 1 on a channels-last feature map is one matrix
product: the map ``(N, C, H, W)`` is already laid out as tokens ``(N*H*W, C)``,
and ``y = x W^T + b`` comes out laid out as ``(N, O, H, W)`` channels-last, with
no copy either way. On CPU, oneDNN's convolution is slow on maps of a few pixels.
In an ad-hoc timing (one thread, not a benchmark script), a 192 -> 1152 conv on
213 maps of 1x1 took 4.3 ms against 1.4 ms for the product, 320 -> 1280 7.2 ms
against 2.1 ms; on 2x2 maps the product took 0.65-0.86 of the conv's time, on
4x4 0.84-0.93; on 7x7 to 16x16 maps anywhere from 0.83 to 1.5 of it. Hence the
product is used only on CPU and on maps of at most ``_MAX_PIXELS`` pixels;
elsewhere the convolution runs as before.

Like the BatchNorm fold, it is only for passes that read activations: outputs
change by float rounding at most, and every module gets its own forward back
when the pass ends. Training does not use it.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_pointwise", "pointwise_as_matmul"]

_MAX_PIXELS = 16

_CONVS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Conv2d, ...]] = weakref.WeakKeyDictionary()


def is_pointwise(module: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (its own forward, not a subclass's) that is 1x1, stride 1, unpadded, ungrouped."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding in ((0, 0), "valid")
    )


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, as a matrix product where that is the faster way (see the module docstring)."""
    small = x.dim() == 4 and x.shape[2] * x.shape[3] <= _MAX_PIXELS
    if not (
        small and x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return nn.Conv2d.forward(conv, x)
    n, c, h, w = x.shape
    out_channels = conv.weight.shape[0]
    tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: channels-last is token-major
    y = F.linear(tokens, conv.weight.reshape(out_channels, c), conv.bias)  # (N*H*W, O)
    return y.view(n, h, w, out_channels).permute(0, 3, 1, 2)  # (N, O, H, W), channels-last


@contextmanager
def pointwise_as_matmul(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every pointwise conv of ``model`` runs as :func:`_forward`.

    The module list is found once per model object (the module tree of a
    backbone does not change between passes). Forward hooks still run: only
    each conv's own ``forward`` is shadowed by an instance attribute, removed
    on exit whatever happens.
    """
    convs = _CONVS.get(model)
    if convs is None:
        convs = tuple(m for m in model.modules() if is_pointwise(m))
        _CONVS[model] = convs
    if any("forward" in vars(m) for m in convs):
        raise RuntimeError(
            "pointwise_as_matmul is already active on this model (or a conv's forward was replaced)"
        )
    patched = []
    try:
        for m in convs:
            m.forward = partial(_forward, m)
            patched.append(m)
        yield model
    finally:
        for m in patched:
            del m.forward
