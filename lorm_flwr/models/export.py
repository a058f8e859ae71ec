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
from lorm_flwr.models.adapters import model_layout, set_tensors
from lorm_flwr.models.backbones import (
    BACKBONES,
    CausalLM,
    SequenceClassifier,
    build_classifier,
    load_tokenizer,
    quiet_transformers,
    tokenizer_of,
)

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
    """Save ``tensors`` as a self-describing peft adapter folder (see the module docstring).

    Text adapters are saved as peft ``SEQ_CLS`` adapters of the transformers model
    itself, so ``AutoPeftModelForSequenceClassification.from_pretrained(folder)`` loads
    them, and causal-LM adapters as ``CAUSAL_LM`` adapters for
    ``AutoPeftModelForCausalLM``; the tokenizer is saved alongside.
    """
    set_tensors(model, tensors)
    folder.mkdir(parents=True, exist_ok=True)
    spec = BACKBONES[cfg.backbone]
    base = cfg.backbone_checkpoint or spec.base_model or cfg.backbone
    num_classes = model_layout(model).num_classes
    if spec.modality in ("text", "generation"):
        base = _save_transformers_adapter(model, folder, cfg, num_classes)
    else:
        model.save_pretrained(str(folder))
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    info = {
        "backbone": cfg.backbone,
        "base_model": base,
        "base_model_id": spec.base_model,
        "backbone_checkpoint": cfg.backbone_checkpoint,
        "image_size": cfg.image_size,
        "num_classes": num_classes,
        "seed": cfg.seed,
        "modality": spec.modality,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "max_length": cfg.max_length,
        # What the classifier's forward takes (text: not a tokenizer's usual output).
        "input": {
            "image": f"float images (N, 3, {cfg.image_size}, {cfg.image_size}), normalised "
            "with mean and std",
            "text": "the tokenizer's own output (input_ids, attention_mask) for "
            "AutoPeftModelForSequenceClassification; for load_classifier, int64 token ids (N, L) "
            "with -1 at padding positions, as lorm_flwr.data.text.encode writes them",
            "generation": "the tokenizer's output of BOS + lorm_flwr.data.instructions.PROMPT "
            "for AutoPeftModelForCausalLM; for load_classifier, int64 ids (N, L) as "
            "lorm_flwr.data.instructions.encode_pairs writes them",
        }[spec.modality],
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "classes_per_task": tasks,
        "rank": int(config["r"]),
        "metrics": metrics or {},
    }
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
    (folder / "README.md").write_text(_model_card(info, spec.source))
    return folder


# Where a text backbone's weights live when they are not on the hub: saved with the adapter.
BASE_FOLDER = "base_model"


