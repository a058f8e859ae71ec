"""peft adapters: extract/load round trips change no output; freezing; reset."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import (
    adapter_layout,
    attach_lora,
    get_tensors,
    merged_for_inference,
    reset_lora,
    set_tensors,
    set_trainable,
)
from lorm_flwr.models.backbones import build_classifier
from lorm_flwr.models.export import ADAPTER_INFO, export_adapter, load_classifier


def _model(seed=0):
    base = build_classifier("vit-tiny", 32, 10, seed)
    return attach_lora(base, rank=2, alpha=4, targets=["qkv", "attn.proj", "fc1", "fc2"])


def _randomise(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_layout_lists_every_adapted_linear():
    layout = adapter_layout(_model())
    assert len(layout) == 2 * 4  # 2 blocks x (qkv, proj, fc1, fc2)
    qkv = layout[0]
    assert qkv.name.endswith("blocks.0.attn.qkv") and (qkv.d_in, qkv.d_out, qkv.rank) == (
        64,
        192,
        2,
    )
    assert qkv.scaling == 2.0 and not qkv.is_conv


def test_extract_load_round_trip_changes_no_output():
    x = torch.randn(4, 3, 32, 32)
    source = _model()
    _randomise(source, 1)
    target = _model()
    assert not torch.allclose(source(x), target(x))
    set_tensors(target, get_tensors(source))
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


CFG = RunConfig(strategy="fedit", dataset="digits", backbone="vit-tiny", image_size=32, lora_rank=2,
                lora_alpha=4.0, lora_targets="qkv,attn.proj,fc1,fc2")  # fmt: skip


def test_the_exported_adapter_describes_itself_and_reloads_exactly(tmp_path):
    x = torch.randn(4, 3, 32, 32)
    source = _model()
    _randomise(source, 2)
    folder = tmp_path / "adapter"
    export_adapter(source, get_tensors(source), folder, CFG, [[0, 1], [2, 3]], {"accuracy": 0.5})
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorm-flwr/vit-tiny"
    card = (folder / "README.md").read_text()
    assert (
        "Classes per task, in training order: [[0, 1], [2, 3]]" in card and "accuracy: 0.5" in card
    )
    assert "normalised with mean [0.5, 0.5, 0.5]" in card and "timm.create_model" in card
    # peft alone, onto the same classifier, and lorm-flwr's loader, from the folder alone
    reloaded = PeftModel.from_pretrained(build_classifier("vit-tiny", 32, 10, 0), folder)
    torch.testing.assert_close(reloaded.eval()(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(load_classifier(folder)(x), source(x), rtol=0, atol=0)


def test_loading_refuses_a_folder_whose_tensors_do_not_all_land(tmp_path):
    source = _model()
    folder = tmp_path / "adapter"
    export_adapter(source, get_tensors(source), folder, CFG, [[0, 1]])
    info = json.loads((folder / ADAPTER_INFO).read_text())
    (folder / ADAPTER_INFO).write_text(json.dumps({**info, "num_classes": 7}))  # another head
    with pytest.raises((ValueError, RuntimeError)):
        load_classifier(folder)
    with pytest.raises(ValueError, match="no lorm_flwr.json"):
        load_classifier(tmp_path / "elsewhere")


def test_set_trainable_and_reset():
    m = _model()
    set_trainable(m, train_a=False, train_b=True, train_head=True)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".lora_B." in n or "linear_head" in n for n in names)
    assert not any("backbone" in n and "lora" not in n for n in names)
    _randomise(m, 3)
    reset_lora(m, seed=5)
    first = get_tensors(m)
    reset_lora(m, seed=5)
    second = get_tensors(m)
    for layer in adapter_layout(m):
        assert torch.count_nonzero(first[layer.b_key]) == 0
        torch.testing.assert_close(first[layer.a_key], second[layer.a_key])


def test_vit_loads_a_local_checkpoint_without_the_network(tmp_path, monkeypatch):
    """backbone-checkpoint: timm reads the weights from a file; no socket is ever opened."""
    import socket

    from lorm_flwr.models.backbones import build_classifier

    source = build_classifier("vit-tiny", 16, 10, seed=0).backbone
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # unlike any seeded initialisation
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = build_classifier("vit-tiny", 16, 10, seed=7, checkpoint=str(path)).backbone
    want, got = source.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_initial_adapter_is_the_same_in_every_process():
    """The server and each client build the adapter in their own processes: A must not
    depend on the global RNG state (peft draws from it)."""
    import subprocess
    import sys

    code = (
        "import hashlib, torch\n"
        "from lorm_flwr.models.adapters import attach_lora, get_tensors\n"
        "from lorm_flwr.models.backbones import build_classifier\n"
        "torch.manual_seed(int(__import__('sys').argv[1]))\n"
        "m = attach_lora(build_classifier('vit-tiny', 16, 10, 3), rank=2, alpha=2.0,"
        " targets=['qkv'], seed=3)\n"
        "t = get_tensors(m)\n"
        "print(hashlib.sha256(b''.join(t[k].numpy().tobytes() for k in sorted(t))).hexdigest())\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code, str(s)], capture_output=True, text=True, check=True
        ).stdout.strip()
        for s in (1, 2)
    }
    assert len(digests) == 1


def test_merged_pass_changes_outputs_only_by_rounding_and_restores_everything():
    model = _model()
    _randomise(model, 3)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    with torch.no_grad():
        reference = model(x)
        with merged_for_inference(model):
            assert len(adapters) == 8 and all(m.merged for m in adapters)
            merged = model(x)
        after = model(x)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, reference)  # bit for bit: no W + sBA - sBA round-off
    assert not any(m.merged for m in adapters)
    assert all(p is params[n] for n, p in model.named_parameters())  # the same tensors are back
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # A failure inside the pass restores the model too.
    try:
        with merged_for_inference(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not any(m.merged for m in adapters)
    with torch.no_grad():
        assert torch.equal(model(x), reference)


def test_layout_is_cached_per_model_and_callers_get_their_own_list():
    model = _model()
    first = adapter_layout(model)
    first.clear()
    assert len(adapter_layout(model)) == 8
    assert adapter_layout(_model()) == adapter_layout(model)  # another model object, same layout


def test_a_target_that_matches_nothing_is_named_not_dropped():
    base = build_classifier("vit-tiny", 16, 10, 0)
    with pytest.raises(
        ValueError, match=r"lora-targets='qkv,nope': nope matches no module.*layer names: .*qkv"
    ):
        attach_lora(base, rank=2, alpha=2.0, targets=["qkv", "nope"])
