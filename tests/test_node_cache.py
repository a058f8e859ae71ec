"""The per-node disk cache: same results as without it, safe when damaged, shared, or off."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

from lorm_flwr import runtime
from lorm_flwr.cache import node_cache
from lorm_flwr.config import RunConfig

# The file that marks a folder as the cache's own (the only folders it ever removes).
MARKER = ".lorm-flwr-entry"


def _clear():
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache's own folder, under a root named by LORM_FLWR_CACHE (not shared)."""
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("LORM_FLWR_CACHE_SHARED", raising=False)
    _clear()
    yield node_cache.cache_root()
    _clear()


def _entries(root, kind):
    return sorted(p for p in root.glob(f"{kind}-*") if p.is_dir())


def _load_x(folder):
    return node_cache.load_arrays(folder, ["x"])


def _resign(entry):
    """What a writer who also recomputes the digests leaves (nothing to do without a manifest)."""
    manifest = entry / "manifest.json"
    if manifest.exists():
        doc = json.loads(manifest.read_text())
        doc["files"] = {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(entry.iterdir())
            if p.is_file() and p.name not in ("manifest.json", MARKER)
        }
        manifest.write_text(json.dumps(doc))


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    assert node_cache.cache_root() is None
    # Always a folder of its own below the root the user names.
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path))
    assert node_cache.cache_root() == tmp_path / "lorm-flwr"
    monkeypatch.delenv(node_cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert node_cache.cache_root() == tmp_path / "xdg" / "lorm-flwr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert node_cache.cache_root() == tmp_path / "home" / ".cache" / "lorm-flwr"


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


def test_data_and_shards_from_the_cache_equal_the_computed_ones(cache, monkeypatch, caplog):
    cfg = RunConfig(dataset="digits", validation_fraction=0.1, num_tasks=2)
    root = os.environ[node_cache.CACHE_ENV]
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    data, scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 4)
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()
    monkeypatch.setenv(node_cache.CACHE_ENV, root)
    runtime.data_of(cfg), runtime.scenario_of(cfg, 4)  # the node's first process fills it
    assert len(_entries(cache, "data")) == 1 and len(_entries(cache, "scenario")) == 1
    runtime._data.cache_clear()
    runtime.scenario_of.cache_clear()
    loaded, loaded_scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 4)  # a new process
    assert isinstance(loaded.train_x, np.memmap)
    assert "node cache" not in caplog.text, "a sound entry passes every check"
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
    cache.mkdir(parents=True, mode=0o700)
    stale, fresh, other = cache / ".t-killed", cache / ".t-writing", cache / ".u-killed"
    unmarked = cache / ".t-not-ours"
    for folder in (stale, fresh, other, unmarked):
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"partial")
        if folder != unmarked:
            (folder / MARKER).write_text("")  # each temporary folder has it from the start
    old = time.time() - 2 * node_cache.STALE_SECONDS
    for folder in (stale, other, unmarked):
        os.utime(folder, (old, old))
    node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, node_cache.save_arrays, _load_x)
    assert not stale.exists()  # left by a crash: removed when the next entry of its kind is written
    assert fresh.exists()  # another process may be writing it now
    assert other.exists()  # another kind's: left to its own writes
    assert unmarked.exists()  # not made by the cache: never removed
    assert len(_entries(cache, "t")) == 1


def test_entries_unused_for_30_days_are_removed_and_reading_one_marks_it_used(cache):
    def load(folder):
        return node_cache.load_arrays(folder, ["x"])

    def make(key):
        node_cache.cached("t", key, lambda: {"x": np.ones(2)}, node_cache.save_arrays, load)
        return cache / node_cache.entry_name("t", key)

    unused, read = make({"k": 1}), make({"k": 2})
    unmarked = cache / "t-not-ours"
    unmarked.mkdir()
    old = time.time() - 2 * node_cache.UNUSED_SECONDS
    for entry in (unused, read, unmarked):
        os.utime(entry, (old, old))
    make({"k": 2})  # a read: marks that entry used
    make({"k": 3})  # a write: removes what was unused for 30 days
    assert not unused.exists() and read.exists()
    assert unmarked.exists()  # no marker: not the cache's to remove
    assert len(_entries(cache, "t")) == 3


