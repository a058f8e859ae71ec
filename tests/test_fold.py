"""Inference-only rewrites for the statistics pass: merged adapters, folded BatchNorm,
pointwise convolutions as matrix products.

Each must change activations only by float rounding, and leave the model exactly
as it was (tensors, modules, forwards, peft's merge state) when the pass ends.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorm_flwr.client.gram import layer_grams
from lorm_flwr.config import RunConfig
from lorm_flwr.math.fold import batchnorm_folded, conv_bn_pairs
from lorm_flwr.models.adapters import adapter_layout, get_tensors, merged_for_inference, set_tensors
from lorm_flwr.models.pointwise import is_pointwise, pointwise_as_matmul
from lorm_flwr.runtime import model_of


@pytest.fixture(scope="module")
def lite0():
    """The default backbone (EfficientNet-Lite0, 49 conv -> BatchNorm pairs) with non-zero adapters."""
    cfg = RunConfig.from_mapping(
        {"backbone": "efficientnet-lite0", "image-size": 32, "lora-rank": 2}
    )
    model = model_of(cfg)
    gen = torch.Generator().manual_seed(0)
    set_tensors(
        model,
        {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in get_tensors(model).items()},
    )
    model.eval()
    x = torch.randn(6, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    return model, x


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_merge_and_fold_change_outputs_only_by_rounding_and_restore_everything(lite0):
    model, x = lite0
    before = _snapshot(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        reference = model(x)
        with merged_for_inference(model):
            adapters = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
            assert len(adapters) == 32 and all(m.merged for m in adapters)
            with batchnorm_folded(model, x):
                folded = model(x)
                assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        after = model(x)
    torch.testing.assert_close(
        folded, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())
    )
    assert torch.equal(after, reference)  # bit for bit once the pass is over
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    now = model.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], v) for k, v in before.items())
    assert not any(m.merged for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_every_conv_bn_pair_of_lite0_is_found(lite0):
    model, x = lite0
    with torch.no_grad(), merged_for_inference(model):
        pairs = conv_bn_pairs(model, x[:1])
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(n for _, n in pairs) == sorted(norms)  # every BatchNorm here follows a conv
    assert len(pairs) == 49


def test_grams_on_the_folded_pointwise_model_equal_the_plain_ones(lite0):
    model, x = lite0
    targets = {
        ly.name: (model.get_submodule("base_model.model." + ly.name), ly.is_conv)
        for ly in adapter_layout(model)
    }
    alphas = {n: 1.0 for n in targets}
    images = x.permute(
        0, 2, 3, 1
    ).numpy()  # "raw" images the identity input spec returns as they are

    def inputs(batch, device):
        return (
            torch.from_numpy(batch)
            .permute(0, 3, 1, 2)
            .contiguous(memory_format=torch.channels_last)
        )

    def grams(fast: bool):
        folding = batchnorm_folded(model, x) if fast else contextlib.nullcontext()
        pointwise = pointwise_as_matmul(model) if fast else contextlib.nullcontext()
        with merged_for_inference(model), folding, pointwise:
            return layer_grams(
                model,
                targets,
                images,
                inputs=inputs,
                batch_size=4,
                device=torch.device("cpu"),
                alphas=alphas,
            )[0]

    plain, fast = grams(False), grams(True)
    assert plain.keys() == fast.keys() and len(plain) == 32
    for name in plain:
        scale = float(plain[name].abs().max())
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-4 * scale)


class _Residual(nn.Module):
    """conv -> bn, but the conv's output also feeds a skip connection: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _randomise_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def test_a_conv_output_used_twice_is_not_folded(caplog):
    model = _Residual().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        reference = model(x)
        with caplog.at_level(logging.WARNING), batchnorm_folded(model, x):
            inside = model(x)
            assert isinstance(model.bn, nn.BatchNorm2d)  # left in place
    assert "unfolded" in caplog.text
    assert torch.equal(inside, reference)


def test_a_plain_conv_bn_relu_stack_is_folded_exactly_enough():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1, bias=True),
        nn.BatchNorm2d(2),
    ).eval()
    _randomise_bn(model)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)
        with batchnorm_folded(model, x):
            assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
            folded = model(x)
        assert model[3].bias is not None and isinstance(model[4], nn.BatchNorm2d)
        assert torch.equal(model(x), reference)
    torch.testing.assert_close(folded, reference, rtol=1e-5, atol=1e-5)


def test_fold_refuses_training_mode_and_unmerged_adapters(lite0):
    model, x = lite0
    model.train()
    try:
        with pytest.raises(RuntimeError, match="eval mode"), batchnorm_folded(model, x):
            pass
    finally:
        model.eval()
    with pytest.raises(RuntimeError, match="merged_for_inference"), batchnorm_folded(model, x):
        pass
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # nothing left half-folded


def test_a_model_without_foldable_batchnorm_is_untouched():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).eval()
    x = torch.randn(2, 4)
    with torch.no_grad(), batchnorm_folded(model, x):
        assert isinstance(model[1], nn.LayerNorm)
        model(x)
    plain = nn.Sequential(
        nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False)
    ).eval()  # no gamma/beta
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad(), batchnorm_folded(plain, x):
        assert isinstance(plain[1], nn.BatchNorm2d)
        plain(x)


def _counting_conv2d(monkeypatch) -> list[int]:
    calls = [0]
    conv2d = torch.nn.functional.conv2d

    def counted(*args, **kwargs):
        calls[0] += 1
        return conv2d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", counted)
    return calls


def test_pointwise_convs_on_small_channels_last_maps_run_as_matrix_products(monkeypatch):
    conv = nn.Conv2d(6, 5, kernel_size=1)
    calls = _counting_conv2d(monkeypatch)
    with torch.no_grad():
        for h, channels_last, product in (
            (1, True, True),
            (4, True, True),
            (8, True, False),
            (2, False, False),
        ):
            x = torch.randn(3, 6, h, h)
            x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            reference = conv(x)
            before = calls[0]
            with pointwise_as_matmul(conv):
                y = conv(x)
            assert (calls[0] == before) is product, (
                h,
                channels_last,
            )  # no conv2d call when a product
            torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
            assert y.shape == reference.shape
            if product:
                assert y.is_contiguous(memory_format=torch.channels_last)
    assert "forward" not in vars(conv)


def test_pointwise_rewrite_covers_lite0_restores_forwards_and_refuses_nesting(lite0):
    model, x = lite0
    convs = [m for m in model.modules() if is_pointwise(m)]
    assert len(convs) == 96  # each of the 32 adapted 1x1 convs: base layer, lora_A, lora_B
    assert not any(
        is_pointwise(m)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
    )
    with torch.no_grad():
        reference = model(x)
        with merged_for_inference(model), batchnorm_folded(model, x), pointwise_as_matmul(model):
            assert all("forward" in vars(m) for m in convs)
            fast = model(x)
            with pytest.raises(RuntimeError, match="already active"), pointwise_as_matmul(model):
                pass
            assert all("forward" in vars(m) for m in convs)  # the refused inner block undid nothing
        with pytest.raises(ValueError, match="inside"), pointwise_as_matmul(model):
            raise ValueError("inside")
        assert not any("forward" in vars(m) for m in convs)
        assert torch.equal(model(x), reference)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
