"""The one path of every message exchange: send, wait, count, check, retry.

The hello handshake, every train round, every personalised evaluation and LoRM's
end-of-task statistics all go through :func:`exchange`. It counts the bytes both
ways with Flower's own count, records per node what failed (an error reply, no
reply within the timeout, a reply the checks rejected), decodes each reply with
the caller's ``decode`` (which raises :class:`~lorm_flwr.wire.PayloadError` on
anything unexpected; any other exception is a rejection too, never a crash), and
sends the whole exchange again while fewer than ``min_replies`` replies are valid,
up to ``retries`` times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from flwr.app import Message
from flwr.serverapp import Grid

from lorm_flwr.wire import record_bytes

__all__ = ["ExchangeFailed", "ExchangeLog", "exchange"]

log = logging.getLogger("flwr.lorm")

T = TypeVar("T")


@dataclass
class ExchangeLog:
    """What one exchange cost and what went wrong, node by node (all attempts)."""

    kind: str
    attempts: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    replies: int = 0  # valid replies of the last attempt
    failures: list[str] = field(default_factory=list)  # error replies and timeouts
    rejected: list[str] = field(default_factory=list)  # replies the checks refused
    timeouts: list[int] = field(default_factory=list)  # nodes that did not reply in time

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def merge(self, later: ExchangeLog) -> None:
        """Add a later exchange of the same kind (its bytes, attempts and what went wrong);
        ``replies`` becomes the later one's."""
        self.attempts += later.attempts
        self.bytes_down += later.bytes_down
        self.bytes_up += later.bytes_up
        self.failures += later.failures
        self.rejected += later.rejected
        self.timeouts += later.timeouts
        self.replies = later.replies


class ExchangeFailed(RuntimeError):
    """Fewer than the needed valid replies after every retry; ``log`` says why."""

    def __init__(self, message: str, exchange_log: ExchangeLog) -> None:
        super().__init__(message)
        self.log = exchange_log
        self.where: dict[str, int] = {}  # task and round, filled in by the round loop


@dataclass
class _Valid(Generic[T]):
    node: int
    value: T


def _reply_bytes(reply: Message) -> int:
    try:
        return record_bytes(reply.content)
    except Exception:  # noqa: BLE001 - a reply too malformed to count is rejected below anyway
        return 0


def exchange(
    grid: Grid,
    messages: Callable[[], list[Message]],
    decode: Callable[[Message], T],
    *,
    kind: str,
    min_replies: int,
    retries: int,
    timeout: float,
    order: Callable[[int], int] = lambda node: node,
) -> tuple[list[T], ExchangeLog]:
    """Send ``messages()`` and return the decoded valid replies, ordered by ``order(node)``.

    ``messages`` builds fresh messages for each attempt. Raises :class:`ExchangeFailed`
    when an attempt has fewer than ``min_replies`` valid replies and no retry is left.
    """
    entry = ExchangeLog(kind=kind)
    for attempt in range(1, retries + 2):
        entry.attempts = attempt
        prefix = f"attempt {attempt}: " if attempt > 1 else ""
        sent = messages()
        entry.bytes_down += sum(record_bytes(m.content) for m in sent)
        answered: set[int] = set()
        valid: list[_Valid[T]] = []
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        replies.reverse()
        while replies:
            # Each raw reply is dropped once decoded: the server holds the decoded,
            # checked tensors, not a second copy of every reply.
            reply = replies.pop()
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                entry.failures.append(f"{prefix}{kind}, node {node}: {reply.error.reason}")
                log.warning("%s: node %d failed: %s", kind, node, reply.error.reason)
                continue
            entry.bytes_up += _reply_bytes(reply)
            try:
                valid.append(_Valid(node, decode(reply)))
            except Exception as exc:  # noqa: BLE001 - any bad reply is a rejection, never a crash
                reason = str(exc) if str(exc).startswith("node ") else f"node {node}: {exc}"
                entry.rejected.append(f"{prefix}{kind}, {reason}")
                log.warning("%s: rejected reply: %s", kind, reason)
        silent = sorted({m.metadata.dst_node_id for m in sent} - answered)
        for node in silent:
            entry.timeouts.append(node)
            entry.failures.append(f"{prefix}{kind}, node {node}: no reply (timeout)")
        if silent:
            log.warning("%s: no reply from nodes %s (timeout)", kind, silent)
        entry.replies = len(valid)
        if len(valid) >= min_replies:
            valid.sort(key=lambda v: order(v.node))
            return [v.value for v in valid], entry
        message = f"{kind}: only {len(valid)} valid replies, {min_replies} needed"
        if attempt <= retries:
            log.warning("%s; sending again (attempt %d of %d)", message, attempt + 1, retries + 1)
    raise ExchangeFailed(
        f"{message}; gave up after {entry.attempts} attempts (round-retries={retries}); "
        f"failures: {entry.failures}; rejected: {entry.rejected}",
        entry,
    )
