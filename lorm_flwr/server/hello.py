"""The hello: which partition each node holds, and how long to wait for nodes.

The first exchange of every run (and resume). A node whose hello does not fit the
federation is rejected and named; the run goes on while ``min-clients`` nodes remain.
"""

from __future__ import annotations

import logging

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from lorm_flwr import wire
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.server.exchange import ExchangeLog, TooFewNodes, exchange, live_nodes

__all__ = ["HELLO_TIMEOUT_SECONDS", "NODE_WAIT_SECONDS", "handshake", "wait_for_nodes"]

log = logging.getLogger("flwr.lorm")

NODE_WAIT_SECONDS = 300.0
# A node's first reply waits for its ClientApp to start (imports, data, model): far longer
# than a round's reply may take on a warm node, so the handshake has its own timeout.
HELLO_TIMEOUT_SECONDS = 600.0


def wait_for_nodes(grid: Grid, count: int, key: str = "min-clients") -> list[int]:
    """The connected nodes once there are ``count``; after ``NODE_WAIT_SECONDS``, an error
    naming the run-config ``key`` that asked for them."""
    return live_nodes(grid, count, NODE_WAIT_SECONDS, key)


def _hello(
    grid: Grid, cfg: RunConfig, nodes: list[int], min_replies: int
) -> tuple[list[tuple[int, int, int]], ExchangeLog]:
    def messages() -> list[Message]:
        return [Message(RecordDict(), dst_node_id=n, message_type=wire.QUERY_HELLO) for n in nodes]

    def decode(msg: Message) -> tuple[int, int, int]:
        pid, num = wire.decode_hello(msg)
        return msg.metadata.src_node_id, pid, num

    # A node listed and gone (a SuperNode restarted under a new id) is only a timeout.
    return exchange(
        grid, messages, decode, kind="hello", min_replies=min_replies,
        retries=cfg.round_retries, timeout=HELLO_TIMEOUT_SECONDS,
    )  # fmt: skip


def _federation_size(cfg: RunConfig, replies: list[tuple[int, int, int]]) -> int:
    """The federation's num-partitions: ``num-clients`` when any node claims it, else the
    count most nodes claim (a node that claims another is rejected by the caller).

    When no node claims ``num-clients`` the federation is not the one the run asked
    for, and the run stops at once with the remedy; nodes that disagree with no
    majority stop it too, naming what each claims.
    """
    claims: dict[int, list[int]] = {}
    for node, _, num in replies:
        claims.setdefault(num, []).append(node)
    if cfg.num_clients and cfg.num_clients in claims:
        return cfg.num_clients
    ranked = sorted(claims, key=lambda num: -len(claims[num]))
    if len(ranked) > 1 and len(claims[ranked[0]]) == len(claims[ranked[1]]):
        said = "; ".join(f"nodes {sorted(claims[num])}: {num}" for num in sorted(claims))
        raise RuntimeError(f"nodes disagree on num-partitions with no majority ({said})")
    num = ranked[0]
    if cfg.num_clients:
        raise ConfigError(
            f"num-clients={cfg.num_clients}, but the federation has {num} partitions: start "
            f"{cfg.num_clients} clients (simulation: flwr run . --federation-config "
            f'"num-supernodes={cfg.num_clients}"; deployment: {cfg.num_clients} SuperNodes with '
            f"--node-config 'partition-id=K num-partitions={cfg.num_clients}'), or run with "
            f"num-clients={num} (num-clients=0 takes whatever the federation has)"
        )
    return num


def _consistent(
    cfg: RunConfig, replies: list[tuple[int, int, int]]
) -> tuple[dict[int, int], int, list[tuple[int, str]]]:
    """Node id -> partition id of the nodes whose hello fits the federation, its size, and
    the nodes that do not fit with the reason: another num-partitions, or a partition
    another node claims too (which of them is right cannot be told)."""
    num = _federation_size(cfg, replies)
    claimed: dict[int, list[int]] = {}
    for node, pid, n in replies:
        if n == num:
            claimed.setdefault(pid, []).append(node)
    mapping: dict[int, int] = {}
    rejected: list[tuple[int, str]] = []
    for node, pid, n in replies:
        if n != num:
            rejected.append((node, f"num-partitions={n}, but the federation has {num} partitions"))
        elif len(claimed[pid]) > 1:
            rejected.append(
                (node, f"partition-id={pid} is claimed by nodes {sorted(claimed[pid])} too")
            )
        else:
            mapping[node] = pid
    return mapping, num, rejected


def handshake(grid: Grid, cfg: RunConfig) -> tuple[dict[int, int], ExchangeLog, int]:
    """Ask every node for its partition: node id -> partition id, once each in ``0..N-1``;
    the hello's log; the federation's size ``N``.

    The first replies tell the federation's size (a mismatch with ``num-clients`` stops
    here, at once). While partitions are missing (a deployment still starting), it waits
    up to ``NODE_WAIT_SECONDS`` for as many more nodes to connect and asks those. A node
    whose hello does not fit (another num-partitions, a partition claimed twice) is
    rejected and named, and gets no message of the run; the run goes on without it, and
    without partitions no node answered for, while at least ``min-clients`` nodes remain.
    """
    nodes = wait_for_nodes(grid, cfg.min_clients)
    replies, hello = _hello(grid, cfg, nodes, min(cfg.min_clients, len(nodes)))
    mapping, num, rejected = _consistent(cfg, replies)
    if len(mapping) < num:
        want = len(nodes) + num - len(mapping)
        try:
            now = wait_for_nodes(grid, want, key=f"num-partitions={num}")
        except TooFewNodes:  # those that came; enough of them or not is decided below
            now = sorted(grid.get_node_ids())
        asked = set(nodes)
        if new := [n for n in now if n not in asked]:
            more, again = _hello(grid, cfg, new, 0)
            hello.merge(again)
            replies += more
            mapping, num, rejected = _consistent(cfg, replies)
    for node, reason in rejected:
        hello.rejected.append(f"hello, node {node}: {reason}")
        hello.failed_nodes.append(node)
        log.warning("hello: rejected node %d: %s", node, reason)
    hello.replies = len(replies)
    missing = sorted(set(range(num)) - set(mapping.values()))
    shown = missing if len(missing) <= 20 else f"{len(missing)} partitions"
    if len(mapping) < cfg.min_clients:
        raise RuntimeError(
            f"only {len(mapping)} nodes answered the hello with a partition of num-partitions="
            f"{num} once each, min-clients={cfg.min_clients} needed (missing: {shown}; "
            f"failures: {hello.failures}; rejected: {hello.rejected})"
        )
    if missing:
        log.warning(
            "hello: no node answered for partitions %s of %d; the run goes on with %d clients "
            "(min-clients=%d): those shards are not trained",
            shown, num, len(mapping), cfg.min_clients,
        )  # fmt: skip
    return mapping, hello, num
