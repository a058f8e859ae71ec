"""The node worker: forwarded messages give the in-process replies and state, failures are
named, a killed worker is replaced, an idle one exits, and simulations never use it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from lorm_flwr import node_worker, wire
from lorm_flwr.client_handlers import HANDLERS
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.rounds import train_exchange
from lorm_flwr.runtime import initial_tensors, model_of
from tests.messages import ScriptedGrid

RUN = {
    "dataset": "digits", "backbone": "vit-tiny", "num-tasks": 2, "local-epochs": 1,
    "image-size": 16, "lora-rank": 2, "lora-alpha": 2.0, "batch-size": 64,
    "strategy": "fedsa", "min-clients": 2,
}  # fmt: skip


def _context(node_id: int, partition: int, n: int = 2) -> Context:
    return Context(
        run_id=1, node_id=node_id, node_config={"partition-id": partition, "num-partitions": n},
        state=RecordDict(), run_config=RUN,
    )  # fmt: skip


@pytest.fixture
def workers(monkeypatch):
    """Worker mode on, sockets in a fresh short folder; every worker started is stopped by PID."""
    folder = tempfile.mkdtemp(prefix="lfr-nw-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", folder)
    monkeypatch.setattr(node_worker, "enabled", lambda: True)
    monkeypatch.setenv(node_worker.IDLE_ENV, "120")
    yield Path(folder) / f"lorm-flwr-{os.getuid()}"
    for pid_file in Path(folder).rglob("*.pid"):
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _pids(folder: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in folder.glob("*.pid")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of this process stays a zombie until reaped: not alive either.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_enabled_only_when_asked_and_never_in_a_ray_actor(monkeypatch):
    monkeypatch.delenv(node_worker.ENV, raising=False)
    assert not node_worker.enabled()
    monkeypatch.setenv(node_worker.ENV, "1")
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert node_worker.enabled()
    monkeypatch.setitem(sys.modules, "ray", object())  # a simulation's long-lived actor
    assert not node_worker.enabled()


def test_forwarded_rounds_equal_in_process_ones_with_the_local_state(workers):
    """FedSA, 2 clients x 2 rounds: the worker's replies and each node's kept B and head are
    bit-for-bit those of the same handlers run in this process."""
    cfg = RunConfig.from_mapping(RUN)
    strategy = strategy_class("fedsa")(cfg, model_layout(model_of(cfg)))
    remote = [_context(101, 0), _context(102, 1)]
    local = [_context(201, 0), _context(202, 1)]
    glob = strategy.begin_task(0, dict(initial_tensors(cfg)))

    def both(k: int):
        def reply(msg: Message) -> RecordDict:
            mine = HANDLERS["train"](msg, local[k]).content
            theirs = node_worker.handle("train", msg, remote[k]).content
            assert list(mine[wire.ARRAYS].keys()) == [wire.PACKED]  # replies leave packed
            a, b = (
                wire.arrays_to_tensors(mine[wire.ARRAYS]),
                wire.arrays_to_tensors(theirs[wire.ARRAYS]),
            )
            assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
            assert dict(mine["metrics"])["train-loss"] == dict(theirs["metrics"])["train-loss"]
            return theirs

        return reply

    for round_in_task in (0, 1):
        script = {c.node_id: both(k) for k, c in enumerate(remote)}
        grid = ScriptedGrid(sorted(script), [script])
        _, merged, _, _ = train_exchange(grid, strategy, glob, round_in_task)
        glob = merged.tensors
        for mine, theirs in zip(local, remote, strict=True):
            a = wire.arrays_to_tensors(mine.state[wire.LOCAL_STATE])
            b = wire.arrays_to_tensors(theirs.state[wire.LOCAL_STATE])
            assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
    assert len(_pids(workers)) == 2  # one worker per node


def test_a_failing_handler_is_named_and_a_killed_worker_is_replaced(workers):
    ctx = _context(301, 0)
    hello = Message(RecordDict(), dst_node_id=301, message_type="query.hello")
    assert node_worker.handle("hello", hello, ctx).content == HANDLERS["hello"](hello, ctx).content
    (first,) = _pids(workers).values()
    with pytest.raises(node_worker.NodeWorkerError, match="KeyError"):
        node_worker.handle(
            "train", Message(RecordDict(), dst_node_id=301, message_type="train"), ctx
        )
    assert _alive(first)  # a handler's exception does not end the worker
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(first) and time.monotonic() < deadline:
        time.sleep(0.1)
    node_worker.handle("hello", hello, ctx)  # a new worker answers
    (second,) = _pids(workers).values()
    assert second != first and _alive(second)


def test_an_idle_worker_exits_and_removes_its_socket(workers, monkeypatch):
    monkeypatch.setenv(node_worker.IDLE_ENV, "1")
    ctx = _context(401, 1)
    hello = Message(RecordDict(), dst_node_id=401, message_type="query.hello")
    node_worker.handle("hello", hello, ctx)
    (pid,) = _pids(workers).values()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert not list(workers.glob("*.sock")) and not _pids(workers)


def test_a_worker_that_hangs_up_before_answering_is_retried_then_bypassed(workers, caplog):
    """A 'worker' that takes each connection and closes it (as one that was exiting or died
    would): the message is offered twice, then handled in this process, with a warning."""
    ctx = _context(501, 0)
    hello = Message(RecordDict(), dst_node_id=501, message_type="query.hello")
    path = node_worker._worker_path(ctx)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    taken = []

    def hang_up() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            taken.append(conn.recv(8))
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        reply = node_worker.handle("hello", hello, ctx)
    finally:
        thread.join(timeout=10)
        server.close()
    assert len(taken) == 2  # offered twice
    assert reply.content == HANDLERS["hello"](hello, ctx).content
    assert "running this message in process" in caplog.text
    assert not _pids(workers)  # nothing was started: a listener was there


def test_a_socket_folder_that_is_not_private_is_never_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(node_worker, "enabled", lambda: True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / f"lorm-flwr-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    ctx = _context(601, 0)
    hello = Message(RecordDict(), dst_node_id=601, message_type="query.hello")
    assert node_worker.handle("hello", hello, ctx).content == HANDLERS["hello"](hello, ctx).content
    assert "not a folder private to this user" in caplog.text
    assert not list((tmp_path / "elsewhere").iterdir())


def test_a_worker_that_fails_to_start_is_not_retried_on_every_message(workers, monkeypatch, caplog):
    ctx = _context(701, 0)
    hello = Message(RecordDict(), dst_node_id=701, message_type="query.hello")
    starts = []

    def fail(path):
        starts.append(path)
        raise node_worker._Unavailable("the node worker exited with code 1 while starting")

    monkeypatch.setattr(node_worker, "_start_worker", fail)
    for _ in range(3):  # every message is still answered, in process
        reply = node_worker.handle("hello", hello, ctx)
        assert reply.content == HANDLERS["hello"](hello, ctx).content
    assert len(starts) == 1  # one failed start, then the back-off
    assert "failed to start" in caplog.text
    monkeypatch.setattr(node_worker, "RETRY_START_AFTER", 0.0)  # the back-off has passed
    node_worker.handle("hello", hello, ctx)
    assert len(starts) == 2


def test_malformed_requests_are_refused_and_the_worker_keeps_serving(workers):
    ctx = _context(801, 0)
    hello = Message(RecordDict(), dst_node_id=801, message_type="query.hello")
    node_worker.handle("hello", hello, ctx)
    (pid,) = _pids(workers).values()
    path = node_worker._worker_path(ctx)
    frames = [
        b"garbage!!",  # read as an absurd frame length: refused, nothing allocated
        struct.pack(">Q", 8 * 2**30),  # 8 GiB announced: over MAX_FRAME
        struct.pack(">Q", 5) + b"train" + struct.pack(">Q", 4) + b"\xff\xff\xff\xff",
    ]
    answers = []
    for payload in frames:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(30)
            try:
                answers.append(s.recv(4096))
            except ConnectionResetError:
                answers.append(b"")
    assert b"DecodeError" in answers[2]  # a request that decodes badly is answered, named
    assert node_worker.handle("hello", hello, ctx).content == HANDLERS["hello"](hello, ctx).content
    assert _pids(workers) == {path.stem: pid}  # the same worker, still serving
    log = path.with_suffix(".log").read_text()
    assert "not this protocol" in log and "MemoryError" not in log


def test_a_long_worker_log_is_moved_aside_when_the_next_worker_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(node_worker, "LOG_BYTES", 100)
    log = tmp_path / "w.log"
    log.write_bytes(b"x" * 50)
    with node_worker._open_log(log) as f:  # small: appended to
        f.write(b"y")
    assert log.read_bytes() == b"x" * 50 + b"y" and not (tmp_path / "w.log.1").exists()
    log.write_bytes(b"old" * 100)
    (tmp_path / "w.log.1").write_bytes(b"older")
    with node_worker._open_log(log) as f:  # too long: moved aside, the one before dropped
        f.write(b"new")
    assert log.read_bytes() == b"new"
    assert (tmp_path / "w.log.1").read_bytes() == b"old" * 100
