"""The reference's preprocessing and head, one key each: ``normalize``,
``resize-interpolation`` and ``head-init``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.train import InputSpec

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _images(n=2, side=20):
    return np.random.default_rng(0).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def test_without_normalize_inputs_stay_in_0_1():
    images = _images()
    raw = InputSpec(20, MEAN, STD, normalize=False)(images, CPU)
    normalised = InputSpec(20, MEAN, STD)(images, CPU)
    torch.testing.assert_close(raw, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(normalised, (raw - 0.5) / 0.5)


def test_bicubic_resize_is_pils_bicubic_up_to_uint8_rounding():
    images = _images(side=40)
    x = InputSpec(16, MEAN, STD, normalize=False, interpolation="bicubic")(images, CPU)
    pil = np.stack(
        [np.asarray(Image.fromarray(im).resize((16, 16), Image.BICUBIC)) for im in images]
    )
    want = torch.from_numpy(pil).permute(0, 3, 1, 2).float() / 255
    assert (x - want).abs().max() <= 3 / 255  # PIL rounds to uint8 between its two passes
    bilinear = InputSpec(16, MEAN, STD, normalize=False)(images, CPU)
    assert (bilinear - want).abs().max() > 3 / 255  # the default really is another resize
    assert x.min() >= 0 and x.max() <= 1


def test_timm_head_init_is_trunc_normal_with_zero_bias_from_the_seed():
    from lorm_flwr.models.adapters import model_layout
    from lorm_flwr.runtime import initial_tensors, model_of

    keys = {"backbone": "vit-tiny", "dataset": "digits", "image-size": 16, "lora-rank": 2}
    timm_cfg = RunConfig.from_mapping({**keys, "head-init": "trunc-normal"})
    ours = initial_tensors(RunConfig.from_mapping(keys))
    theirs = initial_tensors(timm_cfg)
    (head,) = model_layout(model_of(timm_cfg)).heads
    w, b = theirs[head.weight_key], theirs[head.bias_key]
    assert torch.count_nonzero(b) == 0 and abs(float(w.std()) - 0.02) < 0.005
    assert not torch.equal(w, ours[head.weight_key])
    other_seed = initial_tensors(
        RunConfig.from_mapping({**keys, "head-init": "trunc-normal", "seed": 1})
    )
    assert not torch.equal(other_seed[head.weight_key], w)
    # everything but the head is as before
    assert all(torch.equal(theirs[k], ours[k]) for k in ours if not k.startswith("linear_head."))


@pytest.mark.parametrize(
    "key, value",
    [("normalize", False), ("resize-interpolation", "bicubic"), ("head-init", "trunc-normal")],
)
def test_image_preprocessing_keys_are_refused_for_text(key, value):
    with pytest.raises(ConfigError, match=f"{key}=.* applies to images"):
        RunConfig.from_mapping({"dataset": "bbc-news", "backbone": "tiny-bert", key: value})
    with pytest.raises(ConfigError, match="resize-interpolation"):
        RunConfig.from_mapping({"resize-interpolation": "nearest"})
