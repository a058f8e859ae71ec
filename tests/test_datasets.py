"""Data registry: offline sources load; hub-only sources fail clearly when offline."""

from __future__ import annotations

import numpy as np
import pytest

from lorm_flwr.data import datasets as D


def test_mnist_is_bundled_and_split_per_class():
    data = D.load_dataset("mnist", 0.2, 0)
    assert data.train_x.dtype == np.uint8 and data.train_x.shape[1:] == (28, 28)
    assert len(data.train_y) + len(data.test_y) == 5000
    assert np.bincount(data.test_y).tolist() == [100] * 10  # 20% of 500 per class
    assert data.class_names == tuple(str(i) for i in range(10))


def test_digits_loads():
    data = D.load_dataset("digits", 0.2, 0)
    assert data.train_x.shape[1:] == (8, 8) and data.num_classes == 10


def test_hub_dataset_offline_raises_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(D.DataUnavailableError, match="uoft-cs/cifar100"):
        D._load_cifar100(0.2, 0)


def test_a_test_fraction_that_empties_a_split_names_the_key():
    from lorm_flwr.config import ConfigError, RunConfig
    from lorm_flwr.runtime import scenario_of

    with pytest.raises(
        ConfigError, match=r"test-fraction=0.9999 leaves the training split of 'mnist'"
    ):
        scenario_of(RunConfig(test_fraction=0.9999, max_samples_per_class=10), 3)
