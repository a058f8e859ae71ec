"""The federated class-incremental scenario: class order, tasks, non-IID client shards.

Classes are put in order (natural, or a seeded shuffle) and cut into ``num_tasks``
tasks of disjoint classes. Each task's training samples are spread over the
clients with flwr-datasets' ``DirichletPartitioner`` (Dirichlet(beta) over clients
per class, redrawn until every client has ``min_samples_per_client``). The same
seed gives the same scenario on the server and on every client.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lorm_flwr.errors import ConfigError
from lorm_flwr.seeds import task_split_seed, test_split_seed

__all__ = [
    "Scenario",
    "ScenarioError",
    "build_scenario",
    "class_order",
    "split_classes",
    "split_like",
]


class ScenarioError(ConfigError):
    """The data cannot be split as configured (raised before any training)."""


def class_order(num_classes: int, order: str, seed: int) -> list[int]:
    """Natural order ``0..C-1`` or a permutation drawn from ``seed``."""
    if order == "natural":
        return list(range(num_classes))
    return [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]


def split_classes(order: list[int], num_tasks: int, classes_per_task: int = 0) -> list[list[int]]:
    """Cut the class order into ``num_tasks`` contiguous, disjoint tasks.

    ``classes_per_task`` 0: near-equal tasks (sizes differ by at most one). Otherwise
    every task but the last holds ``classes_per_task`` classes and the last the rest, as
    the LoRM reference cuts Cars-196 (9 tasks of 20, then 16).
    """
    if not 1 <= num_tasks <= len(order):
        raise ScenarioError(
            f"num-tasks={num_tasks} is invalid: must be between 1 and {len(order)} classes"
        )
    if classes_per_task:
        last = len(order) - classes_per_task * (num_tasks - 1)
        if classes_per_task < 0 or last < 1:
            raise ScenarioError(
                f"classes-per-task={classes_per_task} is invalid: {num_tasks - 1} tasks of "
                f"{classes_per_task} leave {last} of the {len(order)} classes for the last task"
            )
        cuts = [classes_per_task * t for t in range(1, num_tasks)]
        return [[int(c) for c in part] for part in np.split(np.asarray(order), cuts)]
    return [[int(c) for c in part] for part in np.array_split(np.asarray(order), num_tasks)]


def dirichlet_split(
    labels: np.ndarray, num_clients: int, beta: float, min_samples: int, seed: int
) -> list[np.ndarray]:
    """Indices into ``labels`` for each client, Dirichlet(beta) over clients per class."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    if num_clients == 1:
        return [np.arange(len(labels))]
    if len(labels) < num_clients * max(min_samples, 1):
        raise ScenarioError(
            f"min-samples-per-client={min_samples} cannot be met: the task has only "
            f"{len(labels)} training samples for {num_clients} clients"
        )
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=beta,
        min_partition_size=min_samples,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict(
        {"label": labels.astype(np.int64), "index": np.arange(len(labels))}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on each redraw; we report the outcome
        try:
            return [
                np.asarray(partitioner.load_partition(k)["index"][:], dtype=np.int64)
                for k in range(num_clients)
            ]
        except ValueError as exc:
            raise ScenarioError(
                f"min-samples-per-client={min_samples} could not be met with "
                f"dirichlet-beta={beta} and {num_clients} clients after 10 Dirichlet "
                f"draws ({len(labels)} samples in the task); raise dirichlet-beta, "
                "lower min-samples-per-client, or use fewer clients"
            ) from exc


def split_like(
    train_labels: np.ndarray, train_parts: list[np.ndarray], test_labels: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Split test samples over clients with each class's training proportions.

    For every class, client k receives the share of that class's test samples that
    it holds of its training samples: the same Dirichlet draw, applied to the test
    set. Indices are into ``test_labels``.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in train_parts]
    for c in np.unique(train_labels):
        counts = np.array([np.sum(train_labels[p] == c) for p in train_parts], dtype=float)
        idx = rng.permutation(np.flatnonzero(test_labels == c))
        if counts.sum() == 0 or len(idx) == 0:
            continue
        cuts = np.round(np.cumsum(counts / counts.sum()) * len(idx)).astype(int)[:-1]
        for k, piece in enumerate(np.split(idx, cuts)):
            parts[k].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def personal_shards(
    train_labels: np.ndarray,
    scenario: Scenario,
    labels: np.ndarray,
    seed_of_task: Callable[[int], int],
) -> tuple[tuple[np.ndarray, ...], ...]:
    """``out[t][k]``: client k's share of task t's samples in another split (``labels``,
    e.g. the validation split), with each class's training proportions
    (:func:`split_like`), as ``scenario.test_shards`` are for the test split."""
    out = []
    for t, classes in enumerate(scenario.tasks):
        inside = np.flatnonzero(np.isin(labels, classes))
        parts = split_like(train_labels, list(scenario.shards[t]), labels[inside], seed_of_task(t))
        out.append(tuple(inside[p] for p in parts))
    return tuple(out)


@dataclass(frozen=True)
class Scenario:
    """Tasks and shards. ``shards[t][k]`` indexes the training set for client k, task t;
    ``test_shards[t][k]`` the test set (same per-class proportions), for personalised
    evaluation."""

    tasks: tuple[tuple[int, ...], ...]
    shards: tuple[tuple[np.ndarray, ...], ...]
    test_shards: tuple[tuple[np.ndarray, ...], ...] = ()

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_clients(self) -> int:
        return len(self.shards[0])

    def seen_classes(self, task: int) -> list[int]:
        """Classes of tasks ``0..task``, in task order."""
        return [c for t in self.tasks[: task + 1] for c in t]

    def shard_sizes(self) -> list[list[int]]:
        return [[len(s) for s in task] for task in self.shards]


def build_scenario(
    train_labels: np.ndarray,
    num_classes: int,
    *,
    test_labels: np.ndarray | None = None,
    num_tasks: int,
    num_clients: int,
    beta: float,
    min_samples: int,
    order: str,
    seed: int,
    classes_per_task: int = 0,
) -> Scenario:
    """Split classes into tasks and each task's samples over clients.

    Raises :class:`ScenarioError` (a :class:`ConfigError`) naming the key at fault.
    """
    if num_clients < 1:
        raise ScenarioError(f"the federation has {num_clients} clients; need at least 1")
    tasks = split_classes(class_order(num_classes, order, seed), num_tasks, classes_per_task)
    shards, test_shards = [], []
    for t, classes in enumerate(tasks):
        in_task = np.flatnonzero(np.isin(train_labels, classes))  # (n_t,)
        parts = dirichlet_split(
            train_labels[in_task], num_clients, beta, min_samples, task_split_seed(seed, t)
        )
        shards.append(tuple(np.sort(in_task[p]) for p in parts))
        if test_labels is not None:
            test_in = np.flatnonzero(np.isin(test_labels, classes))
            test_parts = split_like(
                train_labels, list(shards[-1]), test_labels[test_in], test_split_seed(seed, t)
            )
            test_shards.append(tuple(test_in[p] for p in test_parts))
    return Scenario(tuple(tuple(c) for c in tasks), tuple(shards), tuple(test_shards))
