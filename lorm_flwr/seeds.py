"""Every derived seed of a run, from the run's ``seed`` (one place, named).

Each function is a fixed integer formula, so the server and every client derive
the same seeds in any process, and runs repeat exactly.
"""

from __future__ import annotations

__all__ = [
    "client_shuffle_seed",
    "gram_pass_seed",
    "joint_phase_seed",
    "participants_seed",
    "round_seed",
    "task_factors_seed",
    "task_grams_seed",
    "task_split_seed",
    "test_split_seed",
    "validation_split_seed",
]


def round_seed(seed: int, task: int, round_in_task: int) -> int:
    """The seed the server sends with a training round."""
    return seed * 100_003 + task * 1_009 + round_in_task


def client_shuffle_seed(round_seed: int, partition_id: int) -> int:
    """A client's batch shuffling in a round: distinct per client."""
    return round_seed * 1_000 + partition_id


def task_factors_seed(seed: int, task: int) -> int:
    """LoRM's fresh A (and zero B) at the start of ``task``."""
    return seed * 7_919 + task


def task_split_seed(seed: int, task: int) -> int:
    """The Dirichlet split of ``task``'s training samples over the clients."""
    return seed + task


def test_split_seed(seed: int, task: int) -> int:
    """The split of ``task``'s test samples over the clients (personalised evaluation)."""
    return seed + 10_007 * (task + 1)


def joint_phase_seed(seed: int, phase: int) -> int:
    """Batch shuffling of the non-federated ``joint`` strategies in ``phase``."""
    return seed * 1_009 + phase


def gram_pass_seed(train_seed: int) -> int:
    """The augmentation of a client's Gram passes after training with ``train_seed``."""
    return train_seed * 2 + 1


def task_grams_seed(seed: int, task: int, partition_id: int) -> int:
    """The augmentation of a client's end-of-task Gram passes (LoRM)."""
    return (seed * 100_003 + task * 1_009) * 1_000 + partition_id + 999


def head_init_seed(seed: int) -> int:
    """timm's head initialisation (``head-init=trunc-normal``): apart from the LoRA factors'."""
    return seed * 5 + 40_009


def validation_shards_seed(seed: int, task: int) -> int:
    """The split of ``task``'s validation samples over the clients (``select-round``)."""
    return seed + 30_011 * (task + 1)


def validation_split_seed(seed: int) -> int:
    """The validation samples held out of the training data (``validation-fraction``)."""
    return seed * 3 + 20_011


def participants_seed(seed: int, task: int, round_in_task: int) -> int:
    """Which clients a round samples (``clients-per-round``)."""
    return round_seed(seed, task, round_in_task) * 2 + 7
