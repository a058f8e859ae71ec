"""The per-node disk cache: same results as without it, safe when damaged, shared, or off."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest

from lorm_flwr import node_cache, runtime
from lorm_flwr.config import RunConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()
    yield tmp_path / "cache"
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()


def _entries(root, kind):
    return sorted(p for p in root.glob(f"{kind}-*") if p.is_dir())


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    assert node_cache.cache_root() is None
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path))
    assert node_cache.cache_root() == tmp_path
    monkeypatch.delenv(node_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert node_cache.cache_root() == tmp_path / "xdg" / "lorm-flwr"


def test_an_entry_is_computed_once_then_loaded(cache):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(5)}

    def load(folder):
        return node_cache.load_arrays(folder, ["x"])

    first = node_cache.cached("t", {"a": 1}, compute, node_cache.save_arrays, load)
    second = node_cache.cached("t", {"a": 1}, compute, node_cache.save_arrays, load)
    assert calls == [1]
    np.testing.assert_array_equal(first["x"], second["x"])
    assert isinstance(second["x"], np.memmap) and not second["x"].flags.writeable
    node_cache.cached("t", {"a": 2}, compute, node_cache.save_arrays, load)  # another key
    assert calls == [1, 1] and len(_entries(cache, "t")) == 2
    assert not list(cache.glob(".t-*")), "no temporary folder is left behind"


def test_a_damaged_entry_is_rebuilt_and_replaced(cache, caplog):
    def compute():
        return {"x": np.arange(3)}

    def load(folder):
        return node_cache.load_arrays(folder, ["x"])

    node_cache.cached("t", {}, compute, node_cache.save_arrays, load)
    (entry,) = _entries(cache, "t")
    (entry / "x.npy").write_bytes(b"not an array")
    got = node_cache.cached("t", {}, compute, node_cache.save_arrays, load)
    np.testing.assert_array_equal(got["x"], np.arange(3))
    assert "rebuilding" in caplog.text
    np.testing.assert_array_equal(load(entry)["x"], np.arange(3))  # replaced on disk


def test_an_unwritable_cache_runs_without_it(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    monkeypatch.setenv(node_cache.CACHE_ENV, str(blocker / "cache"))
    got = node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, node_cache.save_arrays,
                            lambda f: node_cache.load_arrays(f, ["x"]))  # fmt: skip
    np.testing.assert_array_equal(got["x"], np.ones(2))
    assert "continuing without it" in caplog.text


def test_data_and_shards_from_the_cache_equal_the_computed_ones(cache, monkeypatch):
    cfg = RunConfig(dataset="digits", validation_fraction=0.1, num_tasks=2)
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    data, scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 4)
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()
    monkeypatch.setenv(node_cache.CACHE_ENV, str(cache))
    runtime.data_of(cfg), runtime.scenario_of(cfg, 4)  # the node's first process fills it
    assert len(_entries(cache, "data")) == 1 and len(_entries(cache, "scenario")) == 1
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()
    loaded, loaded_scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 4)  # a new process
    assert isinstance(loaded.train_x, np.memmap)
    for field in dataclasses.fields(data):
        a, b = getattr(data, field.name), getattr(loaded, field.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
        else:
            assert a == b
    assert loaded_scenario.tasks == scenario.tasks
    for mine, theirs in ((scenario.shards, loaded_scenario.shards),
                         (scenario.test_shards, loaded_scenario.test_shards)):  # fmt: skip
        for task_a, task_b in zip(mine, theirs, strict=True):
            for a, b in zip(task_a, task_b, strict=True):
                np.testing.assert_array_equal(a, b)
    # Other settings never read this entry.
    runtime.scenario_of(dataclasses.replace(cfg, dirichlet_beta=5.0), 4)
    runtime.scenario_of(cfg, 5)
    assert len(_entries(cache, "scenario")) == 3


def test_a_missing_array_is_damage_and_unkept_values_are_used_quietly(cache, caplog):
    def load(folder):
        return node_cache.load_arrays(folder, ["x", "y"], optional=("y",))

    node_cache.cached("t", {}, lambda: {"x": np.arange(2), "y": None}, node_cache.save_arrays, load)
    (entry,) = _entries(cache, "t")
    assert load(entry)["y"] is None  # optional and absent
    (entry / "x.npy").unlink()
    got = node_cache.cached("t", {}, lambda: {"x": np.arange(2)}, node_cache.save_arrays, load)
    np.testing.assert_array_equal(got["x"], np.arange(2))
    assert "rebuilding" in caplog.text
    caplog.clear()

    def refuse(value, folder):
        raise node_cache.NotCacheable("not kept")

    assert node_cache.cached("u", {}, lambda: 7, refuse, load) == 7
    assert not _entries(cache, "u") and not list(cache.glob(".u-*")) and not caplog.text


def test_temporary_folders_left_by_a_killed_process_are_removed(cache):
    cache.mkdir(parents=True)
    stale, fresh, other = cache / ".t-killed", cache / ".t-writing", cache / ".u-killed"
    for folder in (stale, fresh, other):
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"partial")
    old = time.time() - 2 * node_cache.STALE_SECONDS
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, node_cache.save_arrays,
                      lambda f: node_cache.load_arrays(f, ["x"]))  # fmt: skip
    assert not stale.exists()  # left by a crash: removed when the next entry of its kind is written
    assert fresh.exists()  # another process may be writing it now
    assert other.exists()  # another kind's: left to its own writes
    assert len(_entries(cache, "t")) == 1


def test_entries_unused_for_30_days_are_removed_and_reading_one_marks_it_used(cache):
    def load(folder):
        return node_cache.load_arrays(folder, ["x"])

    def make(key):
        node_cache.cached("t", key, lambda: {"x": np.ones(2)}, node_cache.save_arrays, load)
        return cache / node_cache.entry_name("t", key)

    unused, read = make({"k": 1}), make({"k": 2})
    old = time.time() - 2 * node_cache.UNUSED_SECONDS
    for entry in (unused, read):
        os.utime(entry, (old, old))
    make({"k": 2})  # a read: marks that entry used
    make({"k": 3})  # a write: removes what was unused for 30 days
    assert not unused.exists() and read.exists()
    assert len(_entries(cache, "t")) == 2
