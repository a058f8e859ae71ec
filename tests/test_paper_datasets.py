"""The LoRM paper's other data sets (ImageNet-R/A, CUB-200, Cars-196) and their transforms.

The hub is out of reach here, so ``datasets.load_dataset`` is replaced by small in-memory
data sets of the same columns; what is checked is our side: the stored size and pixels, the
labels and class names, the split, and the preset transforms on the images.
"""

from __future__ import annotations

import datasets as hf_datasets
import numpy as np
import pytest
import torch
from PIL import Image

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.datasets import DATASETS
from lorm_flwr.data.scenario import ScenarioError, split_classes
from lorm_flwr.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from lorm_flwr.runtime import input_spec


def _images(sizes: list[tuple[int, int]], mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(0)
    shape = {"RGB": lambda w, h: (h, w, 3), "L": lambda w, h: (h, w)}[mode]
    return [Image.fromarray(rng.integers(0, 256, shape(w, h), dtype=np.uint8)) for w, h in sizes]


def load_dataset(name: str, test_fraction: float, seed: int):
    """The loader itself: the registry's load_dataset caches per process."""
    data = DATASETS[name].load(test_fraction, seed)
    assert data.num_classes == DATASETS[name].num_classes
    return data


def _names(first: list[str], total: int) -> list[str]:
    return first + [f"class {i}" for i in range(len(first), total)]


def _labelled(images, labels, names) -> hf_datasets.Dataset:
    features = hf_datasets.Features(
        {"image": hf_datasets.Image(), "label": hf_datasets.ClassLabel(names=names)}
    )
    return hf_datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture
def hub(monkeypatch):
    """``hub[repo] = DatasetDict``: what ``datasets.load_dataset(repo)`` returns."""
    repos: dict[str, hf_datasets.DatasetDict] = {}

    def load_dataset(repo, *args, **kwargs):
        return repos[repo]

    monkeypatch.setattr(hf_datasets, "load_dataset", load_dataset)
    return repos


def test_cars_store_the_center_square_of_the_shorter_side_resized_to_224(hub):
    names = _names(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], 196)
    train = _images([(300, 200), (200, 450)])
    test = _images([(224, 224), (100, 60)], mode="L")  # grayscale and smaller than 224 too
    hub["tanganke/stanford_cars"] = hf_datasets.DatasetDict(
        train=_labelled(train, [1, 0], names), test=_labelled(test, [0, 1], names)
    )
    data = load_dataset("cars196", 0.2, 0)
    assert data.train_x.shape == (2, 224, 224, 3) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (2, 224, 224, 3)
    assert data.train_y.tolist() == [1, 0] and data.test_y.tolist() == [0, 1]
    assert data.class_names == tuple(names)
    # 300x200 -> 336x224 (bicubic), then the center 224 columns
    expect = np.asarray(train[0].resize((336, 224), Image.Resampling.BICUBIC))[:, 56:280]
    assert np.array_equal(data.train_x[0], expect)
    gray = np.asarray(test[1].convert("RGB").resize((373, 224), Image.Resampling.BICUBIC))
    assert np.array_equal(data.test_x[1], gray[:, 74:298])


def test_cub_squashes_every_image_to_224_bicubic_and_keeps_the_official_split(hub):
    names = [f"{i:03d}.bird" for i in range(1, 201)]
    train, test = _images([(500, 333), (280, 500), (64, 64)]), _images([(400, 300)])
    hub["bentrevett/caltech-ucsd-birds-200-2011"] = hf_datasets.DatasetDict(
        train=_labelled(train, [0, 1, 2], names), test=_labelled(test, [2], names)
    )
    data = load_dataset("cub200", 0.2, 0)
    assert len(data.train_y) == 3 and data.test_y.tolist() == [2]
    for img, stored in zip(train, data.train_x):
        assert np.array_equal(stored, np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC)))


