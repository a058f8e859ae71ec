"""Length-prefixed frames over a stream socket, with deadlines, for the node worker.

A frame is an 8-byte big-endian length, then that many bytes. The reader guarantees
what :mod:`multiprocessing.connection` does not (``benchmarks/node_worker_framing.py``,
``benchmarks/results/node_worker_framing.md``):

- one deadline for a whole frame (and the caller may give several frames the same one),
  not a timeout per ``recv``: a peer that sends a byte a second is cut off at the
  deadline like a silent one;
- nothing is allocated from the length the peer claims: the buffer starts at
  ``CHUNK`` bytes at most and at most doubles (in place) when what arrived fills it, so
  memory follows the bytes that actually came (at most twice them, or ``CHUNK``, and
  never more than the frame);
- a length over the caller's ``max_frame`` (by default ``MAX_FRAME``, Flower's own
  message limit) is refused before any of its bytes are read.
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["CHUNK", "HEARTBEAT", "MAX_FRAME", "FrameError", "recv_frame", "send_frames"]

_HEADER = struct.Struct(">Q")
# No Flower message is larger than gRPC's limit (2 GiB - 1, flwr.common.GRPC_MAX_MESSAGE_LENGTH,
# which bounds the context a SuperNode hands its ClientApp too): a larger length is garbage.
MAX_FRAME = 2**31
CHUNK = 1 << 20  # the first buffer, and the most one recv asks for
# The node worker sends b"." this often while it holds a request, then b"!" and its answer.
HEARTBEAT = 0.5


class FrameError(ValueError):
    """The bytes are not a frame of this protocol (the connection is not usable after it)."""


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the deadline passed before the frame was complete")
    return left


def send_frames(
    conn: socket.socket, frames: list[bytes], deadline: float, lead: bytes = b""
) -> None:
    """Send ``lead``, then ``frames`` in order, all of them by ``deadline``
    (``time.monotonic()``). Small frames go in one write with what precedes them (a peer
    that reads once gets a short answer whole)."""
    pending = bytearray(lead)
    for payload in frames:
        pending += _HEADER.pack(len(payload))
        if len(payload) <= CHUNK:
            pending += payload
            continue
        _send(conn, pending, deadline)
        _send(conn, payload, deadline)
        pending = bytearray()
    if pending:
        _send(conn, pending, deadline)


def _send(conn: socket.socket, data: bytes | bytearray, deadline: float) -> None:
    conn.settimeout(_remaining(deadline))  # sendall: the timeout bounds the whole call
    conn.sendall(data)


def _read_into(conn: socket.socket, buffer: bytearray, start: int, deadline: float) -> int:
    conn.settimeout(_remaining(deadline))
    k = conn.recv_into(memoryview(buffer)[start:], min(len(buffer) - start, CHUNK))
    if k == 0:
        raise EOFError("the other side closed the connection mid-message")
    return k


_ZEROS = memoryview(bytes(CHUNK))


def _grow(buffer: bytearray, size: int) -> None:
    """Lengthen ``buffer`` to ``size`` in place, ``CHUNK`` by ``CHUNK`` (no temporary copy)."""
    while len(buffer) < size:
        buffer.extend(_ZEROS[: size - len(buffer)])


def recv_frame(conn: socket.socket, deadline: float, max_frame: int = MAX_FRAME) -> bytearray:
    """The next frame's bytes, whole by ``deadline`` (``time.monotonic()``), else
    ``TimeoutError``; ``EOFError`` when the peer closes (before any byte: ``EOFError``
    with no text), :class:`FrameError` when its length is over ``max_frame``."""
    header = bytearray(_HEADER.size)
    got = 0
    while got < len(header):
        try:
            got += _read_into(conn, header, got, deadline)
        except EOFError:
            if got == 0:
                raise EOFError from None  # closed between frames: no message was cut
            raise
    (n,) = _HEADER.unpack(header)
    if n > max_frame:
        raise FrameError(f"a frame of {n} bytes is over {max_frame}: not this protocol")
    buffer = bytearray(min(n, CHUNK))
    got = 0
    while got < n:
        if got == len(buffer):  # full: grow with what arrived, never to the claimed length
            _grow(buffer, min(n, 2 * len(buffer)))
        got += _read_into(conn, buffer, got, deadline)
    return buffer