# --- The cache removes only what it made, inside a folder of its own. ---


def _age(path, seconds):
    old = time.time() - seconds
    os.utime(path, (old, old), follow_symlinks=False)


def test_the_cache_never_removes_folders_it_did_not_make(tmp_path, monkeypatch):
    home = tmp_path / "home"  # LORM_FLWR_CACHE=$HOME: the user's own folders sit there
    photos, notes = home / "data-2023-photos", home / ".data-notes"
    for folder in (photos, notes):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("mine")
        _age(folder, 2 * node_cache.UNUSED_SECONDS)
    monkeypatch.setenv(node_cache.CACHE_ENV, str(home))
    monkeypatch.delenv("LORM_FLWR_CACHE_SHARED", raising=False)
    _clear()
    try:
        runtime.data_of(RunConfig(dataset="digits"))  # writes an entry: tidies its kind
    finally:
        _clear()
    assert (photos / "keep.txt").read_text() == "mine"
    assert (notes / "keep.txt").read_text() == "mine"
    assert len(_entries(home / "lorm-flwr", "data")) == 1, "entries live in a folder of its own"


def test_a_temporary_folder_carries_the_marker_before_anything_is_written(cache):
    seen = []

    def save(value, folder):
        seen.append(sorted(p.name for p in folder.iterdir()))
        node_cache.save_arrays(value, folder)

    node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, save, _load_x)
    assert seen == [[MARKER]]
    (entry,) = _entries(cache, "t")
    assert (entry / MARKER).is_file()


def test_tidying_never_follows_a_link_out_of_the_cache(cache, tmp_path):
    outside = tmp_path / "outside"
    for name in ("tmp", "entry"):
        (outside / name).mkdir(parents=True)
        (outside / name / MARKER).write_text("")  # even a folder that looks like the cache's
        (outside / name / "precious.txt").write_text("not the cache's")
        _age(outside / name, 2 * node_cache.UNUSED_SECONDS)
    cache.mkdir(parents=True, mode=0o700)
    (cache / ".t-link").symlink_to(outside / "tmp")
    (cache / "t-link").symlink_to(outside / "entry")
    for link in (cache / ".t-link", cache / "t-link"):
        _age(link, 2 * node_cache.UNUSED_SECONDS)
    node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, node_cache.save_arrays, _load_x)
    for name in ("tmp", "entry"):
        assert (outside / name / "precious.txt").read_text() == "not the cache's"


def test_a_cache_folder_that_is_a_link_is_refused(tmp_path, monkeypatch, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "lorm-flwr").symlink_to(elsewhere)
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "root"))
    got = node_cache.cached("t", {}, lambda: {"x": np.ones(2)}, node_cache.save_arrays, _load_x)
    np.testing.assert_array_equal(got["x"], np.ones(2))
    assert "symbolic link" in caplog.text and "continuing without it" in caplog.text
    assert not list(elsewhere.iterdir()), "nothing written through the link"


# --- What is read is checked: digests, the key, and values against the key. ---


def _rewrite_array(name, change):
    def tamper(entry):
        path = entry / f"{name}.npy"
        array = np.array(np.load(path))
        np.save(path, change(array))

    return tamper


def _flip_label(y):
    y[0] = 99
    return y


def _rewrite_shards(change):
    def tamper(entry):
        with np.load(entry / "shards.npz") as z:
            arrays = {k: np.array(z[k]) for k in z.files}
        change(arrays)
        np.savez(entry / "shards.npz", **arrays)

    return tamper


def _negative(arrays):
    arrays["train-0-0"][0] = -1


def _swap(a, b):
    def change(arrays):
        arrays[a], arrays[b] = arrays[b], arrays[a]

    return change


def _rewrite_tasks(change):
    def tamper(entry):
        meta = json.loads((entry / "tasks.json").read_text())
        change(meta)
        (entry / "tasks.json").write_text(json.dumps(meta))

    return tamper