def _save_transformers_adapter(
    model: PeftModel, folder: Path, cfg: RunConfig, num_classes: int
) -> str:
    """Save the adapter of ``model`` (a PeftModel over a SequenceClassifier or a CausalLM) as
    peft's ``SEQ_CLS`` (``CAUSAL_LM``) adapter of the transformers model inside it; return
    the base model's path.

    peft saves the adapter of the wrapper; the transformers model's own adapter holds the
    same tensors with keys one ``model.`` shorter, and says its task type (and, for a
    classifier, its head in ``modules_to_save``). No second base model is built, so a
    hub model's export costs no more memory than its adapter. The base is the weights'
    local folder where there is one (bundled MiniLM, a backbone-checkpoint), the hub id
    otherwise; a random-init backbone (tests, the offline tiny models) is saved under
    ``base_model/``.
    """
    import tempfile

    from safetensors.torch import load_file, save_file

    spec = BACKBONES[cfg.backbone]
    inner = model.base_model.model
    classifies = isinstance(inner, SequenceClassifier)
    weights = cfg.backbone_checkpoint or (spec.weights() if spec.weights else "")
    if cfg.backbone.startswith("tiny-"):  # random init: nothing on disk to point at
        base = str((folder / BASE_FOLDER).resolve())
        fresh = build_classifier(cfg.backbone, cfg.image_size, num_classes, cfg.seed)
        with quiet_transformers():
            fresh.model.save_pretrained(base)
    elif weights and Path(weights).expanduser().exists():
        base = str(Path(weights).expanduser().resolve())
    else:
        base = spec.base_model or cfg.backbone
    with tempfile.TemporaryDirectory(dir=folder) as tmp, quiet_transformers():
        model.save_pretrained(tmp, save_embedding_layers=False)
        tensors = load_file(str(Path(tmp) / "adapter_model.safetensors"))
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
    prefix = "base_model.model."
    renamed = {
        prefix + k.removeprefix(prefix + "model.") if k.startswith(prefix + "model.") else k: v
        for k, v in tensors.items()
    }
    save_file(renamed, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config["task_type"] = "SEQ_CLS" if classifies else "CAUSAL_LM"
    config["modules_to_save"] = [SequenceClassifier.HEAD] if classifies else None
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer_of(cfg.backbone, cfg.backbone_checkpoint).save_pretrained(str(folder))
    return base


def _model_card(info: dict[str, Any], source: str) -> str:
    pre = (
        f"images resized to {info['image_size']} x {info['image_size']}, scaled to [0, 1], "
        f"normalised with mean {info['mean']} and std {info['std']}"
        if info["modality"] == "image"
        else f"text tokenised with the tokenizer saved here, at most {info['max_length']} tokens"
    )
    metrics = "\n".join(f"- {k}: {v}" for k, v in info["metrics"].items()) or "- (none recorded)"
    return f"""# LoRA adapter from lorm-flwr ({info["strategy"]} on {info["dataset"]})

- Base model: {info["base_model"]} ({source})
- Adapter: peft LoRA of rank {info["rank"]}{_head_line(info)}
- Preprocessing: {pre}
- Classes per task, in training order: {info["classes_per_task"]}

## Metrics of the run
{metrics}

## Loading
{_loading(info)}
"""


def _head_line(info: dict[str, Any]) -> str:
    if info["modality"] == "generation":
        return " (a causal LM: no head of its own)"
    return f", plus the classification head\n  (`modules_to_save`, {info['num_classes']} classes)"


def _loading(info: dict[str, Any]) -> str:
    if info["modality"] == "generation":
        return f"""With peft alone (a CAUSAL_LM adapter of `{info["base_model"]}`):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained("<this folder>").eval()
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
prompt = lorm_flwr.data.instructions.PROMPT.format(instruction="...")  # the training template
prompt = (tokenizer.bos_token or "") + prompt  # as in training: BOS, where the tokenizer has one
ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
answer = tokenizer.decode(model.generate(**ids, max_new_tokens=64, do_sample=False)[0])
```

The final answer follows `####`. `base_model_name_or_path` is as for text adapters."""
    if info["modality"] == "text":
        return f"""With peft alone (a SEQ_CLS adapter of `{info["base_model"]}`, head included):

```python
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
model = AutoPeftModelForSequenceClassification.from_pretrained("<this folder>").eval()
tokenizer = AutoTokenizer.from_pretrained("<this folder>")
logits = model(**tokenizer(["some text"], return_tensors="pt")).logits  # (1, {info["num_classes"]})
```

`base_model_name_or_path` is where the base weights were on the machine that trained
(`{info["base_model"]}`); elsewhere, edit it to the hub id `{info["base_model_id"]}` or a local copy.
With lorm-flwr: `lorm_flwr.models.export.load_classifier("<this folder>")`."""
    return f"""With lorm-flwr: `from lorm_flwr.models.export import load_classifier; model = load_classifier("<this folder>")`.
Without it: build the same backbone with a linear head named `linear_head` over
{info["num_classes"]} classes (see `{ADAPTER_INFO}`), then
`peft.PeftModel.from_pretrained(model, "<this folder>")`. Loading onto any other module tree
(for example a plain `timm.create_model(...)`) does not fail, but leaves the LoRA factors
and the head untrained: check that every key of `adapter_model.safetensors` was loaded."""


def load_classifier(folder: str | Path) -> PeftModel | SequenceClassifier:
    """The classifier an export folder (or a run folder, whose ``adapter/`` is used) describes.

    Images: a PeftModel over the rebuilt backbone and head. Text: peft's
    ``AutoPeftModelForSequenceClassification`` inside a
    :class:`~lorm_flwr.models.backbones.SequenceClassifier`, which takes the app's
    ``-1``-padded ids. Raises ``ValueError`` when the folder lacks what rebuilding
    needs, or when any LoRA factor or head tensor of the adapter did not land in the
    rebuilt model.
    """
    path = Path(folder).expanduser()
    if (path / "adapter" / ADAPTER_INFO).exists():
        path = path / "adapter"
    if not (path / ADAPTER_INFO).exists():
        raise ValueError(f"{path} has no {ADAPTER_INFO}: not an adapter exported by lorm-flwr")
    info = json.loads((path / ADAPTER_INFO).read_text())
    if info["modality"] == "generation":
        from peft import AutoPeftModelForCausalLM

        with quiet_transformers():
            model = AutoPeftModelForCausalLM.from_pretrained(str(path)).eval()
        _check_loaded(model, path)
        tokenizer = load_tokenizer(str(path))
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        return CausalLM(model, pad).eval()
    if info["modality"] == "text":
        from peft import AutoPeftModelForSequenceClassification

        with quiet_transformers():  # the base's head is "newly initialized", then loaded
            model = AutoPeftModelForSequenceClassification.from_pretrained(str(path)).eval()
        _check_loaded(model, path)
        pad = load_tokenizer(str(path)).pad_token_id
        return SequenceClassifier(model, pad).eval()
    base = build_classifier(
        info["backbone"],
        info["image_size"],
        info["num_classes"],
        info["seed"],
        info["backbone_checkpoint"],
    )
    model = PeftModel.from_pretrained(base, str(path)).eval()
    _check_loaded(model, path)
    return model


def _check_loaded(model: PeftModel, path: Path) -> None:
    """Every tensor of the saved adapter is in ``model``, equal (peft skips unknown keys
    without a word)."""
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
