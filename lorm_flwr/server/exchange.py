"""The one path of every message exchange: send, wait, count, check, retry.

The hello handshake, every train round, every personalised evaluation and LoRM's
end-of-task statistics all go through :func:`exchange`. It counts the bytes both
ways with Flower's own count, records per node what failed (an error reply, no
reply within the timeout, a reply the checks rejected), decodes each reply with
the caller's ``decode`` (which raises :class:`~lorm_flwr.wire.PayloadError` on
anything unexpected; any other exception is a rejection too, never a crash), and
sends the whole exchange again while fewer than ``min_replies`` replies are valid,
up to ``retries`` times. :func:`live_nodes` bounds every wait for nodes to connect, so
a federation that shrank below what a round needs fails the run instead of hanging it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from lorm_flwr.wire import record_bytes
from lorm_flwr.wire.packing import pack_content, unpack_content

__all__ = [
    "ExchangeFailed",
    "ExchangeLog",
    "FixedNodes",
    "Fold",
    "TooFewNodes",
    "exchange",
    "live_nodes",
]

log = logging.getLogger("flwr.lorm")

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)


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
    # Every node that failed, timed out, was rejected or could not be sent to, in any
    # attempt: a retry of a partial-participation round asks others in their place.
    failed_nodes: list[int] = field(default_factory=list)
    # Most decoded replies held at once, waiting for an earlier node's (0: every reply went
    # straight into the fold). Bounds the server's memory beyond the fold's sums.
    held_max: int = 0

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
        self.failed_nodes += later.failed_nodes
        self.replies = later.replies
        self.held_max = max(self.held_max, later.held_max)


class ExchangeFailed(RuntimeError):
    """Fewer than the needed valid replies after every retry; ``log`` says why."""

    def __init__(self, message: str, exchange_log: ExchangeLog) -> None:
        super().__init__(message)
        self.log = exchange_log
        self.where: dict[str, int] = {}  # task and round, filled in by the round loop


class TooFewNodes(RuntimeError):
    """Fewer nodes connected than an exchange needs, after waiting its whole timeout."""


def live_nodes(
    grid: Grid, need: int, timeout: float, key: str = "min-clients",
    among: Collection[int] | None = None,
) -> list[int]:  # fmt: skip
    """The connected nodes (sorted) once at least ``need`` of them are among ``among`` (the
    nodes of the hello; None: any node counts); after ``timeout`` seconds,
    :class:`TooFewNodes` naming the run-config ``key`` that asked for them.

    Flower's own sampling (``sample_nodes``, inside ``configure_train``) waits for nodes
    with no limit at all; every wait of the app goes through here instead.
    """
    clock = getattr(grid, "clock", time.monotonic)
    sleep = getattr(grid, "sleep", time.sleep)
    deadline = clock() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        counted = nodes if among is None else [n for n in nodes if n in among]
        if len(counted) >= need:
            return nodes
        if clock() >= deadline:
            of = "" if among is None else " of the hello's"
            raise TooFewNodes(
                f"only {len(counted)}{of} SuperNodes connected after waiting {timeout:g} s; "
                f"{key}={need} needed"
            )
        sleep(1.0)


class FixedNodes:
    """A grid whose ``get_node_ids`` is a list already checked by :func:`live_nodes`.

    Handed to Flower's ``configure_train``/``configure_evaluate``: their sampling then
    sees the nodes this exchange waited for and never waits again on its own.
    """

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class Fold(Protocol[T_contra, R_co]):
    """Where an exchange delivers its valid replies, one at a time and in order."""

    def add(self, value: T_contra) -> None: ...

    def result(self) -> R_co: ...


class _Collect(Generic[T]):
    """The default fold: the decoded replies as a list."""

    def __init__(self) -> None:
        self.values: list[T] = []

    def add(self, value: T) -> None:
        self.values.append(value)

    def result(self) -> list[T]:
        return self.values


# Seconds between two pulls for replies (Flower's send_and_receive waits 3 s). A pull
# finds the last reply of a round on average half of this late, and the clients wait
# that long for the next round; an empty pull costs microseconds in simulation and
# one small request to the SuperLink in deployment.
POLL_SECONDS = 0.05
# Replies pulled at a time: those of the earliest nodes (in order) still outstanding.
# The rest wait in the SuperLink, so the server holds at most this many whatever the
# federation's size and whatever order replies arrive in.
PULL_WINDOW = 4


def _reply_bytes(reply: Message) -> int:
    try:
        return record_bytes(reply.content)
    except Exception:  # noqa: BLE001 - a reply too malformed to count is rejected below anyway
        return 0


_PENDING, _INVALID = object(), object()


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
    fold: Callable[[], Fold[T, Any]] | None = None,
    entry: ExchangeLog | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> tuple[Any, ExchangeLog]:
    """Send ``messages()``; deliver each valid decoded reply to a fold, in ``order(node)``.

    Messages are pushed with Flower's ``push_messages``; replies are pulled with
    ``pull_messages`` for the next ``PULL_WINDOW`` nodes in ``order`` only, decoded at
    once and the raw message dropped. A decoded reply goes to ``fold().add`` as soon
    as every node before it has replied, failed or been rejected, so the fold sees
    the same sequence in every run, and the server holds fewer than ``PULL_WINDOW``
    replies at a time however many nodes there are (later ones wait in the
    SuperLink). Once ``timeout`` has passed, a node of the window without a reply
    times out and the window moves on: each later node gets one more pull, so a reply
    that reached the SuperLink by then counts even if it came after the deadline
    (which late replies count depends on timing, as with any timeout; when every
    node replies, results are the same in every run). Returns
    ``fold().result()`` (default: the list of decoded replies) and the log.

    ``messages`` builds fresh messages for each attempt, and each attempt gets a
    fresh fold. Raises :class:`ExchangeFailed` when an attempt has fewer than
    ``min_replies`` valid replies and no retry is left. A grid may provide
    ``clock()``/``sleep(seconds)`` (test grids run on a fake clock).

    ``entry``: the log to fill (default: a new one), for a ``messages`` that reads
    ``entry.failed_nodes`` to ask other nodes in a retry. A ``messages`` that raises
    :class:`TooFewNodes` (its bounded wait for nodes ran out) fails the exchange at
    once: waiting again would only wait as long once more.

    ``meanwhile``: the server's own work to do while the nodes compute (the previous
    round's evaluation and checkpoint), called once, as soon as the first attempt's
    messages are pushed, or when building or pushing them fails.
    """
    entry = entry if entry is not None else ExchangeLog(kind=kind)
    clock = getattr(grid, "clock", time.monotonic)
    sleep = getattr(grid, "sleep", time.sleep)
    for attempt in range(1, retries + 2):
        entry.attempts = attempt
        prefix = f"attempt {attempt}: " if attempt > 1 else ""
        try:
            try:
                sent = sorted(messages(), key=lambda m: order(m.metadata.dst_node_id))
            except TooFewNodes as exc:
                raise ExchangeFailed(f"{prefix}{kind}: {exc}", entry) from None
            entry.bytes_down += sum(record_bytes(m.content) for m in sent)
            run = _Attempt(grid, sent, decode, fold() if fold is not None else _Collect(), entry,
                           f"{prefix}{kind}")  # fmt: skip
            del sent  # the global tensors are not kept once pushed
        except BaseException:
            if meanwhile is not None:  # still done; its own error must not hide this one
                try:
                    meanwhile()
                except Exception:
                    log.exception("%s: the work meanwhile failed too", kind)
            raise
        if meanwhile is not None:
            work, meanwhile = meanwhile, None
            work()
        deadline = clock() + timeout
        while not run.done():
            if run.pull():
                continue
            if clock() >= deadline:
                run.give_up_on_window()  # its nodes had the whole timeout; move on
            else:
                sleep(POLL_SECONDS)
        silent = sorted(run.silent)
        entry.failed_nodes += silent
        for node in silent:
            entry.timeouts.append(node)
            entry.failures.append(f"{prefix}{kind}, node {node}: no reply (timeout)")
        if silent:
            log.warning("%s: no reply from nodes %s (timeout)", kind, silent)
        entry.replies = run.valid
        if run.valid >= min_replies:
            return run.sink.result(), entry
        del run
        message = f"{kind}: only {entry.replies} valid replies, {min_replies} needed"
        if attempt <= retries:
            log.warning("%s; sending again (attempt %d of %d)", message, attempt + 1, retries + 1)
    raise ExchangeFailed(
        f"{message}; gave up after {entry.attempts} attempts (round-retries={retries}); "
        f"failures: {entry.failures}; rejected: {entry.rejected}",
        entry,
    )


class _Attempt:
    """One attempt of an exchange: the pushed messages' slots, in order, and the fold."""

    def __init__(self, grid: Grid, sent: list[Message], decode, sink: Fold, entry, label: str):
        self.grid, self.decode, self.sink, self.entry, self.label = grid, decode, sink, entry, label
        self.nodes = [m.metadata.dst_node_id for m in sent]
        # One array per record on the wire (results count the records as built). Content
        # shared by several messages is packed once and stays shared.
        packed: dict[int, tuple[RecordDict, RecordDict]] = {}
        for m in sent:
            if id(m.content) not in packed:
                packed[id(m.content)] = (m.content, pack_content(m.content))
            m.content = packed[id(m.content)][1]
        del packed
        ids = list(grid.push_messages(sent))
        if len(ids) != len(self.nodes):  # e.g. a rejected batch: [] (nothing maps to a node)
            ids = [None] * len(self.nodes)
        # A message the SuperLink refused comes back as None or "" (never a real id).
        self.ids = [i or None for i in ids]
        self.slots: list[Any] = [_PENDING] * len(self.nodes)
        self.slot_of = {i: k for k, i in enumerate(self.ids) if i is not None}
        for k, i in enumerate(self.ids):
            if i is None:
                self.slots[k] = _INVALID
                entry.failures.append(f"{label}, node {self.nodes[k]}: could not be sent")
                entry.failed_nodes.append(self.nodes[k])
        self.valid = self.folded = self.ready = 0  # valid replies; folded; slots delivered
        self.silent: list[int] = []

    def done(self) -> bool:
        return self.ready == len(self.slots)

    def _window(self) -> range:
        return range(self.ready, min(self.ready + PULL_WINDOW, len(self.slots)))

    def pull(self) -> int:
        """Pull the outstanding replies among the next ``PULL_WINDOW`` nodes in order and fold
        what is in order; -> replies got. Later nodes' replies wait in the SuperLink."""
        wanted = [self.ids[k] for k in self._window() if self.slots[k] is _PENDING]
        got = 0
        for reply in self.grid.pull_messages(wanted) if wanted else []:
            got += self._take(reply)  # only replies that resolve a pending node count
            self._deliver()
            self.entry.held_max = max(self.entry.held_max, self.valid - self.folded)
        return got

    def give_up_on_window(self) -> None:
        """The window's nodes that have not replied time out; fold what follows them."""
        for k in self._window():
            if self.slots[k] is _PENDING:
                self.slots[k] = _INVALID
                self.silent.append(self.nodes[k])
        self._deliver()

    def _take(self, reply: Message) -> bool:
        """Resolve the node ``reply`` answers; False for anything else (ignored)."""
        k = self.slot_of.get(reply.metadata.reply_to_message_id)
        if k is None or self.slots[k] is not _PENDING:
            return False  # not ours, or a duplicate
        self.slots[k] = _INVALID
        # Named by the node asked: an error Flower creates itself comes from the SuperLink.
        node, entry = self.nodes[k], self.entry
        if reply.has_error():
            entry.failed_nodes.append(node)
            entry.failures.append(f"{self.label}, node {node}: {reply.error.reason}")
            log.warning("%s: node %d failed: %s", self.label, node, reply.error.reason)
            return True
        try:
            try:
                reply.content = unpack_content(reply.content)
            finally:  # counted as built (a reply that cannot be unpacked: as it came)
                entry.bytes_up += _reply_bytes(reply)
            self.slots[k] = self.decode(reply)
            self.valid += 1
        except Exception as exc:  # noqa: BLE001 - any bad reply is a rejection, never a crash
            reason = str(exc) if str(exc).startswith("node ") else f"node {node}: {exc}"
            entry.rejected.append(f"{self.label}, {reason}")
            entry.failed_nodes.append(node)
            log.warning("%s: rejected reply: %s", self.label, reason)
        return True

    def _deliver(self) -> None:
        """Hand the resolved prefix of the slots to the fold (valid ones), freeing each."""
        while self.ready < len(self.slots) and self.slots[self.ready] is not _PENDING:
            value, self.slots[self.ready] = self.slots[self.ready], _INVALID
            if value is not _INVALID:
                self.sink.add(value)
                self.folded += 1
            self.ready += 1