def _other_setting(how):
    def tamper(entry):
        (other,) = [e for e in _entries(entry.parent, "scenario") if e != entry]
        shutil.rmtree(entry)
        if how == "link":
            entry.symlink_to(other)
            return
        shutil.copytree(other, entry, symlinks=True)
        manifest = entry / "manifest.json"
        if how == "renamed" and manifest.exists():  # a copy whose manifest names this entry
            doc = json.loads(manifest.read_text())
            doc["entry"] = entry.name
            manifest.write_text(json.dumps(doc))

    return tamper


# (kind, how the entry is changed, whether its digests are recomputed, the reason named)
TAMPERING = {
    "label-99": ("data", _rewrite_array("train_y", _flip_label), False, "digest"),
    "label-99-resigned": ("data", _rewrite_array("train_y", _flip_label), True, "outside"),
    "float-labels": ("data", _rewrite_array("train_y", lambda y: y.astype(np.float64)), True,
                     "int64"),
    "train_x-shape": ("data", _rewrite_array("train_x", lambda x: x.reshape(len(x), -1)), True,
                      "not uint8 images"),
    "test_x-shape": ("data", _rewrite_array("test_x", lambda x: x.reshape(len(x), 4, 16)), True,
                     "samples of shape"),
    "train_x-length": ("data", _rewrite_array("train_x", lambda x: x[:-1]), True, "samples for"),
    "negative-shard": ("scenario", _rewrite_shards(_negative), True, "outside"),
    "shards-swapped-between-tasks": ("scenario", _rewrite_shards(_swap("train-0-0", "train-1-0")),
                                     True, "not the samples"),
    "shards-swapped-between-clients": ("scenario",
                                       _rewrite_shards(_swap("train-0-0", "train-0-1")), False,
                                       "digest"),
    "test-shards-swapped": ("scenario", _rewrite_shards(_swap("test-0-0", "test-1-0")), True,
                            "not the samples"),
    "tasks-swapped": ("scenario", _rewrite_tasks(lambda m: m["tasks"].reverse()), True,
                      "class order"),
    "clients": ("scenario", _rewrite_tasks(lambda m: m.update(clients=2)), True, "clients"),
    "other-setting-copied": ("scenario", _other_setting("copy"), False, "another entry"),
    "other-setting-renamed": ("scenario", _other_setting("renamed"), False, "key"),
    "other-setting-linked": ("scenario", _other_setting("link"), False, "symbolic link"),
}  # fmt: skip


def _assert_same_data(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def _assert_same_scenario(a, b):
    assert a.tasks == b.tasks
    for mine, theirs in ((a.shards, b.shards), (a.test_shards, b.test_shards)):
        assert len(mine) == len(theirs)
        for task_a, task_b in zip(mine, theirs, strict=True):
            assert len(task_a) == len(task_b)
            for x, y in zip(task_a, task_b, strict=True):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)


def _entry_of(cache, kind):
    """The entry of the test's setting (the other scenario entry has dirichlet-beta 5)."""
    (entry,) = [e for e in _entries(cache, kind)
                if json.loads((e / "key.json").read_text()).get("beta") != 5.0]  # fmt: skip
    return entry


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_tampered_entry_is_rebuilt_never_used(case, cache, monkeypatch, caplog):
    kind, tamper, resign, reason = TAMPERING[case]
    cfg = RunConfig(dataset="digits", validation_fraction=0.1, num_tasks=2)
    root = os.environ[node_cache.CACHE_ENV]
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    data, scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 3)
    _clear()
    monkeypatch.setenv(node_cache.CACHE_ENV, root)
    runtime.data_of(cfg), runtime.scenario_of(cfg, 3)
    runtime.scenario_of(dataclasses.replace(cfg, dirichlet_beta=5.0), 3)  # another setting's
    _clear()
    entry = _entry_of(cache, kind)
    tamper(entry)
    if resign:
        _resign(entry)
    caplog.clear()
    loaded, loaded_scenario = runtime.data_of(cfg), runtime.scenario_of(cfg, 3)
    _assert_same_data(data, loaded)
    _assert_same_scenario(scenario, loaded_scenario)
    assert "rebuilding" in caplog.text and reason in caplog.text, caplog.text
    _clear()
    caplog.clear()
    _assert_same_data(data, runtime.data_of(cfg))  # the rebuilt entry is sound
    _assert_same_scenario(scenario, runtime.scenario_of(cfg, 3))
    assert "node cache" not in caplog.text


