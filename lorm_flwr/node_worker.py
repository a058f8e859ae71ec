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
  SuperNode's group stops it). It exits when idle for ``LORM_FLWR_NODE_WORKER_IDLE``
  seconds (default 600) or when its SuperNode is gone. Other code (a new FAB) gets a
  new worker.
- It talks over a Unix socket in a folder only this user can open, in Flower's own
  protobuf encoding of the message and the context; the reply content and the node's
  updated state come back. Nothing is pickled.
- The handlers are the same functions (:mod:`lorm_flwr.client_handlers`), so results
  equal an in-process run (tests/test_deployment.py compares both with a simulation).
- Failures: an exception in a handler comes back as the message's error; a worker that
  dies mid-message is a failed message (the server's retries take it) and the next
  message starts a new one; a worker that cannot start means running in process, with
  a warning. In a Ray actor (simulation) it is never used: the actor is long-lived.
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
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message

__all__ = ["ENV", "NodeWorkerError", "enabled", "handle"]

ENV = "LORM_FLWR_NODE_WORKER"
IDLE_ENV = "LORM_FLWR_NODE_WORKER_IDLE"
START_TIMEOUT = 300.0  # seconds for a new worker to import everything and listen
_ON = {"1", "true", "on", "yes"}
_CODE = Path(__file__).resolve().parents[1]  # the folder that holds lorm_flwr (a FAB's, too)

logger = logging.getLogger(__name__)


class NodeWorkerError(RuntimeError):
    """The node worker failed this message (its reason is in the text)."""


def enabled() -> bool:
    """Forward to a node worker: asked for, and not already in a long-lived Ray actor."""
    return os.environ.get(ENV, "").strip().lower() in _ON and "ray" not in sys.modules


def handle(kind: str, msg: Message, context: Context) -> Message:
    """Run handler ``kind`` on ``msg``: in the node worker when :func:`enabled`, else here."""
    if enabled():
        for attempt in range(2):
            try:
                conn = _connect(_ensure_worker(context))
            except (OSError, TimeoutError, NodeWorkerError) as exc:
                # A worker that just exited (idle) refuses once; a new one is started.
                if attempt == 0 and isinstance(exc, ConnectionError):
                    continue
                logger.warning(
                    "lorm-flwr: no node worker (%s); running this message in process", exc
                )
                break
            with conn:
                return _forward(conn, kind, msg, context)
    from lorm_flwr.client_handlers import HANDLERS

    return HANDLERS[kind](msg, context)


# ------------------------------------------------------------------ framing
def _send(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack(">Q", len(payload)) + payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the node worker closed the connection mid-message")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(conn: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(conn, 8))
    return _recv_exact(conn, n)


# ------------------------------------------------------------------ client side
def _socket_dir() -> Path:
    """A folder only this user can open (sockets need short paths: the system temp)."""
    folder = Path(tempfile.gettempdir()) / f"lorm-flwr-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise NodeWorkerError(f"{folder} is not private to this user; not using it")
    return folder


def _code_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((_CODE / "lorm_flwr").rglob("*.py")):
        h.update(str(path.relative_to(_CODE)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _worker_path(context: Context) -> Path:
    key = json.dumps([sys.executable, str(_CODE), _code_digest(), context.node_id])
    return _socket_dir() / f"w-{hashlib.sha256(key.encode()).hexdigest()[:20]}.sock"


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _ensure_worker(context: Context) -> Path:
    """The socket of this node's worker, starting the worker if none answers."""
    path = _worker_path(context)
    if _connectable(path):
        return path
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per node, even under a race
        if _connectable(path):
            return path
        idle = os.environ.get(IDLE_ENV, "600")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(_CODE), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        with open(path.with_suffix(".log"), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lorm_flwr.node_worker", "--socket", str(path),
                 "--supernode-pid", str(os.getppid()), "--idle", idle],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(_CODE),
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not _connectable(path):
            if proc.poll() is not None:
                raise NodeWorkerError(
                    f"the node worker exited with code {proc.returncode} while starting; "
                    f"see {path.with_suffix('.log')}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"the node worker did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
    return path


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _forward(conn: socket.socket, kind: str, msg: Message, context: Context) -> Message:
    from flwr.common.serde import (
        context_to_proto,
        message_to_proto,
        recorddict_from_proto,
    )
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    _send(conn, kind.encode())
    _send(conn, message_to_proto(msg).SerializeToString())
    _send(conn, context_to_proto(context).SerializeToString())
    status = json.loads(_recv(conn))
    if not status["ok"]:
        raise NodeWorkerError(status["error"])
    content = recorddict_from_proto(ProtoRecordDict.FromString(_recv(conn)))
    state = recorddict_from_proto(ProtoRecordDict.FromString(_recv(conn)))
    # The node's state as the handler left it (FedSA's local parts live there).
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------ worker side
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

    kind = _recv(conn).decode()
    msg = message_from_proto(ProtoMessage.FromString(_recv(conn)))
    context = context_from_proto(ProtoContext.FromString(_recv(conn)))
    try:
        if kind not in handlers:
            raise NodeWorkerError(f"unknown message kind {kind!r}")
        reply = handlers[kind](msg, context)
        if reply.has_error():
            raise NodeWorkerError(f"{reply.error.code}: {reply.error.reason}")
    except Exception as exc:
        logger.exception("lorm-flwr node worker: %s failed", kind)
        _send(conn, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    _send(conn, json.dumps({"ok": True}).encode())
    _send(conn, recorddict_to_proto(reply.content).SerializeToString())
    _send(conn, recorddict_to_proto(context.state).SerializeToString())


def serve(path: Path, supernode_pid: int, idle: float) -> None:
    """Accept one message at a time until idle for ``idle`` s or the SuperNode is gone."""
    from lorm_flwr.client_handlers import HANDLERS  # the imports, once

    # Stopping the SuperNode's process group sends SIGTERM: leave through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a dead worker's socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    pid_file = path.with_suffix(".pid")
    pid_file.write_text(str(os.getpid()))  # for operators and tests: stop it by PID
    server.settimeout(2.0)
    last = time.monotonic()
    logger.info("lorm-flwr node worker %d listening on %s", os.getpid(), path)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if time.monotonic() - last > idle or not _alive(supernode_pid):
                    break
                continue
            with conn:
                conn.settimeout(None)
                try:
                    _serve_one(conn, HANDLERS)
                except (OSError, ValueError) as exc:  # the ClientApp went away mid-message
                    logger.warning("lorm-flwr node worker: connection dropped (%s)", exc)
            last = time.monotonic()
    finally:
        server.close()
        for leftover in (path, pid_file):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


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
