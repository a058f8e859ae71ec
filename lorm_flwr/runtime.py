"""Process-level building blocks shared by the ClientApp and the ServerApp.

Explicit caches: a Ray worker hosts many simulated clients in turn, and each
message would otherwise reload the data set and rebuild the backbone. Every
cached model has all its trainable tensors overwritten before use.
"""

from __future__ import annotations

import functools

import torch
from peft import PeftModel

from lorm_flwr.config import RunConfig
from lorm_flwr.data.datasets import (
    LabelledData,
    cap_per_class,
    hold_out_validation,
    load_dataset,
)
from lorm_flwr.data.scenario import Scenario, build_scenario
from lorm_flwr.models.adapters import adapter_kind, attach_lora
from lorm_flwr.models.backbones import BACKBONES, build_classifier
from lorm_flwr.seeds import validation_split_seed
from lorm_flwr.train import InputSpec, TokenInputs, pick_device

__all__ = ["data_of", "input_spec", "model_of", "scenario_of"]


def data_of(cfg: RunConfig) -> LabelledData:
    """The run's data set; text comes tokenised for the backbone (once per process)."""
    return _data(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.max_samples_per_class,
                 cfg.backbone, cfg.max_length, cfg.backbone_checkpoint,
                 cfg.validation_fraction)  # fmt: skip


@functools.lru_cache(maxsize=2)
def _data(
    dataset: str, test_fraction: float, seed: int, cap: int, backbone: str, max_length: int,
    checkpoint: str, validation_fraction: float,
) -> LabelledData:  # fmt: skip
    data = cap_per_class(load_dataset(dataset, test_fraction, seed), cap, seed)
    data = hold_out_validation(data, validation_fraction, validation_split_seed(seed))
    if BACKBONES[backbone].modality != "text":
        return data
    from lorm_flwr.data.text import encode
    from lorm_flwr.models.backbones import load_tokenizer

    tokenizer = load_tokenizer(checkpoint or BACKBONES[backbone].weights())
    return encode(data, tokenizer, max_length)


@functools.lru_cache(maxsize=4)
def scenario_of(cfg: RunConfig, num_clients: int) -> Scenario:
    data = data_of(cfg)
    return build_scenario(
        data.train_y,
        data.num_classes,
        test_labels=data.test_y,
        num_tasks=cfg.num_tasks,
        num_clients=num_clients,
        beta=cfg.dirichlet_beta,
        min_samples=cfg.min_samples_per_client,
        order=cfg.class_order,
        seed=cfg.seed,
    )


def input_spec(cfg: RunConfig, *, train: bool = False) -> InputSpec | TokenInputs:
    """How a batch of stored samples becomes the model's input.

    ``train``: for local training and the Gram passes over the training shard
    (augmented with ``augment``); otherwise for evaluation (``eval-center-crop``).
    """
    spec = BACKBONES[cfg.backbone]
    if spec.modality == "text":
        return TokenInputs()
    return InputSpec(
        cfg.image_size, spec.mean, spec.std,
        augment=train and cfg.augment, center_crop=not train and cfg.eval_center_crop,
    )  # fmt: skip


def lora_targets(cfg: RunConfig) -> list[str]:
    return cfg.lora_target_list or list(BACKBONES[cfg.backbone].default_targets)


@functools.lru_cache(maxsize=3)
def _cached_model(
    backbone: str, image_size: int, num_classes: int, seed: int, rank: int, alpha: float,
    targets: tuple[str, ...], device: str, kind: str, checkpoint: str, dropout: float,
) -> PeftModel:  # fmt: skip
    base = build_classifier(backbone, image_size, num_classes, seed, checkpoint)
    model = attach_lora(
        base, rank=rank, alpha=alpha, targets=list(targets), kind=kind, seed=seed, dropout=dropout
    )
    # NHWC is 2-4x faster for EfficientNet's depthwise and 1x1 convolutions on CPU
    # (and the norm on GPUs); InputSpec hands over NHWC batches to match.
    return model.to(device=device, memory_format=torch.channels_last)


@functools.lru_cache(maxsize=2)
def initial_tensors(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The adapter and head every run starts from: a pure function of the config."""
    from lorm_flwr.models.adapters import get_tensors

    base = build_classifier(
        cfg.backbone, cfg.image_size, data_of(cfg).num_classes, cfg.seed, cfg.backbone_checkpoint
    )
    kind = adapter_kind(cfg.strategy)
    model = attach_lora(
        base, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=lora_targets(cfg),
        kind=kind, seed=cfg.seed,
    )  # fmt: skip
    return get_tensors(model)


def model_of(
    cfg: RunConfig, rank: int | None = None, alpha: float | None = None, kind: str | None = None
) -> PeftModel:
    """The cached peft model for ``cfg`` (optionally at another rank/alpha/kind), on its device."""
    return _cached_model(
        cfg.backbone,
        cfg.image_size,
        data_of(cfg).num_classes,
        cfg.seed,
        rank or cfg.lora_rank,
        alpha if alpha is not None else cfg.lora_alpha,
        tuple(lora_targets(cfg)),
        str(pick_device(cfg.device)),
        kind or adapter_kind(cfg.strategy),
        cfg.backbone_checkpoint,
        cfg.lora_dropout,
    )


# glibc's mallopt parameter: allocations above this many bytes get their own mapping.
_M_MMAP_THRESHOLD = -3
SERVER_MMAP_THRESHOLD = 128 * 1024


def keep_server_heap_flat() -> bool:
    """Pin glibc's mmap threshold (its default starts at 128 KiB and grows as large blocks
    are freed) so that every large tensor, a decoded Gram or a running sum, gets and
    returns its own mapping. Otherwise the heap keeps the freed blocks of each decoded
    reply and the server's resident memory grows with the number of clients although
    it holds no more replies (benchmarks/server_memory.py). No-op (False) off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, SERVER_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def set_threads(cfg: RunConfig) -> None:
    if cfg.client_threads > 0:
        torch.set_num_threads(cfg.client_threads)
