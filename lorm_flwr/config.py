"""The run configuration: parsed once from Flower's run config, validated, frozen.

Nothing else in the project reads ``context.run_config``; it calls
:func:`RunConfig.from_mapping` and passes the result around.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorm_flwr.errors import ConfigError

__all__ = ["AUGMENTATIONS", "GRAM_ALPHA_DEFAULTS", "TRACKERS", "ConfigError", "RunConfig"]

# How augment=true augments a training image (lorm_flwr.train.InputSpec): the LoRM reference's
# CIFAR-100/ImageNet-R/ImageNet-A transform, its CUB-200 one (resize, random crop, flip) and its
# Cars-196 one (flip only).
AUGMENTATIONS = ("random-resized-crop", "random-crop", "flip")

# Where a run's figures are logged besides results.json (lorm_flwr.server.tracking).
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")

# Every derived seed (lorm_flwr.seeds) must stay an int64 on the wire and a valid
# numpy/torch seed: seed * 100_003 + ... fits int64 far beyond this.
MAX_SEED = 2**32 - 1
MAX_IMAGE_SIZE = 1024


# gram-alpha=auto per strategy, chosen on a validation split (docs/benchmarks.md,
# "Reference behaviours, one at a time"): full Grams serve LoRM's A- and B-steps, while
# RegMean's merge of whole deltas collapses class-incrementally with them.
GRAM_ALPHA_DEFAULTS = {"lorm": 1.0, "regmean": 0.0}
GRAM_ALPHA_FALLBACK = 1.0  # strategies that send no Grams


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Every experiment knob. Field ``foo_bar`` is run-config key ``foo-bar``."""

    strategy: str = "lorm"
    dataset: str = "mnist"
    backbone: str = "efficientnet-lite0"
    num_tasks: int = 5
    rounds_per_task: int = 2
    local_epochs: int = 2
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_a: float = 0.0
    lr_b: float = 0.0
    warmup_steps: int = 0
    local_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: str = "auto"
    lora_dropout: float = 0.0
    model_dropout: bool = False
    dirichlet_beta: float = 0.5
    min_samples_per_client: int = 6
    class_order: str = "natural"
    classes_per_task: int = 0
    test_fraction: float = 0.2
    validation_fraction: float = 0.0
    select_round: str = "last"
    max_samples_per_class: int = 0
    image_size: int = 32
    augment: bool = False
    augmentation: str = "random-resized-crop"
    gram_passes: int = 1
    eval_center_crop: bool = False
    normalize: bool | str = True
    resize_interpolation: str = "bilinear"
    head_init: str = "kaiming"
    max_length: int = 128
    max_new_tokens: int = 32
    load_in_4bit: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    output_dir: str = "~/lorm-flwr-runs"
    tracking: str = "none"
    min_clients: int = 2
    num_clients: int = 3
    clients_per_round: int = 0
    # "auto": the strategy's own default (GRAM_ALPHA_DEFAULTS); a float after parsing.
    gram_alpha: float | str = "auto"
    head_gram_alpha: float = 0.5
    merge_ridge: float = 0.0
    client_threads: int = 1
    merge_anchor: str = "zero"
    lorm_reference_grams: bool = False
    lorm_round_grams: str = "trained"
    lorm_first_task: str = "fold"
    round_eval_model: str = "task"
    fedsa_head: str = "local"
    fedsa_weighted: bool = True
    backbone_checkpoint: str = ""
    dry_run: bool = False
    round_retries: int = 2
    round_timeout: float = 3600.0
    max_message_mb: float = 0.0
    resume_from: str = ""
    resume_unverified: bool = False

    def __post_init__(self) -> None:
        # Resolve gram-alpha once, so that every reader sees the number actually used.
        value = self.gram_alpha
        if isinstance(value, str):
            if value.strip() == "auto":
                value = GRAM_ALPHA_DEFAULTS.get(self.strategy, GRAM_ALPHA_FALLBACK)
            else:
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(
                        f"gram-alpha={self.gram_alpha!r} is invalid: give a number in [0, 1] "
                        "or 'auto' (the strategy's default)"
                    ) from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"gram-alpha={value!r} is invalid: expected a number or 'auto'")
        if not math.isfinite(float(value)):
            raise ConfigError(f"gram-alpha={value!r} is invalid: must be in [0, 1]")
        object.__setattr__(self, "gram_alpha", float(value))
        # normalize: true (the backbone's own mean and std), false (inputs stay in [0, 1]) or
        # "imagenet" (ImageNet's mean and std, as the reference's ImageNet-A and CUB-200).
        norm = self.normalize
        if isinstance(norm, str) and norm.strip().lower() in ("true", "false"):
            norm = norm.strip().lower() == "true"
        if not (isinstance(norm, bool) or norm == "imagenet"):
            raise ConfigError(
                f"normalize={self.normalize!r} is invalid: expected true (the backbone's mean "
                "and std), false (none) or 'imagenet'"
            )
        object.__setattr__(self, "normalize", norm)

    # ----------------------------------------------------------------- parsing
    @classmethod
    def from_mapping(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse and validate Flower's run config (kebab-case keys).

        Unknown keys raise, so a typo never silently falls back to a default.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        by_key = {_key(name): name for name in fields}
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            if key not in by_key:
                allowed = ", ".join(sorted(by_key))
                raise ConfigError(
                    f"unknown run-config key '{key}'{_did_you_mean(key, by_key)}; known keys: {allowed}"
                )
            name = by_key[key]
            values[name] = _coerce(key, raw, fields[name].type)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of every key, as written to results.json."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Every key's value, then the keys that only some strategies read."""
        self._check_names()
        self._check_numbers()
        self._check_federation()
        self._check_strategy_keys()

    def _check_names(self) -> None:
        """Names from a registry or a fixed list; data and backbone of the same kind."""
        # Imported here: the registries import torch-heavy modules lazily, and the
        # config module must stay importable without them.
        from lorm_flwr.data.datasets import DATASETS
        from lorm_flwr.models.backbones import BACKBONES
        from lorm_flwr.registry import STRATEGIES

        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("dataset", self.dataset, DATASETS)
        _one_of("backbone", self.backbone, BACKBONES)
        if self.model_dropout and BACKBONES[self.backbone].modality == "image":
            raise ConfigError(
                f"model-dropout=true applies to text backbones only (backbone is "
                f"'{self.backbone}': its BatchNorm statistics must not drift in training mode); "
                "leave it at false"
            )
        _one_of("class-order", self.class_order, ("natural", "shuffle"))
        _one_of("select-round", self.select_round, ("last", "best-validation"))
        if self.select_round == "best-validation" and self.validation_fraction <= 0:
            raise ConfigError(
                "select-round='best-validation' scores every round on a validation split: "
                "give validation-fraction > 0 (e.g. 0.1) to hold one out of the training data"
            )
        _one_of("optimizer", self.optimizer, ("adamw", "sgd"))
        _one_of("precision", self.precision, ("fp32", "bf16", "fp16"))
        _one_of("merge-anchor", self.merge_anchor, ("zero", "global"))
        _one_of("fedsa-head", self.fedsa_head, ("local", "shared"))
        _one_of("lorm-round-grams", self.lorm_round_grams, ("trained", "mean-delta"))
        _one_of("lorm-first-task", self.lorm_first_task, ("fold", "keep"))
        _one_of("round-eval-model", self.round_eval_model, ("task", "mean-delta"))
        if self.backbone_checkpoint and not Path(self.backbone_checkpoint).expanduser().exists():
            raise ConfigError(
                f"backbone-checkpoint={self.backbone_checkpoint!r} does not exist: give a weights "
                "file (timm) or a model folder (transformers)"
            )
        data_kind, model_kind = DATASETS[self.dataset].modality, BACKBONES[self.backbone].modality
        if data_kind != model_kind:
            fitting = sorted(n for n, b in BACKBONES.items() if b.modality == data_kind)
            raise ConfigError(
                f"dataset '{self.dataset}' is {data_kind} but backbone '{self.backbone}' is a "
                f"{model_kind} model; backbones for {data_kind}: {', '.join(fitting)}"
            )
        if data_kind == "generation" and self.num_tasks != 1:
            raise ConfigError(
                f"num-tasks={self.num_tasks}: dataset '{self.dataset}' is instruction data for a "
                "causal LM, trained as plain federated learning; give num-tasks=1"
            )
        if self.load_in_4bit:
            if data_kind != "generation" or BACKBONES[self.backbone].weights is None:
                raise ConfigError(
                    f"load-in-4bit=true applies to hub causal LMs only (backbone "
                    f"'{self.backbone}'); leave it at false"
                )
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    "load-in-4bit=true needs CUDA (bitsandbytes quantises on the GPU) and this "
                    "machine has none: leave it at false, or run on a GPU node"
                )
        if data_kind == "generation" and self.max_length < 2:
            raise ConfigError(
                f"max-length={self.max_length} leaves no room for a response: give >= 2"
            )
        if data_kind == "generation" and self.model_dropout:
            raise ConfigError("model-dropout=true applies to text classification backbones only")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _one_of("device", self.device, ("auto", "cpu", "cuda", "cuda:N"))

    def _check_numbers(self) -> None:
        """Sizes, rates and fractions within their ranges."""
        # Imported here: the registries import torch-heavy modules lazily, and the
        # config module must stay importable without them.
        from lorm_flwr.data.datasets import DATASETS
        from lorm_flwr.models.backbones import BACKBONES

        for name in (
            "num_tasks",
            "rounds_per_task",
            "local_epochs",
            "batch_size",
            "eval_batch_size",
            "lora_rank",
            "min_clients",
            "image_size",
            "max_length",
            "max_new_tokens",
            "gram_passes",
        ):
            _positive(name, getattr(self, name))
        for name in ("lr_a", "lr_b", "warmup_steps", "local_steps"):
            _non_negative(name, getattr(self, name))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora-dropout={self.lora_dropout!r} is invalid: must be in [0, 1)")
        if self.gram_passes > 1 and not self.augment:
            raise ConfigError(
                f"gram-passes={self.gram_passes} needs augment=true: without augmentation every "
                "pass sees the same inputs, so more passes only cost time"
            )
        _one_of("resize-interpolation", self.resize_interpolation, ("bilinear", "bicubic"))
        _one_of("augmentation", self.augmentation, AUGMENTATIONS)
        if self.augmentation != "random-resized-crop" and not self.augment:
            raise ConfigError(
                f"augmentation={self.augmentation!r} chooses how augment=true augments: "
                "set augment=true, or leave augmentation at 'random-resized-crop'"
            )
        _one_of("head-init", self.head_init, ("kaiming", "trunc-normal"))
        _one_of("tracking", self.tracking, TRACKERS)
        image_only = {  # key -> (value, default)
            "augment": (self.augment, False),
            "augmentation": (self.augmentation, "random-resized-crop"),
            "eval-center-crop": (self.eval_center_crop, False),
            "normalize": (self.normalize, True),
            "resize-interpolation": (self.resize_interpolation, "bilinear"),
            "head-init": (self.head_init, "kaiming"),
        }
        if BACKBONES[self.backbone].modality != "image":
            for key, (value, default) in image_only.items():
                if value != default:
                    raise ConfigError(
                        f"{key}={value!r} applies to images; backbone '{self.backbone}' is a "
                        f"text model (leave it at {default!r})"
                    )
        _positive("lr", self.lr)
        _positive("lora_alpha", self.lora_alpha)
        _positive("dirichlet_beta", self.dirichlet_beta)
        _non_negative("weight_decay", self.weight_decay)
        _positive("min_samples_per_client", self.min_samples_per_client)
        _non_negative("max_samples_per_class", self.max_samples_per_class)
        _non_negative("merge_ridge", self.merge_ridge)
        _non_negative("client_threads", self.client_threads)
        _non_negative("seed", self.seed)
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed={self.seed} is invalid: must be in [0, {MAX_SEED}]")
        for name in ("gram_alpha", "head_gram_alpha"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{_key(name)}={value!r} is invalid: must be in [0, 1]")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test-fraction={self.test_fraction!r} is invalid: must be in (0, 1)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation-fraction={self.validation_fraction!r} is invalid: must be in [0, 1)"
            )
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"image-size={self.image_size} is invalid: must be in [8, {MAX_IMAGE_SIZE}]"
            )
        if self.lora_targets.strip() not in ("", "auto") and not self.lora_target_list:
            raise ConfigError(
                f"lora-targets={self.lora_targets!r} names no module: give comma-separated "
                "module names, or 'auto' for the backbone's defaults"
            )
        num_classes = DATASETS[self.dataset].num_classes
        if self.num_tasks > num_classes:
            raise ConfigError(
                f"num-tasks={self.num_tasks} is invalid: dataset '{self.dataset}' has only "
                f"{num_classes} classes, so at most {num_classes} tasks of disjoint classes"
            )
        _non_negative("classes_per_task", self.classes_per_task)
        if self.classes_per_task:
            last = num_classes - self.classes_per_task * (self.num_tasks - 1)
            if last < 1:
                raise ConfigError(
                    f"classes-per-task={self.classes_per_task} is invalid: {self.num_tasks - 1} "
                    f"tasks of {self.classes_per_task} classes leave {last} of dataset "
                    f"'{self.dataset}''s {num_classes} classes for the last task"
                )
        if not self.output_dir.strip():
            raise ConfigError("output-dir='' is invalid: give a folder path")

    def _check_federation(self) -> None:
        """Clients, participation, retries and resuming."""
        _non_negative("num_clients", self.num_clients)
        if self.num_clients and self.min_clients > self.num_clients:
            raise ConfigError(
                f"min-clients={self.min_clients} is invalid: more than num-clients={self.num_clients}"
            )
        _non_negative("clients_per_round", self.clients_per_round)
        if self.clients_per_round and self.clients_per_round < self.min_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} is invalid: fewer than "
                f"min-clients={self.min_clients}, so no round could merge"
            )
        if self.num_clients and self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round} is invalid: more than "
                f"num-clients={self.num_clients}"
            )
        _non_negative("round_retries", self.round_retries)
        _positive("round_timeout", self.round_timeout)
        _non_negative("max_message_mb", self.max_message_mb)
        # resume-from is checked by the ServerApp: clients (other machines) lack the file.
        if self.resume_unverified and not self.resume_from:
            raise ConfigError(
                "resume-unverified=true applies to resume-from only (no resume-from given): "
                "leave it at false"
            )

    def _check_strategy_keys(self) -> None:
        """Keys that only one kind of strategy reads: set for another, they would do nothing."""
        embeddings = [t for t in self.lora_target_list or [] if "embed" in t]
        if embeddings and self.strategy in ("lorm", "regmean"):
            raise ConfigError(
                f"lora-targets={self.lora_targets!r}: strategy '{self.strategy}' merges with the "
                f"Gram statistics of each adapted layer's inputs, which an embedding "
                f"({', '.join(embeddings)}) does not have; drop it from lora-targets, or use "
                "fedsa or fedit"
            )
        if embeddings and self.strategy == "ffa":
            raise ConfigError(
                f"lora-targets={self.lora_targets!r}: ffa freezes A, and an embedding's LoRA "
                f"starts with A = 0 (peft's scheme), so {', '.join(embeddings)} would never "
                "change; drop it from lora-targets, or use fedsa or fedit"
            )
        lorm_only = {
            "lorm-round-grams": (self.lorm_round_grams, "trained"),
            "lorm-first-task": (self.lorm_first_task, "fold"),
            "round-eval-model": (self.round_eval_model, "task"),
            "lorm-reference-grams": (self.lorm_reference_grams, False),
        }
        for key, (value, default) in lorm_only.items():
            if self.strategy != "lorm" and value != default:
                raise ConfigError(
                    f"{key}={value!r} applies to strategy 'lorm' only (strategy is "
                    f"'{self.strategy}'): leave it at {default!r}"
                )
        if self.strategy.startswith("joint") and self.clients_per_round:
            raise ConfigError(
                f"clients-per-round={self.clients_per_round}: '{self.strategy}' is not "
                "federated (it trains on the pooled data)"
            )

    # ----------------------------------------------------------------- helpers
    @property
    def generation(self) -> bool:
        """Instruction data for a causal LM: scored by exact match of generated answers."""
        from lorm_flwr.data.datasets import DATASETS

        return DATASETS[self.dataset].modality == "generation"

    @property
    def lora_target_list(self) -> list[str] | None:
        """Explicit target-module names, or None for the backbone's defaults."""
        if self.lora_targets.strip() in ("", "auto"):
            return None
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    def lr_of(self, group: str) -> float:
        """The learning rate of a parameter group: ``lr-a``/``lr-b`` for the adapter's A/B
        side when set (> 0), ``lr`` otherwise (and for the head)."""
        chosen = {"A": self.lr_a, "B": self.lr_b}.get(group, 0.0)
        return chosen if chosen > 0 else self.lr

    @property
    def output_root(self) -> Path:
        """Absolute output folder (``~`` expanded, relative paths against the cwd)."""
        return Path(self.output_dir).expanduser().resolve()