def test_imagenet_r_labels_by_sorted_wordnet_id_and_holds_out_test_fraction_per_class(hub):
    # 200 classes, 10 images each, listed out of order
    wnids = [f"n{c:03d}" for c in (2, 1, 3)] * 10 + [f"n{c:03d}" for c in range(4, 201)] * 10
    class_names = {"n001": "goldfish", "n002": "shark", "n003": "hen"}
    class_names |= {f"n{c:03d}": f"class {c}" for c in range(4, 201)}
    part = hf_datasets.Dataset.from_dict(
        {
            "image": _images([(50 + i % 7, 40) for i in range(len(wnids))]),
            "wnid": wnids,
            "class_name": [class_names[w] for w in wnids],
        },
        features=hf_datasets.Features(
            {
                "image": hf_datasets.Image(),
                "wnid": hf_datasets.Value("string"),
                "class_name": hf_datasets.Value("string"),
            }
        ),
    )
    hub["axiong/imagenet-r"] = hf_datasets.DatasetDict(test=part)
    data = load_dataset("imagenet-r", 0.2, 0)
    assert data.class_names[:3] == ("goldfish", "shark", "hen")
    assert data.train_x.shape[1:] == (224, 224, 3)
    assert np.bincount(data.test_y).tolist() == [2] * 200  # 20% of each class
    assert np.bincount(data.train_y).tolist() == [8] * 200
    again = load_dataset("imagenet-r", 0.2, 1)  # the run's seed draws the split
    assert not np.array_equal(again.test_x, data.test_x)


def test_imagenet_a_splits_its_one_hub_split_per_class(hub):
    names = _names(["n01498041", "n01531178"], 200)
    hub["barkermrl/imagenet-a"] = hf_datasets.DatasetDict(
        train=_labelled(_images([(90, 60)] * 1000), list(range(200)) * 5, names)
    )
    data = load_dataset("imagenet-a", 0.2, 0)
    assert data.class_names == tuple(names)
    assert np.bincount(data.test_y).tolist() == [1] * 200
    assert np.bincount(data.train_y).tolist() == [4] * 200


def test_paper_data_sets_are_registered_with_their_class_counts():
    counts = {name: DATASETS[name].num_classes for name in ("imagenet-r", "imagenet-a")}
    counts |= {name: DATASETS[name].num_classes for name in ("cub200", "cars196")}
    assert counts == {"imagenet-r": 200, "imagenet-a": 200, "cub200": 200, "cars196": 196}


def test_classes_per_task_cuts_cars_as_the_reference_and_is_checked():
    sizes = [len(t) for t in split_classes(list(range(196)), 10, 20)]
    assert sizes == [20] * 9 + [16]
    assert [len(t) for t in split_classes(list(range(196)), 10)] == [20] * 6 + [19] * 4
    with pytest.raises(ScenarioError, match="classes-per-task=25"):
        split_classes(list(range(196)), 10, 25)
    with pytest.raises(ConfigError, match="classes-per-task=3 is invalid"):
        RunConfig.from_mapping({"classes-per-task": 3})  # 4 x 3 > mnist's 10 classes
    assert RunConfig.from_mapping({"classes-per-task": 2}).classes_per_task == 2


def test_normalize_takes_imagenet_statistics_and_bad_values_are_named():
    assert RunConfig.from_mapping({"normalize": "false"}).normalize is False
    assert RunConfig.from_mapping({"normalize": True}).normalize is True
    cfg = RunConfig.from_mapping({"normalize": "imagenet"})
    spec = input_spec(cfg)
    assert spec.normalize and (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)
    white = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    x = spec(white, torch.device("cpu"))
    expect = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expect))
    with pytest.raises(ConfigError, match="normalize='yes' is invalid"):
        RunConfig.from_mapping({"normalize": "yes"})
    with pytest.raises(ConfigError, match="normalize=1 is invalid"):
        RunConfig.from_mapping({"normalize": 1})


@pytest.mark.parametrize("augmentation", ["random-resized-crop", "random-crop", "flip"])
def test_each_augmentation_gives_training_inputs_of_image_size_and_repeats_under_a_seed(
    augmentation,
):
    cfg = RunConfig.from_mapping(
        {"augment": True, "augmentation": augmentation, "image-size": 24, "normalize": False}
    )
    spec = input_spec(cfg, train=True)
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    torch.manual_seed(0)
    x = spec(images, torch.device("cpu"))
    torch.manual_seed(0)
    assert x.shape == (6, 3, 24, 24) and torch.equal(x, spec(images, torch.device("cpu")))
    assert 0.0 <= x.min() and x.max() <= 1.0
    if augmentation == "flip":  # the plain resize, each image mirrored or not
        plain = input_spec(cfg.replace(augment=False, augmentation="random-resized-crop"))(
            images, torch.device("cpu")
        )
        for a, b in zip(x, plain):
            assert torch.allclose(a, b, atol=1e-6) or torch.allclose(a, b.flip(-1), atol=1e-6)


def test_augmentation_without_augment_is_refused():
    with pytest.raises(ConfigError, match="augmentation='flip' chooses how augment=true"):
        RunConfig.from_mapping({"augmentation": "flip"})
    with pytest.raises(ConfigError, match="augmentation='zoom'"):
        RunConfig.from_mapping({"augment": True, "augmentation": "zoom"})
