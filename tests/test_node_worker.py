"""The node worker: forwarded messages give the in-process replies and state, failures are
named, a killed worker is replaced, an idle one exits, and simulations never use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from lorm_flwr import wire
from lorm_flwr.client import node_worker
from lorm_flwr.client.handlers import HANDLERS
from lorm_flwr.config import RunConfig
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.registry import strategy_class
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.rounds import train_exchange
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


# ------------------------------------------------------------------ timeouts and frames
TIMEOUT_ENV = "LORM_FLWR_NODE_WORKER_TIMEOUT"  # spelt out: the tests also run against old code


def _bounded(call, seconds: float):
    """``call()`` in a thread; it must return within ``seconds`` (else the test fails
    instead of hanging), and its result or exception is this one's."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"did not return within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _wait_for(predicate, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_stopped_worker_does_not_hold_the_node_s_messages(workers, monkeypatch, caplog):
    """SIGSTOP a real worker: the next message waits for its heartbeat no longer than the
    timeout, then runs in process with a warning naming the worker; one seen stopped is
    not waited for; resumed, it drops the request its client gave up and serves again."""
    ctx = _context(901, 0)
    hello = Message(RecordDict(), dst_node_id=901, message_type="query.hello")
    expected = HANDLERS["hello"](hello, ctx).content
    node_worker.handle("hello", hello, ctx)
    (pid,) = _pids(workers).values()
    path = node_worker._worker_path(ctx)
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    stopped = getattr(node_worker, "_stopped", None)
    os.kill(pid, signal.SIGSTOP)
    try:
        # As for a worker whose process runs but whose interpreter is stuck: only the
        # heartbeat's absence tells.
        monkeypatch.setattr(node_worker, "_stopped", lambda path: False, raising=False)
        reply = _bounded(lambda: node_worker.handle("hello", hello, ctx), 60)
        assert reply.content == expected
        assert "running this message in process" in caplog.text
        assert f"PID {pid}, {path}" in caplog.text and "no sign of life for 2 s" in caplog.text
        monkeypatch.setattr(node_worker, "_stopped", stopped, raising=False)
        caplog.clear()
        reply = _bounded(lambda: node_worker.handle("hello", hello, ctx), 60)
        assert reply.content == expected
        assert f"the node worker (PID {pid}, {path}) is stopped" in caplog.text
    finally:
        os.kill(pid, signal.SIGCONT)
    caplog.clear()
    assert _bounded(lambda: node_worker.handle("hello", hello, ctx), 60).content == expected
    assert "running this message in process" not in caplog.text
    assert _pids(workers) == {path.stem: pid}  # the same worker, serving again
    log = path.with_suffix(".log")
    assert _wait_for(lambda: "left; dropped" in log.read_text())  # not handled after all


def test_a_listener_that_accepts_nothing_or_never_answers_is_bypassed(workers, monkeypatch, caplog):
    """A 'worker' whose accept queue stays full (connect timeout), then one that takes the
    request and stays silent (reply timeout): both messages run in process, with warnings."""
    monkeypatch.setattr(node_worker, "CONNECT_TIMEOUT", 1.0, raising=False)
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    ctx = _context(1001, 0)
    hello = Message(RecordDict(), dst_node_id=1001, message_type="query.hello")
    expected = HANDLERS["hello"](hello, ctx).content
    path = node_worker._worker_path(ctx)
    held: list[socket.socket] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(path))
        server.listen(0)
        while True:  # fill its accept queue
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            held.append(filler)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                break
        assert _bounded(lambda: node_worker.handle("hello", hello, ctx), 60).content == expected
        assert "accepted no connection within 1 s" in caplog.text
        server.close()
        path.unlink()
        caplog.clear()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(4)

        def take_and_stay_silent() -> None:
            conn, _ = server.accept()
            held.append(conn)

        threading.Thread(target=take_and_stay_silent, daemon=True).start()
        assert _bounded(lambda: node_worker.handle("hello", hello, ctx), 60).content == expected
        assert f"PID unknown, {path}" in caplog.text and "no sign of life for 2 s" in caplog.text
    finally:
        for conn in held:
            conn.close()
        server.close()
    assert not _pids(workers)  # nothing was started: a listener was there


SLOW_WORKER = """
import sys, time
from pathlib import Path
from flwr.app import ConfigRecord
from lorm_flwr.client.handlers import HANDLERS
from lorm_flwr.client.worker_server import serve

def slow_hello(msg, context):
    time.sleep(float(sys.argv[3]))
    reply = HANDLERS["hello"](msg, context)
    reply.content["by"] = ConfigRecord({"worker": 1})
    return reply

serve(Path(sys.argv[1]), int(sys.argv[2]), 120.0, 30.0, {"hello": slow_hello})
"""


