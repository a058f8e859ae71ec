"""The node worker's own process (:mod:`lorm_flwr.client.node_worker` starts it and says why).

``python -m lorm_flwr.client.worker_server --socket PATH --supernode-pid PID --idle S
--request-seconds S``. Connections are accepted by a thread, and each one's request is
read whole by one deadline in a thread of its own, so a slow or silent peer holds neither
the worker nor other requests; the messages are handled one at a time, in the main
thread. While the worker holds a request (queued or being handled) its client gets a
``.`` every ``HEARTBEAT`` s from a thread of its own, then ``!`` and the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from lorm_flwr.client.worker_framing import HEARTBEAT, FrameError, recv_frame, send_frames

__all__ = ["serve"]

logger = logging.getLogger(__name__)

REPLY_SECONDS = 60.0  # for a worker to send an answer; a client that reads nothing is left
MAX_CONNECTIONS = 32  # open at once; more are closed at once (their ClientApps fall back)
KIND_BYTES = 64  # a message kind's frame is a short name


class HandlerError(RuntimeError):
    """The message could not be handled here (its client raises it as ``NodeWorkerError``)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Sends ``.`` every ``HEARTBEAT`` s to each connection whose request the worker holds.

    Its sockets are non-blocking: a client that reads nothing (it has a backlog of them)
    is skipped, never waited for. After :meth:`discard` returns, no ``.`` goes to that
    connection any more (sends happen under the lock), so the answer can follow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def add(self, conn: socket.socket) -> None:
        conn.settimeout(0.0)
        with self._lock:
            self._conns.add(conn)

    def discard(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT)
            with self._lock:
                for conn in list(self._conns):
                    try:
                        conn.send(b".", socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        pass
                    except OSError:  # the client left; its request is dropped in its turn
                        self._conns.discard(conn)


def _accept(server: socket.socket, requests: queue.Queue, beat: _Heartbeat, seconds: float,
            activity: list[float]) -> None:  # fmt: skip
    """Accept connections; each is read in a thread of its own, then queued."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            if server.fileno() == -1:
                return
            logger.exception("lorm-flwr node worker: accept failed")
            time.sleep(0.5)
            continue
        activity[0] = time.monotonic()
        if not slots.acquire(blocking=False):
            logger.warning("lorm-flwr node worker: %d connections open; one refused",
                           MAX_CONNECTIONS)  # fmt: skip
            conn.close()
            continue
        args = (conn, slots.release, requests, beat, seconds)
        threading.Thread(target=_read_request, args=args, daemon=True).start()


class _Undecodable(Exception):
    """The request's frames arrived but do not decode (the client is told why)."""


def _decode(frame: bytearray, proto, convert):
    try:
        return convert(proto.FromString(frame))
    except Exception as exc:
        raise _Undecodable(f"{type(exc).__name__}: {exc}") from exc


def _read_request(conn: socket.socket, release, requests: queue.Queue, beat: _Heartbeat,
                  seconds: float) -> None:  # fmt: skip
    """Read one request whole, its three frames by one deadline of ``seconds``; queue it."""
    queued = False
    try:
        deadline = time.monotonic() + seconds
        try:
            kind = recv_frame(conn, deadline, KIND_BYTES).decode()
        except EOFError as exc:
            if str(exc):
                raise
            return  # connected and left without a request
        try:
            msg = _decode(recv_frame(conn, deadline), ProtoMessage, message_from_proto)
            context = _decode(recv_frame(conn, deadline), ProtoContext, context_from_proto)
        except _Undecodable as exc:  # a request that decodes badly is answered, named
            logger.warning("lorm-flwr node worker: a %s request does not decode: %s", kind, exc)
            _send_answer(conn, {"ok": False, "error": str(exc)})
            return
        beat.add(conn)  # from now on its client hears from this worker
        requests.put((conn, release, kind, msg, context))
        queued = True
    except TimeoutError:
        logger.warning("lorm-flwr node worker: a request was not whole within %g s; dropped",
                       seconds)  # fmt: skip
    except (EOFError, FrameError, OSError, UnicodeDecodeError) as exc:
        logger.warning("lorm-flwr node worker: connection failed: %s", exc)
    finally:
        if not queued:
            conn.close()
            release()


def _send_answer(conn: socket.socket, status: dict, frames: list[bytes] = ()) -> None:
    send_frames(conn, [json.dumps(status).encode(), *frames], time.monotonic() + REPLY_SECONDS,
                lead=b"!")  # fmt: skip


def _client_left(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _answer(item: tuple, handlers: dict, beat: _Heartbeat) -> None:
    """Handle one queued request (here, in the main thread) and send its answer."""
    conn, release, kind, msg, context = item
    try:
        if _client_left(conn):  # it stopped waiting (timeout): its ClientApp handled it
            logger.warning("lorm-flwr node worker: the client of a %s message left; dropped", kind)
            return
        try:
            if kind not in handlers:
                raise HandlerError(f"unknown message kind {kind!r}")
            reply = handlers[kind](msg, context)
            if reply.has_error():
                raise HandlerError(f"{reply.error.code}: {reply.error.reason}")
            frames = [
                recorddict_to_proto(reply.content).SerializeToString(),
                recorddict_to_proto(context.state).SerializeToString(),
            ]
            status = {"ok": True}
        except Exception as exc:
            logger.exception("lorm-flwr node worker: %s failed", kind)
            status, frames = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
        beat.discard(conn)
        _send_answer(conn, status, frames)
    except OSError as exc:  # TimeoutError included: a client that reads nothing is left
        logger.warning("lorm-flwr node worker: the %s answer was not delivered: %s", kind, exc)
    finally:
        beat.discard(conn)
        conn.close()
        release()


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


def serve(
    path: Path,
    supernode_pid: int,
    idle: float,
    request_seconds: float,
    handlers: dict | None = None,
) -> None:
    """Answer messages one at a time until idle for ``idle`` s or the SuperNode is gone;
    a request must arrive whole within ``request_seconds`` of its connection; ``handlers``:
    message kind -> handler (by default :mod:`lorm_flwr.client.handlers`')."""
    # Stopping the SuperNode's process group sends SIGTERM: leave through `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socket_inode = _publish(path, lambda tmp: (server.bind(str(tmp)), server.listen(16)))
    pid_file = path.with_suffix(".pid")
    pid_inode = _publish(pid_file, lambda tmp: tmp.write_text(str(os.getpid())))
    requests: queue.Queue = queue.Queue()
    activity = [time.monotonic()]
    try:
        # Accepting (and heartbeats) first, imports second: the starter need not wait for
        # them, clients hear from the worker meanwhile, and a worker that cannot import
        # closes its connections (and their ClientApps fall back) instead of hanging.
        beat = _Heartbeat()
        args = (server, requests, beat, request_seconds, activity)
        threading.Thread(target=_accept, args=args, name="accept", daemon=True).start()
        if handlers is None:
            from lorm_flwr.client.handlers import HANDLERS as handlers
        logger.info("lorm-flwr node worker %d listening on %s", os.getpid(), path)
        while True:
            try:
                item = requests.get(timeout=2.0)
            except queue.Empty:
                if time.monotonic() - activity[0] > idle or not _alive(supernode_pid):
                    break
                continue
            _answer(item, handlers, beat)
            activity[0] = time.monotonic()
    finally:
        server.close()
        _remove_if_mine(path, socket_inode)
        _remove_if_mine(pid_file, pid_inode)


def main() -> None:
    p = argparse.ArgumentParser(description="lorm-flwr's node worker (started by the ClientApp)")
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--supernode-pid", required=True, type=int)
    p.add_argument("--idle", type=float, default=600.0)
    p.add_argument("--request-seconds", type=float, required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve(args.socket, args.supernode_pid, args.idle, args.request_seconds)


if __name__ == "__main__":
    main()
