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
  updated state come back. Nothing is pickled.
- The handlers are the same functions (:mod:`lorm_flwr.client_handlers`), so results
  equal an in-process run (tests/test_node_worker.py, tests/test_deployment.py).
- Failures: an exception in a handler comes back as the message's error (named
  ``NodeWorkerError: <the handler's exception>``); a worker that closes the connection
  before answering (it was exiting, or died) is replaced once, and if that fails too,
  or no worker can start, the message runs in this process, with a warning (after a
  failed start, for ``RETRY_START_AFTER`` seconds, before a new start is tried). In a Ray
  actor (simulation) it is never used: the actor is long-lived.
- Unlike in-process handling: the handlers' log lines and tracebacks go to the worker's
  ``.log`` beside its socket, not to the SuperNode's output; a failed message leaves the
  node's state as it was before it (in process, Flower keeps what the handler changed
  before failing); the working directory is the app's folder.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message

from lorm_flwr.node_cache import package_digest

__all__ = ["ENV", "NodeWorkerError", "enabled", "handle"]

ENV = "LORM_FLWR_NODE_WORKER"
IDLE_ENV = "LORM_FLWR_NODE_WORKER_IDLE"
START_TIMEOUT = 300.0  # seconds for a new worker to import everything and listen
RETRY_START_AFTER = 300.0  # after a failed start, messages run in process this long
_ON = {"1", "true", "on", "yes"}
_CODE = Path(__file__).resolve().parents[1]  # the folder that holds lorm_flwr (a FAB's, too)

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
    from lorm_flwr.client_handlers import HANDLERS

    return HANDLERS[kind](msg, context)


class _Unavailable(Exception):
    """No worker could take the message (the message itself was not handled)."""


# ------------------------------------------------------------------ framing
def _send(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack(">Q", len(payload)))
    conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view, got = memoryview(buffer), 0
    while got < n:
        k = conn.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise EOFError("the other side closed the connection mid-message")
        got += k
    return bytes(buffer)


# No frame is larger than a Flower message can be (gRPC's 2 GiB); a larger length is
# garbage, refused before anything is allocated for it.
MAX_FRAME = 2**31


def _recv(conn: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(conn, 8))
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} bytes is over {MAX_FRAME}: not this protocol")
    return _recv_exact(conn, n)


# ------------------------------------------------------------------ client side
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
    """A connection to the worker at ``path``, or None when no worker listens there."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    except OSError as exc:
        conn.close()
        raise _Unavailable(f"cannot connect to {path}: {exc}") from exc
    return conn


def _via_worker(kind: str, msg: Message, context: Context) -> Message:
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
            try:
                return _forward(conn, kind, msg, context)
            except _NotAnswered:
                continue
    raise _Unavailable("the node worker closed the connection twice before answering")


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
                [sys.executable, "-m", "lorm_flwr.node_worker", "--socket", str(path),
                 "--supernode-pid", str(os.getppid()), "--idle", idle],
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
    """The worker closed the connection before its status: it did not take the message."""


def _forward(conn: socket.socket, kind: str, msg: Message, context: Context) -> Message:
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    try:
        _send(conn, kind.encode())
        _send(conn, message_to_proto(msg).SerializeToString())
        _send(conn, context_to_proto(context).SerializeToString())
        status = json.loads(_recv(conn))
    except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
        raise _NotAnswered(str(exc)) from exc
    if not status["ok"]:
        raise NodeWorkerError(status["error"])
    try:
        content = recorddict_from_proto(ProtoRecordDict.FromString(_recv(conn)))
        state = recorddict_from_proto(ProtoRecordDict.FromString(_recv(conn)))
    except (EOFError, OSError) as exc:
        raise NodeWorkerError(f"the node worker died while replying ({exc})") from exc
    # The node's state as the handler left it (FedSA's local parts live there).
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------ worker side
REQUEST_SECONDS = 120.0  # to read a request once connected; a silent peer is dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve_one(conn: socket.socket, handlers: dict) -> None:
    from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    conn.settimeout(REQUEST_SECONDS)
    try:
        kind = _recv(conn).decode()
    except EOFError:
        return  # connected and left without a request
    try:
        msg = message_from_proto(ProtoMessage.FromString(_recv(conn)))
        context = context_from_proto(ProtoContext.FromString(_recv(conn)))
        conn.settimeout(None)
        if kind not in handlers:
            raise NodeWorkerError(f"unknown message kind {kind!r}")
        reply = handlers[kind](msg, context)
        if reply.has_error():
            raise NodeWorkerError(f"{reply.error.code}: {reply.error.reason}")
        content = recorddict_to_proto(reply.content).SerializeToString()
        state = recorddict_to_proto(context.state).SerializeToString()
    except Exception as exc:
        logger.exception("lorm-flwr node worker: %s failed", kind)
        _send(conn, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    _send(conn, json.dumps({"ok": True}).encode())
    _send(conn, content)
    _send(conn, state)


def _publish(path: Path, write) -> int:
    """Create ``path`` under a temporary name, then rename it into place (atomic);
    returns its inode, so that only this process removes it later."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write(tmp)
    os.rename(tmp, path)
    return os.stat(path).st_ino


def _remove_if_mine(path: Path, inode: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == inode:
            path.unlink()


def serve(path: Path, supernode_pid: int, idle: float) -> None:
    """Accept one message at a time until idle for ``idle`` s or the SuperNode is gone."""
    # Stopping the SuperNode's process group sends SIGTERM: leave through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_inode = _publish(path, lambda tmp: (server.bind(str(tmp)), server.listen(16)))
    pid_file = path.with_suffix(".pid")
    pid_inode = _publish(pid_file, lambda tmp: tmp.write_text(str(os.getpid())))
    try:
        # Bound first, imports second: the starter need not wait for them, and a worker that
        # cannot import fails a request (and its starter falls back) instead of hanging.
        from lorm_flwr.client_handlers import HANDLERS

        server.settimeout(2.0)
        last = time.monotonic()
        logger.info("lorm-flwr node worker %d listening on %s", os.getpid(), path)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if time.monotonic() - last > idle or not _alive(supernode_pid):
                    break
                continue
            with conn:
                try:
                    _serve_one(conn, HANDLERS)
                except Exception:
                    logger.exception("lorm-flwr node worker: connection failed")
            last = time.monotonic()
    finally:
        server.close()
        _remove_if_mine(path, socket_inode)
        _remove_if_mine(pid_file, pid_inode)


def main() -> None:
    p = argparse.ArgumentParser(description="lorm-flwr's node worker (started by the ClientApp)")
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--supernode-pid", required=True, type=int)
    p.add_argument("--idle", type=float, default=600.0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.socket, args.supernode_pid, args.idle)


if __name__ == "__main__":
    main()
