"""The exported adapter: a peft folder that says what it adapts, and the function that
rebuilds the classifier from it.

Each export folder holds peft's ``adapter_config.json`` (with ``base_model_name_or_path``
set to the weights' id) and ``adapter_model.safetensors`` (the LoRA factors and the
head, peft ``modules_to_save``), plus ``lorm_flwr.json`` (what rebuilding needs: the
backbone, input size, number of classes, seed, classes per task) and ``README.md``
(a model card: weights' source, preprocessing, classes, the run's metrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import head_keys, set_tensors
from lorm_flwr.models.backbones import BACKBONES, build_classifier

__all__ = ["ADAPTER_INFO", "export_adapter", "load_classifier"]

ADAPTER_INFO = "lorm_flwr.json"


def export_adapter(
    model: PeftModel,
    tensors: dict[str, torch.Tensor],
    folder: Path,
    cfg: RunConfig,
    tasks: list[list[int]],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Save ``tensors`` as a self-describing peft adapter folder (see the module docstring)."""
    set_tensors(model, tensors)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    spec = BACKBONES[cfg.backbone]
    base = cfg.backbone_checkpoint or spec.base_model or cfg.backbone
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    info = {
        "backbone": cfg.backbone,
        "base_model": base,
        "backbone_checkpoint": cfg.backbone_checkpoint,
        "image_size": cfg.image_size,
        "num_classes": int(tensors[head_keys(model)[0]].shape[0]),
        "seed": cfg.seed,
        "modality": spec.modality,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "max_length": cfg.max_length,
        # What the classifier's forward takes (text: not a tokenizer's usual output).
        "input": (
            f"float images (N, 3, {cfg.image_size}, {cfg.image_size}), normalised with mean and std"
            if spec.modality == "image"
            else "int64 token ids (N, L) of the base model's tokenizer, with -1 (not the pad id) at "
            "padding positions, as lorm_flwr.data.text.encode writes them"
        ),
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "classes_per_task": tasks,
        "rank": int(config["r"]),
        "metrics": metrics or {},
    }
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(_model_card(info, spec.source))
    return folder


def _model_card(info: dict[str, Any], source: str) -> str:
    pre = (
        f"images resized to {info['image_size']} x {info['image_size']}, scaled to [0, 1], "
        f"normalised with mean {info['mean']} and std {info['std']}"
        if info["modality"] == "image"
        else f"text tokenised with the base model's tokenizer, at most {info['max_length']} tokens, "
        "given as int64 ids with -1 (not the pad id) at padding positions "
        "(`lorm_flwr.data.text.encode`); the head reads the mean of the last hidden states over "
        "real tokens. Padded ids from the tokenizer as they come would be averaged in."
    )
    metrics = "\n".join(f"- {k}: {v}" for k, v in info["metrics"].items()) or "- (none recorded)"
    return f"""# LoRA adapter from lorm-flwr ({info["strategy"]} on {info["dataset"]})

- Base model: {info["base_model"]} ({source})
- Adapter: peft LoRA of rank {info["rank"]}, plus the classification head
  (`modules_to_save`, {info["num_classes"]} classes)
- Preprocessing: {pre}
- Classes per task, in training order: {info["classes_per_task"]}

## Metrics of the run
{metrics}

## Loading
With lorm-flwr: `from lorm_flwr.models.export import load_classifier; model = load_classifier("<this folder>")`.
Without it: build the same backbone with a linear head named `linear_head` over
{info["num_classes"]} classes (see `{ADAPTER_INFO}`), then
`peft.PeftModel.from_pretrained(model, "<this folder>")`. Loading onto any other module tree
(for example a plain `timm.create_model(...)`) does not fail, but leaves the LoRA factors
and the head untrained: check that every key of `adapter_model.safetensors` was loaded.
"""


def load_classifier(folder: str | Path) -> PeftModel:
    """The classifier an export folder (or a run folder, whose ``adapter/`` is used) describes.

    Raises ``ValueError`` when the folder lacks what rebuilding needs, or when any LoRA
    factor or head tensor of the adapter did not land in the rebuilt model.
    """
    path = Path(folder).expanduser()
    if (path / "adapter" / ADAPTER_INFO).exists():
        path = path / "adapter"
    if not (path / ADAPTER_INFO).exists():
        raise ValueError(f"{path} has no {ADAPTER_INFO}: not an adapter exported by lorm-flwr")
    info = json.loads((path / ADAPTER_INFO).read_text())
    base = build_classifier(
        info["backbone"],
        info["image_size"],
        info["num_classes"],
        info["seed"],
        info["backbone_checkpoint"],
    )
    model = PeftModel.from_pretrained(base, str(path)).eval()
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter_model.safetensors"))
    # (save_embedding_layers=False: peft would otherwise look the base model's id up on the hub)
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    loaded = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    missing = []
    for key, tensor in saved.items():
        short = key.removeprefix("base_model.model.")
        match = loaded.get(short)
        if (
            match is None
            or match.shape != tensor.shape
            or not torch.equal(match, tensor.to(match.dtype))
        ):
            missing.append(key)
    if missing or len(saved) != len(loaded):
        raise ValueError(
            f"{path}: {len(missing)} of the adapter's {len(saved)} tensors did not load into the rebuilt "
            f"model (first: {missing[:3]}); the model has {len(loaded)} adapter tensors"
        )
    return model