def _coerce(key: str, raw: Any, annotation: Any) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    try:
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise TypeError
            return int(raw)
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            value = float(raw)
            if not math.isfinite(value):
                raise TypeError
            return value
        if kind == "str":
            # A TOML list or table would become its Python spelling ("['a', 'b']").
            if not isinstance(raw, str | int | float):
                raise TypeError
            return str(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "false"):
                return str(raw).lower() == "true"
            raise TypeError
    except (TypeError, ValueError):
        what = "a single value, not a list or table" if isinstance(raw, list | dict) else ""
        raise ConfigError(
            f"{key}={raw!r} is invalid: expected a {kind}{' (' + what + ')' if what else ''}"
        ) from None
    return raw


# Names users reach for that mean one of ours (the closest spelling would miss them).
ALIASES = {"fedavg": "fedit", "learning-rate": "lr", "rank": "lora-rank", "alpha": "lora-alpha"}


def _did_you_mean(word: str, candidates: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    import difflib

    known = list(candidates)
    normal = word.replace("_", "-").lower()
    if ALIASES.get(normal) in known:
        return f"; did you mean '{ALIASES[normal]}'?"
    if normal in known:
        return f"; did you mean '{normal}'?"
    close = difflib.get_close_matches(normal, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _one_of(key: str, value: str, allowed: Any, prefix_ok: tuple[str, ...] = ()) -> None:
    if value in allowed or any(value.startswith(p) for p in prefix_ok):
        return
    names = ", ".join(sorted(allowed))
    raise ConfigError(
        f"{key}={value!r} is not known{_did_you_mean(value, allowed)}; allowed: {names}"
    )


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{_key(name)}={value!r} is invalid: must be > 0")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{_key(name)}={value!r} is invalid: must be >= 0")
