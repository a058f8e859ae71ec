"""Fold frozen BatchNorm into the convolution before it, for no-grad passes.

In eval mode a BatchNorm after a convolution is a per-channel affine map, so
``bn(conv(x)) = conv'(x)`` with ``W' = diag(g) W`` and ``b' = g (b - mean) + beta``,
``g = gamma / sqrt(var + eps)``. Folding removes one memory-bound pass over
every feature map. On EfficientNet-Lite0 at 32 px, one thread, the client's
statistics passes take 1.03x (B-round), 1.13x (A-round) and 1.07x (end of task)
as long without it (``benchmarks/client_overhead.py --fold-ab 15``). It is only
for passes that read activations (Gram statistics): every layer's input stays
what it was, up to float rounding, and nothing is trained through the folded
weights.

Pairs are found on the model itself, not by module names: a probe forward on one
example records which BatchNorm receives *the very tensor* a convolution
returned. The fold is kept only when the probe's output is unchanged by it (a
convolution output that also fed another branch would show there). That check
runs once per model object; later passes only swap tensors in and out, because
a statistics pass runs every round and its forward is short.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["batchnorm_folded", "conv_bn_pairs"]

log = logging.getLogger(__name__)

# Relative to the probe output's largest magnitude: fp32 folding moves it by
# ~1e-6; a wrong fold moves it by O(1).
_PROBE_RTOL = 1e-4


def _foldable_norm(module: nn.Module) -> bool:
    """Plain BatchNorm2d, or timm's BatchNormAct2d (norm, then drop, then act), affine, with running stats."""
    plain = type(module) is nn.BatchNorm2d
    timm_act = (
        type(module).__name__ == "BatchNormAct2d"
        and hasattr(module, "act")
        and hasattr(module, "drop")
    )
    if not (plain or timm_act):
        return False
    return all(
        t is not None for t in (module.running_mean, module.running_var, module.weight, module.bias)
    )


def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(conv name, norm name)`` for every foldable norm whose input is a Conv2d's output.

    ``example`` is one model input batch (one sample is enough). A module met
    more than once in the forward (shared weights) is left out.
    """
    outputs: dict[int, tuple[torch.Tensor, str]] = {}  # holds the tensors, so ids stay unique
    pairs: list[tuple[str, str]] = []

    def on_conv(name):
        def hook(module, args, output):
            outputs[id(output)] = (output, name)

        return hook

    def on_norm(name):
        def hook(module, args):
            seen = outputs.get(id(args[0]))
            if seen is not None and seen[0] is args[0]:
                pairs.append((seen[1], name))

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv(name)))
        elif _foldable_norm(module):
            handles.append(module.register_forward_pre_hook(on_norm(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    convs = [c for c, _ in pairs]
    norms = [n for _, n in pairs]
    return [(c, n) for c, n in pairs if convs.count(c) == 1 and norms.count(n) == 1]


@dataclass
class _Fold:
    """One conv -> norm pair and what folding it swaps in."""

    conv: nn.Conv2d
    norm: nn.Module
    parent: nn.Module  # holds the norm as attribute ``child``
    child: str
    rest: nn.Module  # what stays of the norm: Identity, or its drop and act
    adapter: BaseTunerLayer | None  # the peft layer whose base the conv is, if any
    affine: tuple[torch.Tensor, torch.Tensor] | None = None  # (gain, shift)
    versions: tuple = ()

    def gain_shift(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``g`` as ``(C, 1, 1, 1)`` and ``beta - g * mean`` as ``(C,)``, in ``dtype``.

        Computed in fp64 and cached: recomputed only when a norm tensor changed in
        place (a frozen backbone's never do).
        """
        n = self.norm
        versions = (
            n.weight._version,
            n.bias._version,
            n.running_mean._version,
            n.running_var._version,
            dtype,
        )
        if self.affine is None or versions != self.versions:
            gain = n.weight.double() / torch.sqrt(n.running_var.double() + n.eps)
            shift = n.bias.double() - gain * n.running_mean.double()
            self.affine, self.versions = (
                (gain.view(-1, 1, 1, 1).to(dtype), shift.to(dtype)),
                versions,
            )
        return self.affine


