"""A long-lived worker per SuperNode, so deployed messages do not pay the start-up each.

Flower 1.42's deployment engine starts a fresh ``flwr-clientapp`` process for every
message; ours would import torch, timm and peft (which imports transformers) and build the
model every time, several seconds per message (``benchmarks/client_startup.py``). With
``LORM_FLWR_NODE_WORKER=1`` in the SuperNode's environment, that process instead hands
the message to this node's worker, a process that imported everything once and keeps
its models, data and shards in memory as a simulation's Ray actor does, and relays the
reply. The ClientApp process itself then imports Flower and nothing heavy.

- One worker per SuperNode (keyed by node id, the Python and the app's code), started
  by the first message that needs it, in the SuperNode's process group (stopping the
  SuperNode's group stops it; the ClientApp's parent is Flower's ``flower-superexec``,
  which lives as long as the SuperNode). It exits when idle for
  ``LORM_FLWR_NODE_WORKER_IDLE`` seconds (default 600) or when that parent is gone.
  Other code (a new FAB) gets a new worker; the old one idles out.
- It talks over a Unix socket in a folder only this user can open, in Flower's own
  protobuf encoding of the message and the context; the reply content and the node's
  updated state come back. Nothing is pickled. Frames: :mod:`lorm_flwr.client.worker_framing`
  (why not :mod:`multiprocessing.connection`: ``benchmarks/results/node_worker_framing.md``).
- The handlers are the same functions (:mod:`lorm_flwr.client.handlers`), so results
  equal an in-process run (tests/test_node_worker.py, tests/test_deployment.py).
- Failures: an exception in a handler comes back as the message's error (named
  ``NodeWorkerError: <the handler's exception>``); a worker that closes the connection
  before answering (it was exiting, or died) is replaced once, and if that fails too,
  or no worker can start, the message runs in this process, with a warning (after a
  failed start, for ``RETRY_START_AFTER`` seconds, before a new start is tried). In a Ray
  actor (simulation) it is never used: the actor is long-lived.
- Timeouts, so that a stopped or hung worker never holds the node's ClientApps: the
  worker's accept queue must take the connection within ``CONNECT_TIMEOUT`` s (it
  refuses one when full; the kernel fills it while the worker is stopped); then the
  worker sends one byte (``.``) every ``HEARTBEAT`` s from a thread of its own for as
  long as it holds the request, queued behind another message or being handled, and
  ``!`` when the answer follows. A ClientApp that gets nothing for ``LORM_FLWR_NODE_WORKER_TIMEOUT`` s
  (default 60, at least ``4 * HEARTBEAT``; the request's sending and the answer's frames
  have the same bound) handles the message in process and logs a warning naming the
  worker's PID, socket and the timeout. So a training may last hours: only silence
  counts, and silence means the worker's process is not running (stopped, or its
  interpreter is stuck). A worker seen stopped (``T`` in ``/proc/<pid>/stat``) is not
  waited for at all. A handler stuck inside its own work keeps the heartbeat going, as
  it would keep its ClientApp in process; the server's ``round-timeout`` covers that.
  A request the worker resumes after its ClientApp left is dropped unhandled.
- The worker's process is :mod:`lorm_flwr.client.worker_server`: it reads each request (its
  three frames) by one deadline (``REQUEST_SECONDS``) in a thread per connection, so a
  slow or silent peer holds neither the worker nor other requests, and handles the
  messages one at a time, in its main thread.
- Unlike in-process handling: the handlers' log lines and tracebacks go to the worker's
  ``.log`` beside its socket, not to the SuperNode's output; a failed message leaves the
  node's state as it was before it (in process, Flower keeps what the handler changed
  before failing); the working directory is the app's folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from lorm_flwr.cache.node_cache import package_digest
from lorm_flwr.client.worker_framing import HEARTBEAT, recv_frame, send_frames

__all__ = ["ENV", "TIMEOUT_ENV", "NodeWorkerError", "enabled", "handle"]

ENV = "LORM_FLWR_NODE_WORKER"
IDLE_ENV = "LORM_FLWR_NODE_WORKER_IDLE"
TIMEOUT_ENV = "LORM_FLWR_NODE_WORKER_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds a ClientApp waits for a sign of life from its worker
CONNECT_TIMEOUT = 10.0  # seconds for the worker to accept a connection
START_TIMEOUT = 300.0  # seconds for a new worker to import everything and listen
RETRY_START_AFTER = 300.0  # after a failed start, messages run in process this long
_ON = {"1", "true", "on", "yes"}
_CODE = Path(__file__).resolve().parents[2]  # the folder that holds lorm_flwr (a FAB's, too)

logger = logging.getLogger(__name__)


class NodeWorkerError(RuntimeError):
    """The node worker failed this message (its reason is in the text)."""


def enabled() -> bool:
    """Forward to a node worker: asked for, not already in a long-lived Ray actor, and not
    in an environment Flower installed for this one process (runtime dependency
    installation puts it on ``sys.path`` only, and removes it when the process ends)."""
    if os.environ.get(ENV, "").strip().lower() not in _ON or "ray" in sys.modules:
        return False
    venv = os.environ.get("VIRTUAL_ENV")
    return not venv or Path(venv).resolve() == Path(sys.prefix).resolve()


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Run handler ``kind`` on ``msg``: in the node worker when :func:`enabled`, else here."""
    if enabled():
        try:
            return _via_worker(kind, msg, context)
        except (_Unavailable, OSError) as exc:  # the message was not handled: handle it here
            logger.warning("lorm-flwr: no node worker (%s); running this message in process", exc)
    from lorm_flwr.client.handlers import HANDLERS

    return HANDLERS[kind](msg, context)