def test_a_handler_longer_than_the_timeout_is_waited_for_thanks_to_the_heartbeat(
    workers, monkeypatch, caplog
):
    """A real worker whose hello takes 3 timeouts: its client hears its heartbeat all along
    and takes its answer (marked as the worker's), not an in-process one."""
    monkeypatch.setenv(TIMEOUT_ENV, "2")
    ctx = _context(1201, 0)
    hello = Message(RecordDict(), dst_node_id=1201, message_type="query.hello")
    path = node_worker._worker_path(ctx)
    with open(path.with_suffix(".log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_WORKER, str(path), str(os.getpid()), "6"],
            stdout=log, stderr=log, cwd=str(Path(__file__).resolve().parents[1]),
        )  # fmt: skip
    try:
        _wait_for(lambda: path.exists() or proc.poll() is not None, 120)
        assert path.exists(), path.with_suffix(".log").read_text()
        reply = _bounded(lambda: node_worker.handle("hello", hello, ctx), 120)
        assert dict(reply.content["by"]) == {"worker": 1}
        assert "running this message in process" not in caplog.text
    finally:
        proc.kill()
        proc.wait()


def test_a_peer_that_dribbles_its_request_is_cut_off_at_one_deadline(workers, monkeypatch):
    """A local peer that sends a byte every 0.2 s (each recv would be quick) is cut off when
    the whole request's deadline passes, and the worker serves the next message."""
    monkeypatch.setattr(node_worker, "REQUEST_SECONDS", 1.0)  # the worker started gets it
    ctx = _context(1101, 0)
    hello = Message(RecordDict(), dst_node_id=1101, message_type="query.hello")
    node_worker.handle("hello", hello, ctx)
    (pid,) = _pids(workers).values()
    path = node_worker._worker_path(ctx)
    cut = False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.connect(str(path))
        peer.sendall(struct.pack(">Q", 60))  # a kind of 60 bytes: 12 s at this pace
        start = time.monotonic()
        while not cut and time.monotonic() - start < 10:
            time.sleep(0.2)
            try:
                peer.sendall(b"k")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
    assert cut
    assert node_worker.handle("hello", hello, ctx).content == HANDLERS["hello"](hello, ctx).content
    assert _pids(workers) == {path.stem: pid}
    assert "not whole within 1 s" in path.with_suffix(".log").read_text()


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_a_huge_claimed_length_allocates_nothing_and_the_worker_keeps_serving(workers):
    """A frame that claims 1 GiB and brings 1 KB: the worker's peak memory does not grow by
    anything like the claim (it allocates what arrives), and it serves the next message."""
    ctx = _context(1301, 0)
    hello = Message(RecordDict(), dst_node_id=1301, message_type="query.hello")
    node_worker.handle("hello", hello, ctx)
    (pid,) = _pids(workers).values()
    path = node_worker._worker_path(ctx)
    before = _peak_rss(pid)
    claim = 2**30
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as peer:
        peer.connect(str(path))
        peer.sendall(struct.pack(">Q", 5) + b"hello" + struct.pack(">Q", claim) + b"x" * 1000)
        peer.shutdown(socket.SHUT_WR)  # the frame ends here, 1 GiB short
        peer.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            while peer.recv(4096):  # until the worker closes this connection
                pass
    assert _wait_for(lambda: "mid-message" in path.with_suffix(".log").read_text())
    assert node_worker.handle("hello", hello, ctx).content == HANDLERS["hello"](hello, ctx).content
    assert _peak_rss(pid) - before < claim // 8
    assert _pids(workers) == {path.stem: pid}


class _Trickle:
    """A socket that hands out ``data`` ``step`` bytes per ``recv_into`` and records the
    largest buffer it was given to fill."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.at, self.largest = data, step, 0, 0

    def settimeout(self, _seconds: float) -> None:
        pass

    def recv_into(self, view: memoryview, nbytes: int) -> int:
        self.largest = max(self.largest, len(view.obj))
        k = min(self.step, nbytes, len(view), len(self.data) - self.at)
        view[:k] = self.data[self.at : self.at + k]
        self.at += k
        return k


def test_the_frame_reader_grows_with_what_arrives_and_keeps_one_deadline():
    from lorm_flwr.client import worker_framing as frames

    far = time.monotonic() + 3600
    payload = os.urandom(5 * 2**20 + 7)
    trickle = _Trickle(struct.pack(">Q", len(payload)) + payload, 64 * 1024)
    assert frames.recv_frame(trickle, far) == payload
    claimed = _Trickle(struct.pack(">Q", 2**30) + b"z" * 3 * 2**20, 64 * 1024)
    with pytest.raises(EOFError, match="mid-message"):  # 3 MiB came of the 1 GiB claimed
        frames.recv_frame(claimed, far)
    assert claimed.largest <= 2 * 3 * 2**20 + frames.CHUNK
    over = _Trickle(struct.pack(">Q", 65) + b"k" * 65, 64)
    with pytest.raises(frames.FrameError, match="not this protocol"):
        frames.recv_frame(over, far, max_frame=64)
    assert over.at == 8  # refused from its header: none of its bytes was read
    a, b = socket.socketpair()
    with a, b:

        def dribble() -> None:
            with contextlib.suppress(OSError):
                a.sendall(struct.pack(">Q", 50))
                for _ in range(50):
                    time.sleep(0.1)
                    a.sendall(b"d")

        threading.Thread(target=dribble, daemon=True).start()
        with pytest.raises(TimeoutError):  # one deadline for the frame, not one per recv
            _bounded(lambda: frames.recv_frame(b, time.monotonic() + 1.0), 30)


def test_the_reply_timeout_is_read_from_the_environment(monkeypatch, caplog):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert node_worker._reply_timeout() == node_worker.DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "900")
    assert node_worker._reply_timeout() == 900.0
    monkeypatch.setenv(TIMEOUT_ENV, "0.1")  # raised to a few heartbeats
    assert node_worker._reply_timeout() == 4 * node_worker.HEARTBEAT
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    assert node_worker._reply_timeout() == node_worker.DEFAULT_TIMEOUT
    assert TIMEOUT_ENV in caplog.text