# --- A validation split the key asks for is required. ---


def test_an_entry_missing_its_validation_split_is_rebuilt(cache, monkeypatch, caplog):
    cfg = RunConfig(dataset="digits", validation_fraction=0.1)
    runtime.data_of(cfg)
    _clear()
    (entry,) = _entries(cache, "data")
    for name in ("validation_x", "validation_y"):
        (entry / f"{name}.npy").unlink()
    _resign(entry)  # as if written without them
    data = runtime.data_of(cfg)
    assert data.validation_x is not None and data.validation_y is not None
    assert len(data.validation_x) == len(data.validation_y) > 0
    assert "rebuilding" in caplog.text and "validation" in caplog.text
    _clear()
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    _assert_same_data(runtime.data_of(cfg), data)


# --- Folders and entries of other users, or writable by them, only when shared. ---


def _tampered_entry(cache):
    """An entry of kind "t" whose x someone replaced, digests recomputed (what a writer can do)."""
    node_cache.cached("t", {}, lambda: {"x": np.arange(3)}, node_cache.save_arrays, _load_x)
    (entry,) = _entries(cache, "t")
    np.save(entry / "x.npy", np.full(3, 666))
    _resign(entry)
    return entry


def _read_t():
    return node_cache.cached("t", {}, lambda: {"x": np.arange(3)}, node_cache.save_arrays,
                             _load_x)["x"]  # fmt: skip


@pytest.mark.parametrize("where", ["entry", "file", "cache folder"])
def test_what_group_or_others_can_write_is_not_used_unless_shared(where, cache, monkeypatch,
                                                                  caplog):  # fmt: skip
    entry = _tampered_entry(cache)
    writable = {"entry": entry, "file": entry / "x.npy", "cache folder": cache}[where]
    writable.chmod(writable.stat().st_mode | 0o022)
    np.testing.assert_array_equal(_read_t(), np.arange(3))  # computed, not the writer's
    assert "writable by group or others" in caplog.text
    if where == "cache folder":  # not used at all: the entry stays as it is
        assert "continuing without it" in caplog.text
        np.testing.assert_array_equal(np.load(entry / "x.npy"), np.full(3, 666))
        cache.chmod(0o700)
    else:  # this user's entry: rebuilt
        assert "rebuilding" in caplog.text
        np.testing.assert_array_equal(np.load(entry / "x.npy"), np.arange(3))
    entry = _tampered_entry(cache)
    writable = {"entry": entry, "file": entry / "x.npy", "cache folder": cache}[where]
    writable.chmod(writable.stat().st_mode | 0o022)
    monkeypatch.setenv("LORM_FLWR_CACHE_SHARED", "1")  # the operator shares it on purpose:
    np.testing.assert_array_equal(_read_t(), np.full(3, 666))  # whoever writes there is trusted


@pytest.mark.skipif(os.geteuid() != 0, reason="making an entry another user's needs root (chown)")
def test_an_entry_of_another_user_is_not_used_unless_shared(cache, monkeypatch, caplog):
    entry = _tampered_entry(cache)
    for path in (entry, *entry.iterdir()):
        os.chown(path, 65534, 65534, follow_symlinks=False)
    np.testing.assert_array_equal(_read_t(), np.arange(3))
    assert "owned by uid 65534" in caplog.text and "computing without it" in caplog.text
    assert entry.stat().st_uid == 65534, "another user's entry is left alone"
    monkeypatch.setenv("LORM_FLWR_CACHE_SHARED", "1")
    np.testing.assert_array_equal(_read_t(), np.full(3, 666))
