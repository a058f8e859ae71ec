"""A per-node cache on disk of what every ClientApp process would otherwise rebuild.

On Flower's deployment engine each message starts a fresh ClientApp process, so the
in-process caches of :mod:`lorm_flwr.runtime` start empty every time: the data set is
parsed again and the shards are drawn again (importing ``datasets`` and ``flwr_datasets``
for the partitioner). This module keeps those results in a folder on the node, keyed by everything they depend on, so a new process
memory-maps arrays instead (``benchmarks/client_startup.py`` measures the parts).

Where: ``$LORM_FLWR_CACHE`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/lorm-flwr`` or ``~/.cache/lorm-flwr``. The SuperNode's environment
reaches the ClientApp processes it starts, so set it there.

Safety: an entry's key hashes the inputs, the versions of the packages that compute it
and the source of this whole package, so changed code or settings never read an old entry
(the data's origin is not keyed: a data set name always means the same data). Entries are
written to a temporary folder and renamed into place (atomic on POSIX), so processes of
several nodes sharing one folder never see half an entry. An entry that cannot be read is
recomputed and replaced, with a warning. The cache is only ever a shortcut: removing the
folder at any time is safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "CACHE_ENV", "NotCacheable", "cache_root", "cached", "load_arrays", "package_digest",
    "save_arrays", "versions",
]  # fmt: skip

CACHE_ENV = "LORM_FLWR_CACHE"
_OFF = {"off", "0", "false", "no", "none"}
# Bump when the layout of an entry changes.
FORMAT = 1

logger = logging.getLogger(__name__)
T = TypeVar("T")
# What reading a truncated or foreign entry raises (np.load, json, zip, a missing file).
_DAMAGED = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


def cache_root() -> Path | None:
    """The cache folder, or None when ``LORM_FLWR_CACHE=off``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value and value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorm-flwr"


class NotCacheable(Exception):
    """Raised by a ``save`` for a value that is not kept on disk (it is used, just not kept)."""


@functools.cache
def package_digest() -> str:
    """A digest of this package's source (every module): other code never reads an entry."""
    root = Path(__file__).resolve().parent
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


def cached(
    kind: str,
    key: Mapping[str, Any],
    compute: Callable[[], T],
    save: Callable[[T, Path], None],
    load: Callable[[Path], T],
) -> T:
    """``load`` the entry ``kind``/``key`` if it is on disk, else ``compute``, ``save``, return.

    ``key`` must be JSON-serialisable and name every input of ``compute``.
    """
    root = cache_root()
    if root is None:
        return compute()
    final = root / entry_name(kind, key)
    if final.is_dir():
        with contextlib.suppress(OSError):  # marks the entry used (a read-only cache: not)
            os.utime(final)
        try:
            return load(final)
        except _DAMAGED as exc:  # a damaged entry: rebuild it, never fail the run on it
            logger.warning("node cache: cannot read %s (%s); rebuilding it", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    value = compute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _tidy(root, kind)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            save(value, tmp)
            (tmp / "key.json").write_text(json.dumps(dict(key), sort_keys=True, indent=1))
            os.rename(tmp, final)  # atomic; fails if another process was first
        except NotCacheable:
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.is_dir():
                raise
    except OSError as exc:  # read-only or full disk: run without the cache
        logger.warning("node cache: cannot write under %s (%s); continuing without it", root, exc)
    return value


STALE_SECONDS = 3600.0  # a temporary folder untouched this long was left by a crash
UNUSED_SECONDS = 30 * 86400.0  # an entry neither written nor read for 30 days is removed


def _tidy(root: Path, kind: str) -> None:
    """Before writing an entry of ``kind``: remove that kind's temporary folders that a
    killed process left behind (one being written now was touched seconds ago) and its
    entries unused for ``UNUSED_SECONDS`` (each code or settings change makes new
    entries; the old ones would otherwise stay forever). A process still reading a
    removed entry keeps its memory maps; one that had not opened it yet rebuilds it."""
    now = time.time()
    for folder, age in ((f".{kind}-*", STALE_SECONDS), (f"{kind}-*", UNUSED_SECONDS)):
        for path in root.glob(folder):
            with contextlib.suppress(OSError):
                if path.is_dir() and now - path.stat().st_mtime > age:
                    shutil.rmtree(path, ignore_errors=True)


def save_arrays(arrays: Mapping[str, np.ndarray | None], folder: Path) -> None:
    """One ``.npy`` file per array (None: absent)."""
    for name, array in arrays.items():
        if array is not None:
            np.save(folder / f"{name}.npy", np.asarray(array), allow_pickle=False)


def load_arrays(
    folder: Path, names: list[str], optional: tuple[str, ...] = ()
) -> dict[str, np.ndarray | None]:
    """The arrays :func:`save_arrays` wrote, memory-mapped read-only; an ``optional`` one
    may be absent (None), any other missing one makes the entry damaged."""
    out: dict[str, np.ndarray | None] = {}
    for name in names:
        path = folder / f"{name}.npy"
        if name in optional and not path.exists():
            out[name] = None
        else:  # raises FileNotFoundError for a missing required array
            out[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    return out
