"""Can :mod:`multiprocessing.connection` replace the node worker's own framing?

Measures, for a Unix socket to a server process: a fresh connection and a small exchange
(what each ClientApp process does once), the round trip of a few-MB payload (a Flower
message's size), what receiving a length prefix that claims 512 MiB allocates, and
whether ``poll(timeout)`` bounds the receipt of a whole frame from a peer that dribbles.

    python -m benchmarks.node_worker_framing [--mb 4] [--repeats 30]

Results and the decision: ``benchmarks/results/node_worker_framing.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import threading
import time
import tracemalloc
from multiprocessing.connection import Client, Connection, Listener

from lorm_flwr.client.worker_framing import recv_frame, send_frames

AUTHKEY = b"lorm-flwr-bench"
FAR = 3600.0  # a deadline that never passes in this benchmark


def _serve_mp(address: str, ready) -> None:
    with Listener(address, family="AF_UNIX", authkey=AUTHKEY) as listener:
        ready.set()
        while True:
            with listener.accept() as conn:
                while True:
                    try:
                        payload = conn.recv_bytes()
                    except EOFError:
                        break
                    if payload == b"stop":
                        return
                    conn.send_bytes(payload)


def _serve_frames(address: str, ready) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(16)
    ready.set()
    while True:
        conn, _ = server.accept()
        with conn:
            while True:
                try:
                    payload = recv_frame(conn, time.monotonic() + FAR)
                except EOFError:
                    break
                if payload == b"stop":
                    return
                send_frames(conn, [payload], time.monotonic() + FAR)


def _mp_client(address: str):
    conn = Client(address, family="AF_UNIX", authkey=AUTHKEY)

    def exchange(payload: bytes) -> bytes:
        conn.send_bytes(payload)
        return conn.recv_bytes()

    return conn, exchange


def _frames_client(address: str):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(address)

    def exchange(payload: bytes) -> bytes:
        send_frames(conn, [payload], time.monotonic() + FAR)
        return recv_frame(conn, time.monotonic() + FAR)

    return conn, exchange


def _measure(name: str, serve, client, mb: float, repeats: int) -> dict:
    address = os.path.join(tempfile.mkdtemp(prefix="lfr-bench-"), "s.sock")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=serve, args=(address, ready), daemon=True)
    proc.start()
    ready.wait(10)
    connects = []
    for _ in range(repeats):  # what one ClientApp process does: connect, one small exchange
        t = time.perf_counter()
        conn, exchange = client(address)
        exchange(b"x" * 100)
        connects.append(time.perf_counter() - t)
        conn.close()
    payload = os.urandom(int(mb * 2**20))
    conn, exchange = client(address)
    trips = []
    for _ in range(repeats):
        t = time.perf_counter()
        assert len(exchange(payload)) == len(payload)
        trips.append(time.perf_counter() - t)
    conn.close()
    conn, _ = client(address)
    if isinstance(conn, Connection):
        conn.send_bytes(b"stop")
    else:
        send_frames(conn, [b"stop"], time.monotonic() + FAR)
    conn.close()
    proc.join(10)
    trip = statistics.median(trips)
    return {
        "framing": name,
        "connect_and_small_exchange_ms": round(1e3 * statistics.median(connects), 3),
        f"round_trip_{mb:g}MiB_ms": round(1e3 * trip, 2),
        "throughput_GiB_s": round(2 * len(payload) / trip / 2**30, 2),
    }


def _allocation(claim: int = 512 * 2**20) -> dict:
    """Peak traced allocation while receiving a prefix claiming ``claim`` bytes, 16 sent."""
    out = {}
    for name in ("multiprocessing.connection", "worker_framing"):
        a, b = socket.socketpair()
        header = struct.pack("!i", claim) if name.startswith("multi") else struct.pack(">Q", claim)
        a.sendall(header + b"y" * 16)
        a.close()
        tracemalloc.start()
        try:
            if name.startswith("multi"):
                with Connection(os.dup(b.fileno())) as conn:
                    conn.recv_bytes(2**31)
            else:
                recv_frame(b, time.monotonic() + FAR)
        except (EOFError, OSError):
            pass  # the peer closed mid-frame, as intended
        out[name] = round(tracemalloc.get_traced_memory()[1] / 2**20, 2)
        tracemalloc.stop()
        b.close()
    return {"peak_MiB_for_a_512MiB_claim": out}


def _dribble_deadline(seconds: float = 2.0, wait: float = 0.5) -> dict:
    """A peer sends a 4-byte prefix claiming 10 bytes, then one byte each 0.2 s."""
    a, b = socket.socketpair()

    def dribble() -> None:
        a.sendall(struct.pack("!i", 10))
        for _ in range(10):
            time.sleep(seconds / 10)
            a.sendall(b"z")

    thread = threading.Thread(target=dribble)
    thread.start()
    with Connection(os.dup(b.fileno())) as conn:
        t = time.perf_counter()
        ready = conn.poll(wait)
        conn.recv_bytes()
        blocked = time.perf_counter() - t
    thread.join()
    a.close()
    b.close()
    return {
        "mp_poll_timeout_s": wait,
        "mp_poll_said_ready": ready,
        "mp_recv_blocked_s": round(blocked, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    for name, serve, client in (
        ("multiprocessing.connection (authkey)", _serve_mp, _mp_client),
        ("worker_framing", _serve_frames, _frames_client),
    ):
        print(_measure(name, serve, client, args.mb, args.repeats))
    print(_allocation())
    print(_dribble_deadline())


if __name__ == "__main__":
    main()
