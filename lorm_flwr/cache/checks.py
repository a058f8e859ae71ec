"""Whether what a node-cache entry holds fits the key it was looked up by.

The digests of :mod:`lorm_flwr.cache.entry` catch damage to the files; these checks catch
values that could not have come from the key (a writer who also recomputed the digests, or
a bug): labels that are not int64 classes of the data set, x and y of different lengths,
shards that are not the task's samples, tasks that the key's class order does not give.
Each raises :class:`~lorm_flwr.cache.entry.Damaged`, and the entry is rebuilt. They read
every label and index once (the arrays of x only by their shape and dtype, except token ids).
"""

from __future__ import annotations

import numpy as np

from lorm_flwr.cache.entry import Damaged
from lorm_flwr.data.datasets import LabelledData
from lorm_flwr.data.scenario import Scenario, ScenarioError, class_order, split_classes

__all__ = ["check_data", "check_scenario"]

PAD = -1  # lorm_flwr.data.text's padding id


def _labels(name: str, y: np.ndarray, num_classes: int) -> None:
    if y.ndim != 1 or y.dtype != np.int64:
        raise Damaged(f"{name} is {y.dtype} {y.shape}, not int64 labels (N,)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise Damaged(f"{name} has labels outside 0..{num_classes - 1}")


def _samples(
    name: str, x: np.ndarray, like: tuple[int, ...], text_length: int | None, prompts: bool = False
) -> None:
    if x.shape[1:] != like:
        raise Damaged(f"{name} has samples of shape {x.shape[1:]}, train_x {like}")
    if text_length is None:
        if x.dtype != np.uint8 or not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)):
            raise Damaged(f"{name} is {x.dtype} {x.shape}, not uint8 images (N, H, W[, 3])")
    elif x.dtype != np.int32 or x.ndim != 2 or x.shape[1] != text_length:
        raise Damaged(f"{name} is {x.dtype} {x.shape}, not int32 token ids (N, {text_length})")
    elif len(x) and int(x.min()) < PAD and not prompts:  # instructions store prompts below -1
        raise Damaged(f"{name} has token ids below {PAD}")


def check_data(
    data: LabelledData,
    *,
    num_classes: int,
    text_length: int | None,
    validation: bool,
    prompts: bool = False,
) -> None:
    """``data`` is a prepared data set of ``num_classes`` classes: images, or token ids of
    ``text_length`` (not None); with a validation split exactly when ``validation``."""
    names = data.class_names
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise Damaged(f"{len(names)} class names for a data set of {num_classes} classes")
    splits = [("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)]
    has = (data.validation_x is not None, data.validation_y is not None)
    if has != (validation, validation):
        state = "absent" if validation else "present"
        raise Damaged(f"validation arrays {state} although validation-fraction is "
                      f"{'> 0' if validation else '0'}")  # fmt: skip
    if validation:
        splits.append(("validation", data.validation_x, data.validation_y))
    if not len(data.train_y):
        raise Damaged("no training samples")
    for split, x, y in splits:
        _labels(f"{split}_y", y, num_classes)
        if len(x) != len(y):
            raise Damaged(f"{split}_x has {len(x)} samples for {len(y)} labels")
        _samples(f"{split}_x", x, data.train_x.shape[1:], text_length, prompts)


def _shards(
    what: str, parts: tuple[np.ndarray, ...], labels: np.ndarray, classes: tuple[int, ...]
) -> None:
    """``parts`` (one per client) split the samples of ``classes`` in ``labels``, each once."""
    for k, part in enumerate(parts):
        if part.ndim != 1 or not np.issubdtype(part.dtype, np.integer):
            raise Damaged(f"{what}, client {k}: {part.dtype} {part.shape}, not indices (n,)")
        if len(part) and (int(part.min()) < 0 or int(part.max()) >= len(labels)):
            raise Damaged(f"{what}, client {k}: indices outside 0..{len(labels) - 1}")
    every = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    if not np.array_equal(every, np.flatnonzero(np.isin(labels, classes))):
        raise Damaged(f"{what} are not the samples of classes {list(classes)}, each once")


def check_scenario(
    scenario: Scenario, *, data: LabelledData, num_tasks: int, num_clients: int, order: str,
    seed: int, classes_per_task: int = 0,
) -> None:  # fmt: skip
    """``scenario`` is one that ``build_scenario`` could draw for these settings on ``data``."""
    try:
        tasks = split_classes(
            class_order(data.num_classes, order, seed), num_tasks, classes_per_task
        )
    except ScenarioError as exc:
        raise Damaged(str(exc)) from exc
    if [list(t) for t in scenario.tasks] != tasks:
        raise Damaged(f"tasks {scenario.tasks} are not those of the key's class order")
    for name, shards in (("train", scenario.shards), ("test", scenario.test_shards)):
        if len(shards) != num_tasks or any(len(task) != num_clients for task in shards):
            raise Damaged(f"{name} shards are not {num_tasks} tasks of {num_clients} clients")
    for t, classes in enumerate(scenario.tasks):
        _shards(f"the training shards of task {t}", scenario.shards[t], data.train_y, classes)
        _shards(f"the test shards of task {t}", scenario.test_shards[t], data.test_y, classes)
