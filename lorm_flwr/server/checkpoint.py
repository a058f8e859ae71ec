"""Server checkpoints: all a stopped run needs to continue, saved after every round.

A checkpoint holds the global tensors after the last finished round, the task and
the next round to run, the strategy's own state (LoRM's cross-task sums), the
results so far and the RNG states. It is written atomically (a temporary file,
fsync, then rename), so a kill at any moment leaves the previous checkpoint or
the new one, never a torn file. It loads with ``torch.load(weights_only=True)``:
opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorm_flwr.config import ConfigError, RunConfig

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "capture_rng",
    "checkpoint_path",
    "config_changes",
    "load_checkpoint",
    "restore_rng",
    "resume_point",
    "save_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 4
# Version 3 wraps the state with its SHA-256; version 4 stores that wrapped state as a
# uint8 tensor instead of pickled bytes (pickle protocol 2, the one ``weights_only``
# loading reads, writes bytes as a latin-1 string: 1.5x the size, and slow). Versions 1
# and 2 (no checksum) differ only in what a reader ignores (the strategy's round log,
# the recorder's message sizes) or defaults (handshakes, provenance), so they still load.
READABLE_VERSIONS = (1, 2, 3, 4)
_WRAPPED = (3, 4)  # the versions whose file holds {version, sha256, state}

# Run-config keys a resumed run may change: they decide where and how patiently a
# run goes, not what it computes. Any other difference is refused.
RESUMABLE_CHANGES = frozenset(
    {
        "resume-from",
        "output-dir",
        "device",
        "client-threads",
        "round-retries",
        "round-timeout",
        "min-clients",
        "num-clients",  # checks the federation; the shards themselves are compared on resume
        "max-message-mb",
        "dry-run",
        "resume-unverified",
        "tracking",  # where figures are logged: a resume may start tracking (all is replayed)
    }
)


@dataclass
class Checkpoint:
    """The server's state between two rounds.

    ``task``/``round_in_task`` name the next round to run; ``round_in_task ==
    rounds-per-task`` means the task's rounds are done and only its end (LoRM's
    statistics exchange, evaluation, export) is left.
    """

    config: dict[str, Any]
    task: int
    round_in_task: int
    tensors: dict[str, torch.Tensor]
    strategy: dict[str, Any]
    recorder: dict[str, Any]
    rng: dict[str, Any]
    elapsed_seconds: float
    version: int = FORMAT_VERSION
    # Set by load_checkpoint (a plain attribute, not saved): the file held a checksum that matched.
    checksummed = False


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or a run folder holding one."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {p}; give a run folder that holds {CHECKPOINT_FILE}, or the file"
        )
    return p.resolve()


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write ``folder/checkpoint.pt`` atomically, with the SHA-256 of its contents."""
    buffer = io.BytesIO()
    # a shallow dict of the fields: dataclasses.asdict would deep-copy every tensor
    torch.save({f.name: getattr(checkpoint, f.name) for f in fields(checkpoint)}, buffer)
    payload = buffer.getbuffer()
    path = folder / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(
            {
                "version": FORMAT_VERSION,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "state": torch.frombuffer(payload, dtype=torch.uint8),
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; ``ValueError`` says what is wrong with a damaged one."""
    file = checkpoint_path(path)
    checksummed = False
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError("it holds no checkpoint")
        if state.get("version") in _WRAPPED:
            payload = state["state"]  # version 3: bytes; 4: a uint8 tensor
            if isinstance(payload, torch.Tensor):
                if payload.dtype != torch.uint8 or payload.dim() != 1:
                    raise TypeError("its stored state is not a byte string")
                payload = payload.numpy().tobytes()
            if hashlib.sha256(payload).hexdigest() != state["sha256"]:
                raise ValueError("its checksum does not match its contents (the file is corrupt)")
            state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise TypeError("its checked contents hold no checkpoint")
            checksummed = True
        if state.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"it has checkpoint format {state.get('version')!r}; this version reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        checkpoint = Checkpoint(**state)
        checkpoint.checksummed = checksummed  # not a field: never saved, set by each load
        return checkpoint
    # A damaged file can fail anywhere in torch's and zipfile's readers (IndexError,
    # LookupError, struct.error, ... seen with single flipped bits): each is named here.
    except Exception as exc:  # noqa: BLE001
        reason = (
            str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"
        )
        raise ValueError(f"{file} is damaged or not a lorm-flwr checkpoint: {reason}") from None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Run-config keys whose value differs and may not differ on resume, as ``key: old -> new``."""
    saved = {**RunConfig().to_dict(), **saved}  # a key added since the checkpoint: its default
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(keys)
        if saved.get(k) != current.get(k)
    ]


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, in types ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": list(internal) + [version, gauss_next],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])


def resume_point(cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint ``resume-from`` names, checked against this run before any work.

    A format without a checksum is refused unless ``resume-unverified=true``; then every
    field is checked against this run's schedule, model and strategy
    (:func:`lorm_flwr.server.checkpoint_checks.check_fields`), since a checksum in the same file
    tells accidental damage only. Each refusal is a ``ConfigError`` naming the file.
    """
    from lorm_flwr.server.checkpoint_checks import CheckpointError, Invalid, check_fields

    if not cfg.resume_from:
        return None
    where = f"resume-from={cfg.resume_from!r}"
    try:
        checkpoint = load_checkpoint(cfg.resume_from)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    file = checkpoint_path(cfg.resume_from)
    if not checkpoint.checksummed and not cfg.resume_unverified:
        raise CheckpointError(
            f"{where}: {file} has checkpoint format {checkpoint.version}, which carries no "
            "checksum, so damage to it cannot be detected; resume from it anyway with "
            "resume-unverified=true (its fields are still checked)"
        )
    config = checkpoint.config
    if not (isinstance(config, dict) and all(isinstance(k, str) for k in config)):
        raise CheckpointError(f"{where}: {file}: config is not a mapping of run-config keys")
    try:
        changes = config_changes(checkpoint.config, cfg.to_dict())
    except Exception as exc:  # noqa: BLE001 - e.g. a tensor where a key's value belongs
        raise CheckpointError(f"{where}: {file}: config holds malformed values ({exc})") from None
    if changes:
        raise ConfigError(
            f"{where}: the run config differs from the checkpoint's in "
            f"keys a resumed run must keep: {'; '.join(changes)}"
        )
    try:
        check_fields(checkpoint, cfg)
    except Invalid as exc:
        raise CheckpointError(f"{where}: {file} does not fit this run: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a malformed field no check foresaw: named too
        raise CheckpointError(
            f"{where}: {file} does not fit this run: a field is malformed "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return checkpoint
