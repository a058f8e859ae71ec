"""Reading one entry of the node cache (:mod:`lorm_flwr.cache.node_cache`), trusting nothing.

An entry is a folder holding the cache's marker file, ``key.json``, a ``manifest.json`` (the
entry's name and the SHA-256 of every other file) and the files its ``save`` wrote. Each file
is opened without following links, must be a plain file that nobody but this user may write
(unless ``LORM_FLWR_CACHE_SHARED=1``), and is hashed from the open file before use; an array is
then memory-mapped from that same open file, so what was hashed is what is mapped. Any
failure raises :class:`Damaged`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["FORMAT", "KEY_FILE", "MANIFEST", "MARKER", "SHARED_ENV", "Damaged", "Entry",
           "distrust", "is_marked", "open_file", "shared"]  # fmt: skip

SHARED_ENV = "LORM_FLWR_CACHE_SHARED"

MARKER = ".lorm-flwr-entry"  # in every folder the cache made: the only ones it removes
MANIFEST = "manifest.json"
KEY_FILE = "key.json"

_ON = {"1", "true", "yes", "on"}

# Bump when the layout of an entry changes.
FORMAT = 2


class Damaged(ValueError):
    """An entry that fails a check: it is rebuilt, never used."""


def shared() -> bool:
    """``LORM_FLWR_CACHE_SHARED=1``: use folders and entries of other users, or writable by them."""
    return os.environ.get(SHARED_ENV, "").strip().lower() in _ON


def distrust(st: os.stat_result, is_shared: bool) -> str | None:
    """Why a folder or file with this status is not to be trusted (None: it is)."""
    if is_shared:
        return None
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not this user ({os.geteuid()}); see {SHARED_ENV}"
    if st.st_mode & 0o022:
        return f"writable by group or others; see {SHARED_ENV}"
    return None


def is_marked(folder: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(folder / MARKER).st_mode)
    except OSError:
        return False


def open_file(path: Path, is_shared: bool) -> IO[bytes]:
    """``path`` opened for reading: a plain file (a link is not followed) nobody else writes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Damaged(f"{path.name} is not a plain file")
        problem = distrust(st, is_shared)
        if problem:
            raise Damaged(f"{path.name} is {problem}")
    except BaseException:
        f.close()
        raise
    return f


_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class Entry:
    """An entry opened for reading: each file is read once and checked against its digest."""

    def __init__(self, path: Path, manifest: dict[str, Any], is_shared: bool):
        self.path, self.manifest, self.shared = path, manifest, is_shared
        self.files: dict[str, str] = manifest["files"]

    @classmethod
    def open(cls, path: Path, is_shared: bool | None = None) -> Entry:
        """The entry at ``path``, its marker and manifest checked (not yet its key)."""
        is_shared = shared() if is_shared is None else is_shared
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise Damaged("not a folder")
        problem = distrust(st, is_shared)
        if problem:
            raise Damaged(f"the entry is {problem}")
        if not is_marked(path):
            raise Damaged(f"no {MARKER}: not made by this cache")
        with open_file(path / MANIFEST, is_shared) as f:
            manifest = json.loads(f.read())
        if not isinstance(manifest, dict):
            raise Damaged(f"malformed {MANIFEST}")
        files = manifest.get("files")
        if (
            manifest.get("format") != FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(d, str) and _plain_name(n) for n, d in files.items())
        ):
            raise Damaged(f"malformed {MANIFEST}")
        return cls(path, manifest, is_shared)

    def check_key(self, name: str, key: Mapping[str, Any]) -> None:
        """The entry is the one named ``name`` and was written for ``key``."""
        if self.manifest.get("entry") != name:
            raise Damaged(f"{MANIFEST} names another entry ({self.manifest.get('entry')})")
        if self.json(KEY_FILE) != json.loads(json.dumps(dict(key))):
            raise Damaged(f"{KEY_FILE} is another setting's key")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read_bytes(self, name: str) -> bytes:
        with self._open(name) as f:
            blob = f.read()
        self._verify(name, hashlib.sha256(blob).hexdigest())
        return blob

    def json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def array(self, name: str) -> np.ndarray:
        """A ``.npy`` file memory-mapped read-only, from the open file that was hashed."""
        with self._open(name) as f:
            self._verify(name, hashlib.file_digest(f, "sha256").hexdigest())
            f.seek(0)
            header = _HEADERS.get(np.lib.format.read_magic(f))
            if header is None:
                raise Damaged(f"{name}: unknown .npy version")
            shape, fortran, dtype = header(f)
            if dtype.hasobject:
                raise Damaged(f"{name}: an object array")
            if 0 in shape:
                empty = np.empty(shape, dtype)
                empty.flags.writeable = False
                return empty
            order = "F" if fortran else "C"
            return np.memmap(f, dtype=dtype, mode="r", shape=shape, order=order, offset=f.tell())

    def _open(self, name: str) -> IO[bytes]:
        if name not in self.files:
            raise Damaged(f"{name} is missing")
        return open_file(self.path / name, self.shared)

    def _verify(self, name: str, digest: str) -> None:
        if digest != self.files[name]:
            raise Damaged(f"{name} does not match its digest")


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..", MARKER, MANIFEST) and "/" not in name and "\0" not in name