@dataclass
class _Plan:
    folds: list[_Fold] = field(default_factory=list)


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _plan_of(model: nn.Module, example: torch.Tensor) -> _Plan:
    plan = _PLANS.get(model)
    if plan is not None:
        return plan
    if not any(_foldable_norm(m) for m in model.modules()):
        _PLANS[model] = plan = _Plan()
        return plan
    adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not all(m.merged for m in adapters):
        # The probe must see merged layers: an unmerged one hides its conv's output from the norm.
        raise RuntimeError(
            "fold BatchNorm only inside merged_for_inference: an adapter is not merged"
        )
    owner = {id(m.get_base_layer()): m for m in adapters}  # base conv -> its peft layer
    with torch.no_grad():
        reference = model(example).float()
    folds = []
    for conv_name, norm_name in conv_bn_pairs(model, example):
        parent_name, _, child = norm_name.rpartition(".")
        norm = model.get_submodule(norm_name)
        rest = nn.Identity() if type(norm) is nn.BatchNorm2d else nn.Sequential(norm.drop, norm.act)
        conv = model.get_submodule(conv_name)
        folds.append(
            _Fold(conv, norm, model.get_submodule(parent_name), child, rest, owner.get(id(conv)))
        )
    plan = _Plan(folds)
    with _applied(plan), torch.no_grad():
        folded = model(example).float()
    scale = float(reference.abs().max()) + 1e-12
    if not torch.allclose(folded, reference, rtol=0.0, atol=_PROBE_RTOL * scale):
        log.warning(
            "folding BatchNorm changed the model's output (max diff %.3g): statistics passes run unfolded",
            float((folded - reference).abs().max()),
        )
        plan = _Plan()
    _PLANS[model] = plan
    return plan


@contextmanager
def _applied(plan: _Plan) -> Iterator[None]:
    originals = []  # (fold, weight Parameter, bias Parameter or None): swapped back on exit, bit for bit
    try:
        with torch.no_grad():
            for f in plan.folds:
                if f.adapter is not None and not f.adapter.merged:
                    raise RuntimeError(
                        "fold BatchNorm only inside merged_for_inference: an adapter is not merged"
                    )
                w, b = f.conv.weight, f.conv.bias
                gain, shift = f.gain_shift(w.dtype)
                originals.append((f, w, b))
                if b is not None:
                    shift = shift + gain.view(-1) * b
                f.conv.weight = nn.Parameter(w * gain, requires_grad=False)
                f.conv.bias = nn.Parameter(shift, requires_grad=False)
                setattr(f.parent, f.child, f.rest)
        yield
    finally:
        for f, w, b in reversed(originals):
            f.conv.weight, f.conv.bias = w, b
            setattr(f.parent, f.child, f.norm)


@contextmanager
def batchnorm_folded(model: nn.Module, example: torch.Tensor) -> Iterator[nn.Module]:
    """Inside, each eval-mode BatchNorm that directly follows a Conv2d is folded into it.

    ``example``: a model input batch; its first sample is the probe the first
    time this model is folded. Must run in eval mode, inside
    :func:`~lorm_flwr.models.adapters.merged_for_inference` when the model has
    adapters (the fold scales the merged weight). On exit the original weight
    and bias tensors and modules are back in place. A model without BatchNorm
    is left alone at no cost.
    """
    if model.training:
        raise RuntimeError("folding BatchNorm needs eval mode (running statistics)")
    if model not in _PLANS and len(example) == 0:
        yield model  # nothing to probe with; an empty pass costs nothing anyway
        return
    with _applied(_plan_of(model, example[:1])):
        yield model
