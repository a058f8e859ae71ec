"""peft LoRA adapters on a :class:`~lorm_flwr.models.backbones.Classifier`.

peft does the layer surgery, the state dicts and the on-disk format. This module
adds what federation needs on top: a fixed *layout* of the adapted layers (names,
shapes, which tensor is A and which is B), named tensors in and out, and freezing
or re-initialising one factor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lorm_flwr.errors import ConfigError
from lorm_flwr.models.backbones import CausalLM, Classifier, SequenceClassifier
from lorm_flwr.models.layout import HEAD, AdaptedLayer, HeadLayer, ModelLayout, group_of

__all__ = [
    "ADAPTER_KINDS",
    "HEAD",
    "AdaptedLayer",
    "adapter_kind",
    "adapter_layout",
    "attach_lora",
    "fresh_factors",
    "get_tensors",
    "group_of",
    "head_layers",
    "head_module",
    "head_module_of_layer",
    "merged_for_inference",
    "model_layout",
    "reset_lora",
    "set_tensors",
    "set_trainable",
]

ADAPTER = "default"
ADAPTER_KINDS = ("lora", "rslora", "vera")
# Strategies that train another peft adapter than plain LoRA (the rest: "lora").
ADAPTER_OF_STRATEGY: dict[str, str] = {"fedsa-rslora": "rslora", "fedsa-vera": "vera"}


def adapter_kind(strategy: str) -> str:
    """The peft adapter a strategy trains: ``lora``, ``rslora`` or ``vera``."""
    return ADAPTER_OF_STRATEGY.get(strategy, "lora")


def _layer_names(model: nn.Module) -> str:
    """The names (last path part) of the layers LoRA can adapt, for error messages."""
    leaf = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }
    return ", ".join(sorted(leaf))


def _targeted(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def check_lora_rank(model: nn.Module, targets: list[str], rank: int) -> None:
    """Raise :class:`~lorm_flwr.config.ConfigError` (naming ``lora-rank``) when ``rank`` exceeds the smallest
    dimension of an adapted layer: a Linear's ``min(d_in, d_out)``, a convolution's
    ``min(c_in * kh * kw / groups, c_out)``. Past it the factors are no longer low rank
    and, for absurd values, peft's allocation of A ``(r, k)`` fails with a raw allocator
    error instead of this message."""
    smallest: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not _targeted(name, targets):
            continue
        if isinstance(module, nn.Linear):
            dim = min(module.in_features, module.out_features)
        elif isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * math.prod(module.kernel_size) // module.groups
            dim = min(fan_in, module.out_channels)
        else:
            continue
        if smallest is None or dim < smallest[0]:
            smallest = (dim, name)
    if smallest is not None and rank > smallest[0]:
        raise ConfigError(
            f"lora-rank={rank} is invalid: the smallest adapted layer, {smallest[1]}, has "
            f"dimension {smallest[0]}; give lora-rank <= {smallest[0]} (or fewer lora-targets)"
        )


def head_module(model: nn.Module) -> str | None:
    """The name of ``model``'s head, trained in full (peft ``modules_to_save``); None for a
    causal LM, whose output layer is adapted (or frozen) like any other."""
    if isinstance(model, CausalLM):
        return None
    return SequenceClassifier.HEAD if isinstance(model, SequenceClassifier) else HEAD


def _saved(model: nn.Module) -> list[str] | None:
    head = head_module(model)
    return None if head is None else [head]


def attach_lora(
    model: Classifier | SequenceClassifier | CausalLM,
    *,
    rank: int,
    alpha: float,
    targets: list[str],
    use_rslora: bool = False,
    kind: str = "lora",
    seed: int = 0,
    dropout: float = 0.0,
) -> PeftModel:
    """Wrap ``model`` with a peft adapter on ``targets``; a classifier's head is trained in
    full (a causal LM has none).

    LoRA's A is drawn from ``seed`` (peft's Kaiming-uniform scheme) and B is zero (an
    embedding's LoRA the other way round: A zero, B normal, as peft draws it), so the
    adapter is a pure function of its arguments in any process.

    ``kind``: ``lora``, ``rslora`` (LoRA with scaling alpha / sqrt(r)) or ``vera``
    (frozen random projections drawn from ``seed``, identical on every client, and
    trainable vectors; peft's VeRA adapts Linear layers only). The backbone stays
    frozen; the adapter and the head (peft ``modules_to_save``) are trainable.
    ``dropout``: peft's ``lora_dropout`` (``vera_dropout``) on the adapter's input,
    active only while training (:func:`lorm_flwr.train.train_local`).
    Raises ``ValueError`` with the available module names when no target matches.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {kind!r} unknown; allowed: {ADAPTER_KINDS}")
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:  # peft would adapt the others and drop these without a word
        raise ValueError(
            f"lora-targets={','.join(targets)!r}: {', '.join(unmatched)} matches no module of this "
            f"backbone; layer names: {_layer_names(model)}"
        )
    head = head_module(model)
    head_path = "model." + head if isinstance(model, SequenceClassifier) else head
    in_head = sorted(
        n for n in names
        if head_path and (n == head_path or n.startswith(head_path + "."))
        and any(n == t or n.endswith("." + t) for t in targets)
    )  # fmt: skip
    if in_head:  # peft would wrap the head's own layers in LoRA inside modules_to_save
        raise ValueError(
            f"lora-targets={','.join(targets)!r} also matches the head ({', '.join(in_head)}), "
            "which is trained in full; name the backbone's layers more precisely (for "
            "example output.dense instead of dense)"
        )
    if kind == "vera":
        from peft import VeraConfig

        if not any(
            isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
            for n, m in model.named_modules()
        ):
            raise ValueError(
                f"VeRA adapts Linear layers only, and lora-targets={','.join(targets)!r} "
                "names none in this backbone; use a ViT or text backbone"
            )
        config = VeraConfig(
            r=rank,
            target_modules=targets,
            modules_to_save=_saved(model),
            projection_prng_key=seed,
            save_projection=True,
            vera_dropout=dropout,
        )
    else:
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=targets,
            modules_to_save=_saved(model),
            use_rslora=use_rslora or kind == "rslora",
            lora_dropout=dropout,
            bias="none",
        )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(
            f"lora-targets={','.join(targets)!r} matched no supported layer ({exc}); "
            f"layer names in this backbone: {_layer_names(model)}"
        ) from exc
    if kind != "vera":
        # peft draws A from the global RNG, which differs between processes: the
        # server and every client must start from the same A, and runs must repeat.
        reset_lora(peft_model, seed)
    return peft_model.eval()


def _key(peft_key: str) -> str:
    # peft prefixes every key with "base_model.model."; drop it for readable messages.
    return peft_key.removeprefix("base_model.model.")


def _is_frozen_projection(peft_key: str) -> bool:
    # VeRA's shared random projections: drawn from a seed on every node, never sent.
    return peft_key.endswith(("vera_A", "vera_B"))


def get_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """All trainable adapter tensors (factors and head), detached CPU copies, by short key."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {
        _key(k): v.detach().to("cpu", copy=True)
        for k, v in state.items()
        if not _is_frozen_projection(k)
    }


def set_tensors(model: PeftModel, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load tensors (as returned by :func:`get_tensors`, any subset if not strict)."""
    expected = get_tensors_keys(model)
    unknown = set(tensors) - expected
    if unknown:
        raise KeyError(f"unknown adapter tensors: {sorted(unknown)[:5]}")
    if strict and set(tensors) != expected:
        raise KeyError(f"missing adapter tensors: {sorted(expected - set(tensors))[:5]}")
    if set(tensors) != expected:
        tensors = {**get_tensors(model), **tensors}  # peft loads whole adapters only
    full = {"base_model.model." + k: v for k, v in tensors.items()}
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    full.update({k: v for k, v in state.items() if _is_frozen_projection(k)})
    result = set_peft_model_state_dict(model, full, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"peft did not accept: {unexpected[:5]}")


# Per model object: its adapters are attached once and never change, and peft
# builds a whole state dict to list them, which a statistics pass did three times
# (the layout twice, the head keys once) before these caches.
_KEYS: weakref.WeakKeyDictionary[PeftModel, frozenset[str]] = weakref.WeakKeyDictionary()
_LAYOUTS: weakref.WeakKeyDictionary[PeftModel, tuple[AdaptedLayer, ...]] = (
    weakref.WeakKeyDictionary()
)
_MODEL_LAYOUTS: weakref.WeakKeyDictionary[PeftModel, ModelLayout] = weakref.WeakKeyDictionary()


def get_tensors_keys(model: PeftModel) -> set[str]:
    if model not in _KEYS:
        _KEYS[model] = frozenset(
            _key(k)
            for k in get_peft_model_state_dict(model, adapter_name=ADAPTER)
            if not _is_frozen_projection(k)
        )
    return set(_KEYS[model])


def adapter_layout(model: PeftModel) -> list[AdaptedLayer]:
    """The adapted Linear and 1x1-convolution layers in module order: the layers the Gram
    merges work on. LoRA of an embedding is not among them (its factors travel like any
    other A and B, see :func:`~lorm_flwr.models.layout.group_of`)."""
    if model not in _LAYOUTS:
        _LAYOUTS[model] = tuple(_layout(model))
    return list(_LAYOUTS[model])


def _layout(model: PeftModel) -> list[AdaptedLayer]:
    keys = get_tensors_keys(model)
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
            continue
        short = _key(name)
        a_key, b_key = f"{short}.lora_A.weight", f"{short}.lora_B.weight"
        if a_key not in keys or b_key not in keys:
            raise RuntimeError(f"peft state dict lacks the factors of {short}")
        a = module.lora_A[ADAPTER].weight
        b = module.lora_B[ADAPTER].weight
        is_conv = a.dim() == 4
        if is_conv and (a.shape[2:] != (1, 1) or b.shape[2:] != (1, 1)):
            raise ValueError(f"{short}: only 1x1 convolutions can be adapted, got {tuple(a.shape)}")
        layers.append(
            AdaptedLayer(
                name=short,
                a_key=a_key,
                b_key=b_key,
                d_in=int(a.shape[1]),
                d_out=int(b.shape[0]),
                rank=int(a.shape[0]),
                scaling=float(module.scaling[ADAPTER]),
                is_conv=is_conv,
            )
        )
    return layers


def model_layout(model: PeftModel) -> ModelLayout:
    """What the server and the wire codec need to know of ``model`` (cached per model)."""
    if model not in _MODEL_LAYOUTS:
        shapes = {k: tuple(v.shape) for k, v in get_tensors(model).items()}
        _MODEL_LAYOUTS[model] = ModelLayout(
            tuple(adapter_layout(model)), tuple(head_layers(model)), shapes
        )
    return _MODEL_LAYOUTS[model]


_TRAINED_COPY = ".modules_to_save." + ADAPTER  # peft's trainable copy of a head module


def head_layers(model: PeftModel) -> list[HeadLayer]:
    """The head's Linear layers in module order (input to output), with their keys in
    :func:`get_tensors`: the trainable copies peft keeps in ``modules_to_save``."""
    keys = get_tensors_keys(model)
    heads = []
    for name, module in model.named_modules():
        if _TRAINED_COPY not in name or not isinstance(module, nn.Linear):
            continue
        short = _key(name).replace(_TRAINED_COPY, "")
        weight, bias = f"{short}.weight", f"{short}.bias"
        if weight not in keys or bias not in keys:
            raise RuntimeError(
                f"head layer {short} lacks a weight or bias among {sorted(keys)[:5]}"
            )
        heads.append(HeadLayer(short, weight, bias))
    return heads  # empty for a causal LM


def head_module_of_layer(model: PeftModel, head: HeadLayer) -> nn.Module:
    """The Linear whose inputs a head layer sees: peft's trainable copy of it."""
    for name, module in model.named_modules():
        if _TRAINED_COPY in name and _key(name).replace(_TRAINED_COPY, "") == head.name:
            return module
    raise RuntimeError(f"no trainable copy of head layer {head.name}")


def set_trainable(
    model: PeftModel, *, train_a: bool, train_b: bool, train_head: bool = True
) -> None:
    """Choose which of A, B and the head receive gradients; the backbone never does."""
    on = {"A": train_a, "B": train_b}
    for name, p in model.named_parameters():
        key = _key(name)
        if _TRAINED_COPY + "." in key:  # peft's trainable copy of the head, not the original
            p.requires_grad_(train_head)
            continue
        try:
            group = group_of(key)
        except KeyError:  # a backbone weight
            group = ""
        p.requires_grad_(group != "head" and on.get(group, False))


def fresh_factors(layers: list[AdaptedLayer], seed: int) -> dict[str, torch.Tensor]:
    """Every A drawn Kaiming-uniform (peft's LoRA init) from ``seed``; every B zero.

    Pure function of the layout and the seed, so the server and every client get
    the same factors.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        a_shape = (layer.rank, layer.d_in) + ((1, 1) if layer.is_conv else ())
        b_shape = (layer.d_out, layer.rank) + ((1, 1) if layer.is_conv else ())
        a = torch.empty(a_shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        out[layer.a_key] = a
        out[layer.b_key] = torch.zeros(b_shape)
    return out


def reset_lora(model: PeftModel, seed: int) -> None:
    """Re-initialise every A from ``seed`` (see :func:`fresh_factors`); zero every B.
    LoRA on an embedding keeps peft's scheme (A zero, B standard normal), drawn from
    ``seed`` too."""
    set_tensors(model, initial_factors(model, seed), strict=False)


def initial_factors(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    """The LoRA factors :func:`reset_lora` sets, computed from ``model``'s layout alone
    (its current values are not read)."""
    tensors = fresh_factors(adapter_layout(model), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shapes = model_layout(model).shapes
    for key in sorted(shapes):
        if key.endswith(".lora_embedding_A"):
            tensors[key] = torch.zeros(shapes[key])
        elif key.endswith(".lora_embedding_B"):
            tensors[key] = torch.randn(shapes[key], generator=gen)
    return tensors


@contextmanager
def merged_for_inference(model: PeftModel) -> Iterator[PeftModel]:
    """Fold every adapter into its base weight for the duration of a no-grad pass.

    A merged layer is one convolution or matmul instead of three, and it lets
    :func:`~lorm_flwr.math.fold.batchnorm_folded` fold the BatchNorm after it.
    Its outputs equal the unmerged layer's up to float rounding. peft merges into
    a copy of each base weight (and bias), and on exit the original tensors are
    put back: bit for bit, and without peft's unmerge, which would recompute every
    delta and leave ``W + sBA - sBA`` round-off.
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.merged]
    originals = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            kept = {
                name: getattr(base, name)
                for name in ("weight", "bias")
                if getattr(base, name, None) is not None
            }
            originals.append((layer, base, kept))
            for name, p in kept.items():
                setattr(base, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        model.merge_adapter()
        yield model
    finally:
        for layer, base, kept in originals:
            for name, p in kept.items():
                setattr(base, name, p)
            layer.merged_adapters.clear()  # the merged copies are gone: the layer is unmerged