class _Unavailable(Exception):
    """No worker could take the message (the message itself was not handled)."""


# ------------------------------------------------------------------ client side
def _reply_timeout() -> float:
    """Seconds without a sign of life after which a ClientApp stops waiting for its worker."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        logger.warning("lorm-flwr: %s=%r is not a number of seconds; using %g", TIMEOUT_ENV,
                       raw, DEFAULT_TIMEOUT)  # fmt: skip
        value = DEFAULT_TIMEOUT
    return max(value, 4 * HEARTBEAT)  # several heartbeats fit in it, even on a busy host


def _socket_dir() -> Path:
    """A folder only this user can open (sockets need short paths: the system temp)."""
    folder = Path(tempfile.gettempdir()) / f"lorm-flwr-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = os.lstat(folder)  # not stat(): a planted symlink must not lead elsewhere
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise _Unavailable(f"{folder} is not a folder private to this user")
    return folder


def _worker_path(context: Context) -> Path:
    key = json.dumps([sys.executable, str(_CODE), package_digest(), context.node_id])
    return _socket_dir() / f"w-{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def _try_connect(path: Path) -> socket.socket | None:
    """A connection to the worker at ``path``, or None when no worker listens there; a
    listener that accepts nothing within ``CONNECT_TIMEOUT`` s (its queue stays full) is
    ``_Unavailable``."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(CONNECT_TIMEOUT)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            return None
        except (BlockingIOError, TimeoutError) as exc:  # its accept queue is full
            conn.close()
            if time.monotonic() >= deadline:
                raise _Unavailable(
                    f"the node worker ({_who(path)}) accepted no connection within "
                    f"{CONNECT_TIMEOUT:g} s"
                ) from exc
            time.sleep(0.05)
        except OSError as exc:
            conn.close()
            raise _Unavailable(f"cannot connect to {path}: {exc}") from exc


def _who(path: Path) -> str:
    """The worker at ``path``, as its ``.pid`` file names it."""
    with contextlib.suppress(OSError, ValueError):
        return f"PID {int(path.with_suffix('.pid').read_text())}, {path}"
    return f"PID unknown, {path}"


def _stopped(path: Path) -> bool:
    """Whether the worker at ``path`` is stopped (SIGSTOP, or traced): not worth a wait."""
    try:
        pid = int(path.with_suffix(".pid").read_text())
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, ValueError, IndexError):  # no .pid, no /proc: the heartbeat decides
        return False


