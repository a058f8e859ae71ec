"""The class-incremental split: disjoint tasks, every sample once, seeded, minimum size."""

from __future__ import annotations

import numpy as np
import pytest

from lorm_flwr.data.scenario import build_scenario, class_order, split_classes


def _labels(num_classes=10, per_class=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def _scenario(labels, **kw):
    args = {
        "num_tasks": 5,
        "num_clients": 3,
        "beta": 0.5,
        "min_samples": 6,
        "order": "natural",
        "seed": 0,
    }
    args.update(kw)
    return build_scenario(labels, 10, **args)


def test_tasks_are_disjoint_and_cover_all_classes():
    s = _scenario(_labels())
    flat = [c for t in s.tasks for c in t]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == 10
    assert s.tasks[0] == (0, 1)


def test_every_sample_assigned_exactly_once_to_its_task():
    labels = _labels()
    s = _scenario(labels)
    all_idx = np.concatenate([shard for task in s.shards for shard in task])
    assert len(all_idx) == len(labels) and len(np.unique(all_idx)) == len(labels)
    for t, task in enumerate(s.shards):
        for shard in task:
            assert set(labels[shard]) <= set(s.tasks[t])


def test_seeded_determinism_and_seed_sensitivity():
    labels = _labels()
    a, b = _scenario(labels, seed=3), _scenario(labels, seed=3)
    c = _scenario(labels, seed=4)
    for ta, tb in zip(a.shards, b.shards):
        for x, y in zip(ta, tb):
            np.testing.assert_array_equal(x, y)
    assert any(
        not np.array_equal(x, y) for ta, tc in zip(a.shards, c.shards) for x, y in zip(ta, tc)
    )


def test_minimum_samples_per_client_holds():
    s = _scenario(_labels(), min_samples=20)
    assert min(min(sizes) for sizes in s.shard_sizes()) >= 20


def test_small_beta_is_non_iid():
    labels = _labels(per_class=200)
    s = _scenario(labels, beta=0.1, num_tasks=1, min_samples=1)
    # With beta 0.1 some client's class mix is far from uniform.
    mixes = [np.bincount(labels[sh], minlength=10) / len(sh) for sh in s.shards[0]]
    assert max(np.abs(m - 0.1).max() for m in mixes) > 0.2


def test_shuffled_class_order_is_a_seeded_permutation():
    order = class_order(10, "shuffle", 7)
    assert sorted(order) == list(range(10)) and order == class_order(10, "shuffle", 7)
    assert order != list(range(10))
    assert split_classes(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError):
        split_classes(list(range(4)), 5)
