"""GPU code paths, checked on the CPU: autocast choice, pinned transfers, fp32 Gram sums."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lorm_flwr.client.gram import GramRecorder
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.train import InputSpec, autocast, pick_device, to_device, train_local


def test_precision_key_is_validated():
    with pytest.raises(ConfigError, match="precision"):
        RunConfig.from_mapping({"precision": "fp8"})
    assert RunConfig.from_mapping({"precision": "bf16"}).precision == "bf16"


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_forward_autocasts_to_the_chosen_dtype(precision, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on this machine
        ctx = autocast(torch.device("cuda"), precision)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == dtype


def test_fp32_and_cpu_do_not_autocast():
    assert isinstance(autocast(torch.device("cuda"), "fp32"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "bf16"), contextlib.nullcontext)
    with pytest.raises(ValueError, match="unknown precision"):
        autocast(torch.device("cpu"), "fp8")


def test_device_auto_is_cpu_here_and_cuda_request_fails_clearly():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda")


def test_host_batches_reach_the_device_unchanged():
    x = torch.arange(12).reshape(3, 4)
    assert torch.equal(to_device(x, torch.device("cpu")), x)
    spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    batch = spec(np.zeros((2, 8, 8), dtype=np.uint8), torch.device("cpu"))
    assert batch.shape == (2, 3, 8, 8) and batch.is_contiguous(memory_format=torch.channels_last)


def test_half_precision_activations_are_multiplied_in_fp32_and_summed_in_fp64():
    lin = nn.Linear(4, 2).to(torch.float16)
    rec = GramRecorder({"lin": (lin, False)})
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 4, generator=gen).to(torch.float16) for _ in range(2)]
    with rec.recording():
        lin(xs[0])
        assert rec.stats["lin"].gram.dtype == torch.float32  # one batch: its fp32 product
        lin(xs[1])
    g = rec.grams()["lin"]
    assert g.dtype == torch.float64  # summed over batches
    X = torch.cat(xs).double()
    torch.testing.assert_close(g, X.T @ X, rtol=1e-5, atol=1e-5)  # fp32 products


def test_training_with_a_precision_setting_runs_on_the_cpu():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    spec = InputSpec(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    images = np.random.default_rng(0).integers(0, 255, size=(10, 8, 8), dtype=np.uint8)
    stats = train_local(
        model, images, np.arange(10) % 2, task_classes=[0, 1], inputs=spec, epochs=1,
        batch_size=4, lr=1e-2, weight_decay=0.0, device=torch.device("cpu"), seed=0,
        precision="fp16",
    )  # fmt: skip
    assert stats.steps == 3 and np.isfinite(stats.loss)


@pytest.mark.parametrize("projected", [False, True])
def test_gram_products_stay_fp32_inside_an_autocast_forward(projected):
    """The hooks run inside the forward's autocast; the Gram product must not follow it
    (in fp16 an entry above 65504 would be inf, in bf16 it loses 3 digits)."""
    from lorm_flwr.client.gram import GramStats

    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 100
    a = torch.randn(4, 300, generator=torch.Generator().manual_seed(1))
    stats = GramStats(diagonal=False, projection=a if projected else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats.add(x)
    codes = x @ a.T if projected else x
    assert stats.gram.dtype == torch.float32
    torch.testing.assert_close(stats.gram, codes.T @ codes, rtol=1e-5, atol=1e-2)