def _via_worker(kind: str, msg: Message, context: Context) -> Message:
    request = [
        kind.encode(),
        message_to_proto(msg).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    ]  # encoded once, before any connection: the worker's deadline is for the transfer
    path = _worker_path(context)
    failed = path.with_suffix(".failed")  # when a worker of this node last failed to start
    for _ in range(2):  # a worker that was just leaving (idle) is replaced once
        conn = _try_connect(path)
        if conn is None:
            with contextlib.suppress(FileNotFoundError):
                age = time.time() - failed.stat().st_mtime
                if age < RETRY_START_AFTER:  # do not pay a failing start on every message
                    raise _Unavailable(
                        f"a node worker failed to start {age:.0f} s ago (see "
                        f"{path.with_suffix('.log')}); the next try is after "
                        f"{RETRY_START_AFTER:.0f} s"
                    )
            try:
                _start_worker(path)
            except _Unavailable:
                failed.touch()
                raise
            failed.unlink(missing_ok=True)
            conn = _try_connect(path)
            if conn is None:
                raise _Unavailable("the new node worker does not accept connections")
        with conn:
            if _stopped(path):
                raise _Unavailable(f"the node worker ({_who(path)}) is stopped")
            try:
                return _forward(conn, path, request, msg, context)
            except _NotAnswered:
                continue
    raise _Unavailable("the node worker closed the connection twice before answering")


REQUEST_SECONDS = 30.0  # for the worker to read a whole request once connected


def _start_worker(path: Path) -> None:
    """Start this node's worker unless another process did meanwhile; wait for its socket."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per node, even under a race
        conn = _try_connect(path)
        if conn is not None:  # started by another message meanwhile
            conn.close()
            return
        # Nothing listens there (we hold the lock): a killed worker's socket, if any, goes.
        path.unlink(missing_ok=True)
        idle = os.environ.get(IDLE_ENV, "600")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(_CODE), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        with _open_log(path.with_suffix(".log")) as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorm_flwr.client.worker_server", "--socket", str(path),
                 "--supernode-pid", str(os.getppid()), "--idle", idle,
                 "--request-seconds", str(REQUEST_SECONDS)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(_CODE),
            )  # fmt: skip
        # The worker binds before its heavy imports and renames the socket into place, so
        # the socket's existence means it accepts (requests wait until it has imported).
        deadline = time.monotonic() + START_TIMEOUT
        while not path.exists():
            if proc.poll() is not None:
                raise _Unavailable(
                    f"the node worker exited with code {proc.returncode} while starting; "
                    f"see {path.with_suffix('.log')}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise _Unavailable(f"the node worker did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(0.02)


LOG_BYTES = 10 * 2**20  # a worker's log past this is moved to .log.1 when the next one starts


def _open_log(log: Path):
    """The log a new worker appends to; one over ``LOG_BYTES`` becomes ``.log.1`` (the one
    before it is dropped), so a node's logs stay under twice that however long it runs."""
    with contextlib.suppress(FileNotFoundError):
        if log.stat().st_size > LOG_BYTES:
            log.replace(log.with_name(log.name + ".1"))
    return open(log, "ab")


class _NotAnswered(Exception):
    """The worker closed the connection before its answer: it did not take the message."""


def _await_answer(conn: socket.socket, timeout: float) -> None:
    """Wait for the worker's ``!`` (its answer follows); each heartbeat ``.`` restarts
    the ``timeout``, after which silence is ``TimeoutError``."""
    conn.settimeout(timeout)
    while (byte := conn.recv(1)) != b"!":
        if not byte:
            raise EOFError("the node worker closed the connection before answering")
        if byte != b".":
            raise NodeWorkerError(f"the node worker sent {byte!r}: not this protocol")


def _forward(
    conn: socket.socket, path: Path, request: list[bytes], msg: Message, context: Context
) -> Message:
    timeout = _reply_timeout()
    try:
        try:
            send_frames(conn, request, time.monotonic() + timeout)
            _await_answer(conn, timeout)
        except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
            raise _NotAnswered(str(exc)) from exc
        deadline = time.monotonic() + timeout  # the answer's frames are ready: sent at once
        try:
            status = json.loads(recv_frame(conn, deadline))
            if status["ok"]:
                content = recorddict_from_proto(
                    ProtoRecordDict.FromString(recv_frame(conn, deadline))
                )
                state = recorddict_from_proto(
                    ProtoRecordDict.FromString(recv_frame(conn, deadline))
                )
        except TimeoutError:
            raise
        except (EOFError, OSError) as exc:
            raise NodeWorkerError(f"the node worker died while replying ({exc})") from exc
    except TimeoutError as exc:
        raise _Unavailable(
            f"the node worker ({_who(path)}) gave no sign of life for {timeout:g} s ({TIMEOUT_ENV})"
        ) from exc
    if not status["ok"]:
        raise NodeWorkerError(status["error"])
    # The node's state as the handler left it (FedSA's local parts live there).
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return Message(content, reply_to=msg)
