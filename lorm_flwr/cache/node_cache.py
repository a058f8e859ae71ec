"""A per-node cache on disk of what every ClientApp process would otherwise rebuild.

On Flower's deployment engine each message starts a fresh ClientApp process, so the
in-process caches of :mod:`lorm_flwr.runtime` start empty every time: the data set is
parsed again and the shards are drawn again (importing ``datasets`` and ``flwr_datasets``
for the partitioner). This module keeps those results in a folder on the node, keyed by
everything they depend on, so a new process memory-maps arrays instead
(``benchmarks/client_startup.py`` measures the parts).

Where: the folder ``lorm-flwr`` inside ``$LORM_FLWR_CACHE`` if set (``off`` disables the
cache), else inside ``$XDG_CACHE_HOME`` or ``~/.cache`` (so ``~/.cache/lorm-flwr``). The
SuperNode's environment reaches the ClientApp processes it starts, so set it there. The
cache works only inside that folder of its own, and only removes what it made there: folders
that carry its marker file (``.lorm-flwr-entry``, written into each temporary folder as soon
as it exists), never following a symbolic link. A ``lorm-flwr`` folder that is a symbolic link
is refused (point ``LORM_FLWR_CACHE`` at the real place instead).

Keys: an entry's name hashes the inputs, the versions of the packages that compute it and the
source of this whole package, so changed code or settings never read an old entry (the
data's origin is not keyed: a data set name always means the same data). Entries are written
to a temporary folder and renamed into place (atomic on POSIX), so processes of several nodes
sharing one folder never see half an entry.

Checks on reading (:mod:`lorm_flwr.cache.entry`): the entry's ``manifest.json`` records the
entry's name and the SHA-256 of every file written (``key.json`` included); the stored key must
equal the one looked up, and each file is hashed when it is opened and memory-mapped from the
same open file. That costs one read of its bytes (0.6 s per GB on a CPU with SHA extensions,
several times that without; mostly from the page cache the mapping then uses). The caller's
``load`` then checks the values against the key (:mod:`lorm_flwr.cache.checks`). An entry that
fails any check is rebuilt, with a warning naming the reason, and never used.

Ownership: the folder, an entry and each of its files must belong to this user and be
writable by nobody else, else they are not used (a warning; the value is computed, and the
entry rebuilt when it is this user's). ``LORM_FLWR_CACHE_SHARED=1`` lifts that for a folder
shared on purpose: it trusts everyone who can write there (the digests catch damage, not a
writer who recomputes them). The cache is only ever a shortcut: removing the folder at any
time is safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from lorm_flwr.cache.entry import (
    FORMAT,
    KEY_FILE,
    MANIFEST,
    MARKER,
    SHARED_ENV,
    Damaged,
    Entry,
    distrust,
    is_marked,
    shared,
)

__all__ = [
    "CACHE_ENV", "SHARED_ENV", "Damaged", "Entry", "NotCacheable", "cache_root", "cached",
    "load_arrays", "package_digest", "save_arrays", "shared", "versions",
]  # fmt: skip

CACHE_ENV = "LORM_FLWR_CACHE"
FOLDER = "lorm-flwr"  # the cache's own folder, inside the root the user names
_OFF = {"off", "0", "false", "no", "none"}

logger = logging.getLogger(__name__)
T = TypeVar("T")


# What reading a truncated or foreign entry raises (np.load, json, zip, a missing file).
_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def cache_root() -> Path | None:
    """The cache's own folder, or None when ``LORM_FLWR_CACHE=off``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value and value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser() / FOLDER
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / FOLDER


class NotCacheable(Exception):
    """Raised by a ``save`` for a value that is not kept on disk (it is used, just not kept)."""


@functools.cache
def package_digest() -> str:
    """A digest of this package's source (every module): other code never reads an entry."""
    root = Path(__file__).resolve().parents[1]  # the whole lorm_flwr package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """The installed version of each package ("" when absent), for keys."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = ""
    return out


def entry_name(kind: str, key: Mapping[str, Any]) -> str:
    blob = json.dumps(
        {
            "format": FORMAT,
            "version": versions("lorm-flwr")["lorm-flwr"],
            "code": package_digest(),
            **key,
        },
        sort_keys=True,
    )
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _folder_problem(folder: Path, is_shared: bool) -> str | None:
    """Why the cache's folder is not used (None: usable, or absent and to be made)."""
    try:
        st = os.lstat(folder)
    except OSError:  # absent (made on writing), or cannot be reached (writing says so)
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"a symbolic link, not followed: set {CACHE_ENV} to the real place"
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder"
    return distrust(st, is_shared)


def cached(
    kind: str,
    key: Mapping[str, Any],
    compute: Callable[[], T],
    save: Callable[[T, Path], None],
    load: Callable[[Entry], T],
) -> T:
    """``load`` the entry ``kind``/``key`` if it is on disk, else ``compute``, ``save``, return.

    ``key`` must be JSON-serialisable and name every input of ``compute``. ``load`` reads
    through the :class:`Entry` (digests checked) and raises :class:`Damaged` for values that
    do not fit the key; ``save`` writes plain files into the folder it is given.
    """
    root = cache_root()
    if root is None:
        return compute()
    is_shared = shared()
    problem = _folder_problem(root, is_shared)
    if problem:
        logger.warning("node cache: not using %s (%s); continuing without it", root, problem)
        return compute()
    name = entry_name(kind, key)
    value, write = _lookup(root / name, key, load, is_shared)
    if value is not _MISS:
        return value
    value = compute()
    if write:
        _write(root, kind, name, key, value, save, is_shared)
    return value


