"""Local training and evaluation loops (pure torch; no Flower).

Images stay uint8 in memory and are resized and normalised per batch, so a
224-px data set never needs a float copy of the whole array.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorm_flwr.generation import response_loss

__all__ = [
    "InputSpec",
    "TokenInputs",
    "TrainStats",
    "autocast",
    "batches",
    "evaluate_accuracy",
    "padding_mask",
    "pick_device",
    "predict",
    "to_device",
    "train_local",
]


# The reference's evaluation transform for 224-px ViTs: resize to 256, center-crop 224.
CENTER_CROP_RATIO = 224 / 256


@dataclass(frozen=True)
class InputSpec:
    """How raw uint8 images become backbone inputs.

    ``augment`` (training and its Gram passes): per image, drawn from torch's global
    generator (seeded by the caller), ``augmentation``: ``random-resized-crop`` (to
    ``image_size``, scale (0.08, 1), ratio (3/4, 4/3), bicubic, as the LoRM reference's
    CIFAR-100 and ImageNet-R), ``random-crop`` (resize to ``image_size / 0.875``
    bicubic, a random ``image_size`` crop: its CUB-200) or ``flip`` (the plain resize
    alone: its Cars-196); each then a random horizontal flip. ``center_crop`` (evaluation): resize to
    ``image_size / 0.875`` (bicubic) and take the center ``image_size`` square, the
    reference's 256 -> 224 at 224 px. Otherwise images of another size are resized
    with ``interpolation``: ``bilinear`` (no antialiasing) or ``bicubic`` (antialiased
    and clamped, as PIL's bicubic resize of the reference's transforms). ``normalize``
    False keeps inputs in [0, 1] (the reference's EuroSAT transforms normalise nothing).
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: bool = False
    augmentation: str = "random-resized-crop"
    center_crop: bool = False
    normalize: bool = True
    interpolation: str = "bilinear"

    def __call__(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 ``(B, H, W)`` or ``(B, H, W, 3)`` -> float ``(B, 3, S, S)`` on ``device``,
        in channels-last memory layout (the models are channels-last too)."""
        x = to_device(torch.from_numpy(np.ascontiguousarray(images)), device)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0)  # (B, 3, H, W)
        if self.augment:  # bicubic overshoots; PIL's uint8 pipeline clamps, so do we
            x = torch.stack([self._augmentation(img) for img in x]).clamp_(0.0, 1.0)
        elif self.center_crop:
            x = self._center_cropped(x).clamp_(0.0, 1.0)
        elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            if self.interpolation == "bicubic":
                x = self._bicubic_resize(x).clamp_(0.0, 1.0)
            else:
                x = F.interpolate(
                    x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
                )
        if not self.normalize:
            return x.contiguous(memory_format=torch.channels_last)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    @functools.cached_property
    def _augmentation(self):
        from torchvision.transforms import v2

        bicubic = v2.InterpolationMode.BICUBIC
        size = self.image_size
        if self.augmentation == "random-crop":
            side = max(size, round(size / CENTER_CROP_RATIO))
            crop = [
                v2.Resize((side, side), interpolation=bicubic, antialias=True),
                v2.RandomCrop(size),
            ]
        elif self.augmentation == "flip":
            # the same resize as without augmentation (bicubic antialiased, bilinear not)
            crop = [
                v2.Resize(
                    (size, size),
                    interpolation=self._interpolation,
                    antialias=self.interpolation == "bicubic",
                )
            ]
        else:
            crop = [v2.RandomResizedCrop(size, interpolation=bicubic, antialias=True)]
        return v2.Compose([*crop, v2.RandomHorizontalFlip()])

    @property
    def _interpolation(self):
        from torchvision.transforms import v2

        return {"bicubic": v2.InterpolationMode.BICUBIC}.get(
            self.interpolation, v2.InterpolationMode.BILINEAR
        )

    def _bicubic_resize(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2

        size = (self.image_size, self.image_size)
        return v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(x)

    def _center_cropped(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2

        side = max(self.image_size, round(self.image_size / CENTER_CROP_RATIO))
        resize = v2.Resize((side, side), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return v2.CenterCrop(self.image_size)(resize(x))


@dataclass(frozen=True)
class TokenInputs:
    """Encoded text (int32 ids ``(B, L)``, -1 = padding) -> int64 ids on ``device``.

    Columns past the batch's longest sequence are dropped (tokenizers pad on the
    right), so a batch of short texts does not pay for ``max-length``.
    """

    def __call__(self, ids: np.ndarray, device: torch.device) -> torch.Tensor:
        real = (ids != -1).any(axis=0)  # instruction prompts are stored below -1
        length = int(np.flatnonzero(real)[-1]) + 1 if real.any() else 1
        return to_device(torch.from_numpy(np.ascontiguousarray(ids[:, :length])).long(), device)


def padding_mask(x: torch.Tensor) -> torch.Tensor | None:
    """``(B, L)`` mask of the real tokens of encoded text (``-1`` is padding; instruction
    prompts are stored below it); None for images."""
    return None if x.is_floating_point() else x != -1


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batch -> ``device``; to CUDA through pinned memory, without blocking the host."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: CUDA autocast to bf16/fp16; fp32 (a no-op) on CPU.

    Only the forward runs in low precision: the trainable factors stay fp32, and the
    Gram hooks promote activations to fp32 before they sum.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if PRECISIONS[precision] is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=PRECISIONS[precision])


# By run-config name. A fresh one is built every round, so no state crosses rounds.
OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class TrainStats:
    loss: float
    num_examples: int
    steps: int


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for but CUDA is not available")
    return torch.device(name)


def batches(
    n: int, batch_size: int, *, shuffle: bool, generator: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """Index batches over ``range(n)``; seeded shuffling keeps runs reproducible."""
    order = generator.permutation(n) if shuffle and generator is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _parameter_groups(model: nn.Module, lr: float | Mapping[str, float]) -> list[dict]:
    """Trainable parameters grouped as the adapter's A side, B side and the rest (the head),
    each with its learning rate (``lr`` a float: the same for all)."""
    from lorm_flwr.models.layout import GROUPS

    rates = dict.fromkeys(("A", "B", "head"), lr) if isinstance(lr, float | int) else lr
    groups: dict[str, list] = {"A": [], "B": [], "head": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            side = next((g for fragment, g in GROUPS if fragment in name + "."), "head")
            groups[side].append(p)
    return [{"params": ps, "lr": float(rates[g])} for g, ps in groups.items() if ps]


def _index_stream(
    n: int, batch_size: int, epochs: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``epochs`` shuffled passes of batches, or exactly ``steps`` batches (> 0) drawn from
    as many reshuffled passes as they need (the reference FedSA-LoRA's local steps)."""
    if steps <= 0:
        for _ in range(epochs):
            yield from batches(n, batch_size, shuffle=True, generator=rng)
        return
    done = 0
    while done < steps:
        for idx in batches(n, batch_size, shuffle=True, generator=rng):
            yield idx
            done += 1
            if done == steps:
                return


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    task_classes: Sequence[int],
    inputs: InputSpec,
    epochs: int,
    batch_size: int,
    lr: float | Mapping[str, float],
    weight_decay: float,
    device: torch.device,
    seed: int,
    optimizer: str = "adamw",
    precision: str = "fp32",
    steps: int = 0,
    warmup_steps: int = 0,
    model_dropout: bool = False,
    objective: str = "classification",
) -> TrainStats:
    """AdamW (or plain SGD) on the trainable parameters; cross-entropy over the current
    task's logits only.

    ``lr``: one rate, or one per side ``{"A", "B", "head"}``. ``steps`` > 0 trains
    exactly that many batches instead of ``epochs`` passes. ``warmup_steps`` > 0 ramps
    every rate linearly from ``1/warmup_steps`` of its value to all of it
    (``torch.optim.lr_scheduler.LinearLR``, a fresh ramp every round).

    Old classes' head rows get no gradient, as in the LoRM reference. The model
    stays in eval mode: the backbone is frozen, so its BatchNorm statistics must
    not drift away from the server's copy; only the adapter's dropout layers (peft's
    ``lora_dropout``) are switched to training mode. ``model_dropout`` puts the whole
    model in training mode instead, as the FedSA-LoRA reference does (``model.train()``):
    a transformers model's own hidden and attention dropout are then active (text
    backbones only: they have no BatchNorm). ``precision`` bf16/fp16 autocasts
    the forward on CUDA; fp16 also scales the loss so small gradients do not underflow.
    Augmentation and dropout draw from torch's global generator, seeded from ``seed``.
    ``objective="causal-lm"``: next-token cross-entropy on the response tokens of encoded
    instruction data (:func:`lorm_flwr.generation.response_loss`); labels and
    ``task_classes`` only count the samples.
    """
    groups = _parameter_groups(model, lr)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    if len(labels) == 0:
        return TrainStats(loss=0.0, num_examples=0, steps=0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    opt = OPTIMIZERS[optimizer](groups, weight_decay=weight_decay)
    schedule = (
        torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps
        )
        if warmup_steps > 0
        else None
    )
    classes = torch.tensor(list(task_classes), device=device)
    # Map a global label to its column among the task's logits.
    remap = torch.full((int(max(task_classes)) + 1,), -1, dtype=torch.long, device=device)
    remap[classes] = torch.arange(len(classes), device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    model.eval()
    # transformers' attention dropout reads its module's .training, not an nn.Dropout:
    # model.train() is the only switch that turns all of the model's own dropout on.
    dropouts = [model] if model_dropout else _adapter_dropouts(model)
    for module in dropouts:
        module.train()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    total, count = 0.0, 0
    try:
        for idx in _index_stream(len(labels), batch_size, epochs, steps, rng):
            x = inputs(images[idx], device)
            if objective == "causal-lm":
                with autocast(device, precision):
                    logits = model(x)  # (B, L, V)
                loss = response_loss(logits, x)
            else:
                y = remap[torch.from_numpy(labels[idx]).to(device)]
                with autocast(device, precision):
                    logits = model(x)[:, classes]  # (B, |task|)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if schedule is not None:
                schedule.step()
            total += float(loss.detach())
            count += 1
    finally:
        for module in dropouts:
            module.eval()
    return TrainStats(loss=total / max(count, 1), num_examples=len(labels), steps=count)


def _adapter_dropouts(model: nn.Module) -> list[nn.Module]:
    """peft's dropout on the adapter's input (``lora_dropout``/``vera_dropout``), if any."""
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Dropout) and ("lora_dropout" in name or "vera_dropout" in name)
    ]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    seen_classes: Sequence[int],
    inputs: InputSpec,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """Class-incremental prediction: argmax over the logits of ``seen_classes`` (no task id)."""
    model.eval()
    seen = torch.tensor(list(seen_classes), device=device)
    out = []
    for idx in batches(len(images), batch_size, shuffle=False):
        with autocast(device, precision):
            logits = model(inputs(images[idx], device))[:, seen]
        out.append(seen[logits.argmax(dim=1)].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate_accuracy(
    predictions: np.ndarray, labels: np.ndarray, tasks: Sequence[Sequence[int]]
) -> tuple[float, list[float]]:
    """Overall accuracy and per-task accuracy of predictions on the given labels.

    A task with no test sample gets NaN.
    """
    overall = float((predictions == labels).mean()) if len(labels) else float("nan")
    per_task = []
    for classes in tasks:
        mask = np.isin(labels, list(classes))
        per_task.append(
            float((predictions[mask] == labels[mask]).mean()) if mask.any() else float("nan")
        )
    return overall, per_task