_MISS: Any = object()


def _lookup(
    final: Path, key: Mapping[str, Any], load: Callable[[Entry], T], is_shared: bool
) -> tuple[Any, bool]:
    """(the loaded value or ``_MISS``, whether to write the entry anew)."""
    try:
        st = os.lstat(final)
    except OSError:
        return _MISS, True
    if stat.S_ISLNK(st.st_mode):
        logger.warning("node cache: %s is a symbolic link, not followed; rebuilding it", final)
        with contextlib.suppress(OSError):
            os.unlink(final)  # the link itself, never what it points to
        return _MISS, True
    if not stat.S_ISDIR(st.st_mode):
        return _MISS, True  # writing fails on it and says so
    problem = distrust(st, is_shared)
    if problem is None:
        with contextlib.suppress(OSError):  # marks the entry used (a read-only cache: not)
            os.utime(final)
        try:
            entry = Entry.open(final, is_shared)
            entry.check_key(final.name, key)
            return load(entry), False
        except _DAMAGED as exc:  # never fail the run on a damaged entry
            problem = f"cannot use it: {exc}"
    if _remove(final, is_shared):
        logger.warning("node cache: %s (%s); rebuilding it", final, problem)
        return _MISS, True
    logger.warning("node cache: not using %s (%s); computing without it", final, problem)
    return _MISS, False


def _write(
    root: Path, kind: str, name: str, key: Mapping[str, Any], value: T,
    save: Callable[[T, Path], None], is_shared: bool,
) -> None:  # fmt: skip
    final = root / name
    try:
        _make_folder(root, is_shared)
        _tidy(root, kind, is_shared)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            (tmp / MARKER).write_text("made by lorm-flwr's node cache; removed when unused\n")
            save(value, tmp)
            _seal(tmp, name, key, is_shared)
            os.rename(tmp, final)  # atomic; fails if another process was first
        except NotCacheable:
            pass
        except OSError:
            if not final.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else half written
    except OSError as exc:  # read-only or full disk: run without the cache
        logger.warning("node cache: cannot write under %s (%s); continuing without it", root, exc)


def _make_folder(root: Path, is_shared: bool) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o755 if is_shared else 0o700)
    problem = _folder_problem(root, is_shared)
    if problem:
        raise PermissionError(problem)


def _seal(tmp: Path, name: str, key: Mapping[str, Any], is_shared: bool) -> None:
    """Write the key and the manifest (each file's SHA-256); nobody else may write them."""
    (tmp / KEY_FILE).write_text(json.dumps(dict(key), sort_keys=True, indent=1))
    mode = 0o644 if is_shared else 0o600
    files = {}
    for item in sorted(os.scandir(tmp), key=lambda item: item.name):
        if item.name == MARKER:
            continue
        if not item.is_file(follow_symlinks=False):
            raise NotCacheable(f"{item.name} is not a plain file")
        os.chmod(item.path, mode)
        with open(item.path, "rb") as f:
            files[item.name] = hashlib.file_digest(f, "sha256").hexdigest()
    manifest = {"format": FORMAT, "entry": name, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, sort_keys=True, indent=1))
    for path in (tmp / MANIFEST, tmp / MARKER):
        os.chmod(path, mode)
    os.chmod(tmp, 0o755 if is_shared else 0o700)


def _remove(path: Path, is_shared: bool) -> bool:
    """Remove a folder this cache made (a real folder, never a link, carrying the marker)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not is_marked(path):
        return False
    if not is_shared and st.st_uid != os.geteuid():
        return False
    shutil.rmtree(path, ignore_errors=True)  # refuses a link swapped in meanwhile
    return not os.path.lexists(path)


STALE_SECONDS = 3600.0  # a temporary folder untouched this long was left by a crash
UNUSED_SECONDS = 30 * 86400.0  # an entry neither written nor read for 30 days is removed


def _tidy(root: Path, kind: str, is_shared: bool) -> None:
    """Before writing an entry of ``kind``: remove that kind's temporary folders that a
    killed process left behind (one being written now was touched seconds ago) and its
    entries unused for ``UNUSED_SECONDS`` (each code or settings change makes new
    entries; the old ones would otherwise stay forever); only folders carrying the marker,
    never through a link. A process still reading a removed entry keeps its memory maps;
    one that had not opened it yet rebuilds it."""
    now = time.time()
    with os.scandir(root) as items:
        for item in list(items):
            if item.name.startswith(f".{kind}-"):
                age = STALE_SECONDS
            elif item.name.startswith(f"{kind}-"):
                age = UNUSED_SECONDS
            else:
                continue
            with contextlib.suppress(OSError):
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and now - st.st_mtime > age:
                    _remove(Path(item.path), is_shared)


def save_arrays(arrays: Mapping[str, np.ndarray | None], folder: Path) -> None:
    """One ``.npy`` file per array (None: absent)."""
    for name, array in arrays.items():
        if array is not None:
            np.save(folder / f"{name}.npy", np.asarray(array), allow_pickle=False)


def load_arrays(
    entry: Entry | Path, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray | None]:
    """The arrays :func:`save_arrays` wrote, memory-mapped read-only; an ``optional`` one
    may be absent (None), any other missing one makes the entry damaged."""
    if not isinstance(entry, Entry):
        entry = Entry.open(Path(entry))
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        file = f"{name}.npy"
        out[name] = None if name in optional and file not in entry else entry.array(file)
    return out
