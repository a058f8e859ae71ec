"""Server reliability without a federation: round retries, timeouts, checkpoints, size limits."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, RecordDict

from lorm_flwr import wire
from lorm_flwr.config import RunConfig
from lorm_flwr.math.cross_task import TaskHistory
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.models.layout import HeadLayer, ModelLayout, group_of
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    capture_rng,
    config_changes,
    load_checkpoint,
    restore_rng,
    resume_point,
    save_checkpoint,
)
from lorm_flwr.server.exchange import PULL_WINDOW, ExchangeFailed, _Collect, exchange
from lorm_flwr.server.rounds import train_exchange
from lorm_flwr.server.strategies.fedit import FedIT
from lorm_flwr.server.strategies.lorm import LoRM
from lorm_flwr.wire.limits import (
    MessageTooLarge,
    check_message_sizes,
    check_reply_size,
    max_message_bytes,
    message_shapes,
    nbytes,
)
from lorm_flwr.wire.packing import unpack_content
from tests.checkpoints import small_config, valid_checkpoint
from tests.messages import ScriptedGrid, train_content

SHAPES = {"l.lora_A.weight": (2, 3), "l.lora_B.weight": (4, 2), "linear_head.weight": (5, 4),
          "linear_head.bias": (5,)}  # fmt: skip


def _ok(m):
    node = m.metadata.dst_node_id
    return train_content({k: torch.full(v, float(node)) for k, v in SHAPES.items()}, 10)


def _fedit(**cfg):
    layout = ModelLayout(
        (), (HeadLayer("linear_head", "linear_head.weight", "linear_head.bias"),), SHAPES
    )
    return FedIT(RunConfig(**cfg), layout)


def _round(strategy, grid):
    return train_exchange(grid, strategy, {k: torch.zeros(v) for k, v in SHAPES.items()}, 0)


def test_a_round_with_too_few_replies_is_sent_again_and_then_merged():
    strategy = _fedit(min_clients=2, round_retries=2)
    grid = ScriptedGrid([1, 2, 3], [{1: "error", 2: "silent", 3: _ok}, {1: _ok, 2: _ok, 3: _ok}])
    _, merged, log, _ = _round(strategy, grid)
    assert grid.calls == 2
    assert log.attempts == 2 and log.replies == 3
    assert any(f.startswith("train, node 1") and "crashed" in f for f in log.failures)
    assert any("node 2" in f and "timeout" in f for f in log.failures)
    assert log.timeouts == [2]
    # both attempts, counted as built (the grid got them packed: one array per record)
    assert all(set(m.content[wire.ARRAYS].keys()) == {wire.PACKED} for m in grid.sent[0])
    assert log.bytes_down == 2 * sum(
        wire.record_bytes(unpack_content(m.content)) for m in grid.sent[0]
    )
    torch.testing.assert_close(
        merged.tensors["l.lora_A.weight"], torch.full((2, 3), 2.0)
    )  # mean of 1, 2, 3


def test_the_round_gives_up_after_the_retries_with_a_clear_error():
    strategy = _fedit(min_clients=2, round_retries=1)
    grid = ScriptedGrid([1, 2], [{1: _ok, 2: "error"}])
    with pytest.raises(
        ExchangeFailed, match=r"only 1 valid replies, 2 needed.*after 2 attempts"
    ) as info:
        _round(strategy, grid)
    assert grid.calls == 2 and info.value.log.attempts == 2
    assert [f.split(":")[0] for f in info.value.log.failures] == ["train, node 2", "attempt 2"]


def test_silent_nodes_are_counted_as_timeouts_and_the_rest_is_merged():
    strategy = _fedit(min_clients=2, round_retries=0)
    grid = ScriptedGrid([1, 2, 3], [{1: _ok, 2: _ok, 3: "silent"}])
    _, _, log, _ = _round(strategy, grid)
    assert log.timeouts == [3] and log.replies == 2 and log.attempts == 1


def test_an_exception_inside_decode_is_a_rejection_never_a_crash():
    grid = ScriptedGrid([1, 2], [{1: _ok, 2: _ok}])

    def decode(msg):
        if msg.metadata.src_node_id == 2:
            raise ZeroDivisionError("boom")
        return msg.metadata.src_node_id

    def messages():
        return [Message(RecordDict(), dst_node_id=n, message_type="query.x") for n in (1, 2)]

    values, log = exchange(grid, messages, decode, kind="q", min_replies=1, retries=0, timeout=1)
    assert values == [1] and log.rejected == ["q, node 2: boom"]


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    rng = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(2, dtype=torch.float64)}
    ckpt = Checkpoint(
        config=RunConfig().to_dict(), task=1, round_in_task=1, tensors=tensors,
        strategy={"task": 1, "rounds": [{"failures": [], "train_loss": float("nan")}]},
        recorder={"accuracy_matrix": [[0.9, None]], "rounds": []}, rng=rng, elapsed_seconds=12.5,
    )  # fmt: skip
    path = save_checkpoint(tmp_path, ckpt)
    assert path.name == CHECKPOINT_FILE and not list(tmp_path.glob("*.tmp"))
    back = load_checkpoint(tmp_path)  # the run folder is enough
    assert (back.task, back.round_in_task, back.elapsed_seconds) == (1, 1, 12.5)
    assert back.recorder["accuracy_matrix"] == [[0.9, None]]
    for k, t in tensors.items():
        assert torch.equal(back.tensors[k], t) and back.tensors[k].dtype == t.dtype
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng(back.rng)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_refuses_changed_keys_that_change_results():
    saved = RunConfig().to_dict()
    assert (
        config_changes(saved, RunConfig(output_dir="/elsewhere", round_retries=5).to_dict()) == []
    )
    changes = config_changes(saved, RunConfig(lr=0.01, seed=4).to_dict())
    assert changes == ["lr: 0.001 -> 0.01", "seed: 0 -> 4"]


def test_lorm_state_survives_a_checkpoint(tmp_path):
    cfg = RunConfig(dataset="digits", backbone="vit-tiny", image_size=16, lora_rank=2)
    layout = model_layout(model_of(cfg))
    strategy = LoRM(cfg, layout)
    for name in strategy.history:
        strategy.history[name] = TaskHistory(
            scaled_bs=[torch.randn(4, 2, dtype=torch.float64)],
            gram_total=torch.randn(3, 3, dtype=torch.float64),
        )
    ckpt = Checkpoint(config={}, task=0, round_in_task=0, tensors={}, strategy=strategy.state_dict(),
                      recorder={}, rng=capture_rng(), elapsed_seconds=0.0)  # fmt: skip
    save_checkpoint(tmp_path, ckpt)
    again = LoRM(cfg, layout)
    again.load_state_dict(load_checkpoint(tmp_path).strategy)
    for name, h in strategy.history.items():
        assert torch.equal(again.history[name].scaled_bs[0], h.scaled_bs[0])
        assert torch.equal(again.history[name].gram_total, h.gram_total)


# --------------------------------------------------------------------- limits
def _tiny(**overrides):
    cfg = RunConfig(dataset="digits", backbone="vit-tiny", image_size=16, lora_rank=2, **overrides)
    return cfg, LoRM(cfg, model_layout(model_of(cfg)))


def test_message_sizes_are_known_before_sending():
    cfg, strategy = _tiny()
    shapes = message_shapes(strategy)
    sent = {
        k: v for k, v in initial_tensors(cfg).items() if group_of(k) not in strategy.local_groups
    }
    record = RecordDict({wire.ARRAYS: wire.tensors_to_arrays(sent)})
    assert nbytes(shapes["round 0 down"]) == wire.record_bytes(record)
    sizes = check_message_sizes(strategy, max_message_bytes(cfg))
    assert sizes["round 1 up"] > sizes["round 0 up"]  # A-rounds send full Grams


def test_a_message_over_the_limit_names_the_tensor_and_the_remedy():
    cfg, strategy = _tiny(max_message_mb=0.05)
    with pytest.raises(
        MessageTooLarge, match=r"'round 1 up'.*largest tensor is grams/.*\|G.*gram-alpha=0"
    ):
        check_message_sizes(strategy, max_message_bytes(cfg))
    cfg, strategy = _tiny(max_message_mb=0.05, gram_alpha=0.0, head_gram_alpha=0.0)
    check_message_sizes(strategy, max_message_bytes(cfg))  # diagonals fit
    with pytest.raises(MessageTooLarge, match="lower lora-rank"):
        check_reply_size(
            RecordDict(
                {wire.ARRAYS: wire.tensors_to_arrays({"x.lora_A.weight": torch.zeros(1000, 100)})}
            ),
            cfg,
        )


def test_the_server_refuses_a_resume_it_cannot_honour_before_any_work(tmp_path):
    from lorm_flwr.config import ConfigError

    with pytest.raises(ConfigError, match="no checkpoint"):
        resume_point(small_config(resume_from=str(tmp_path)))
    saved = small_config(lr=0.002)
    save_checkpoint(tmp_path, valid_checkpoint(saved, task=0, round_in_task=1))
    with pytest.raises(ConfigError, match=r"lr: 0\.002 -> 0\.001"):
        resume_point(small_config(resume_from=str(tmp_path)))
    ok = resume_point(small_config(lr=0.002, resume_from=str(tmp_path), output_dir="/other"))
    assert ok.round_in_task == 1


def test_an_output_dir_that_cannot_be_written_stops_before_any_work(tmp_path):
    from lorm_flwr.config import ConfigError
    from lorm_flwr.server.results import check_output_dir

    check_output_dir(RunConfig(output_dir=str(tmp_path / "new" / "runs")))  # created
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(
        ConfigError, match=r"output-dir='.*a-file/runs' cannot hold the run's outputs"
    ):
        check_output_dir(RunConfig(output_dir=str(blocker / "runs")))
    with pytest.raises(ConfigError, match=r"output-dir='/proc/x'"):
        check_output_dir(RunConfig(output_dir="/proc/x"))


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a checkpoint", "empty"])
def test_a_damaged_checkpoint_names_resume_from_and_what_is_wrong(tmp_path, damage):
    save_checkpoint(tmp_path, Checkpoint(config=RunConfig().to_dict(), task=0, round_in_task=1,
                                         tensors={"a": torch.ones(100)}, strategy={}, recorder={},
                                         rng=capture_rng(), elapsed_seconds=0.0))  # fmt: skip
    path = tmp_path / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flipped byte":  # one byte of the stored state: only the checksum can tell
        outer = torch.load(path, weights_only=True)
        state = outer["state"].clone()  # the wrapped state's bytes, a uint8 tensor
        state[len(state) // 2] ^= 0x01
        torch.save({**outer, "state": state}, path)
    elif damage == "not a checkpoint":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(b"")
    from lorm_flwr.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"resume-from=.*damaged or not a lorm-flwr checkpoint"
    ) as info:
        resume_point(RunConfig(resume_from=str(tmp_path)))
    if damage == "flipped byte":
        assert "checksum does not match" in str(info.value)


def test_a_format_3_checkpoint_pickled_bytes_still_loads(tmp_path):
    # Format 3 kept the wrapped state as pickled bytes; format 4 as a uint8 tensor.
    import hashlib
    import io

    from lorm_flwr.server.checkpoint import load_checkpoint

    fields = {"config": RunConfig().to_dict(), "task": 1, "round_in_task": 0,
              "tensors": {"a": torch.arange(5.0)}, "strategy": {}, "recorder": {},
              "rng": capture_rng(), "elapsed_seconds": 2.5, "version": 3}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(fields, buffer)
    payload = buffer.getvalue()
    torch.save({"version": 3, "sha256": hashlib.sha256(payload).hexdigest(), "state": payload},
               tmp_path / CHECKPOINT_FILE)  # fmt: skip
    back = load_checkpoint(tmp_path)
    assert back.version == 3 and back.task == 1 and back.elapsed_seconds == 2.5
    assert torch.equal(back.tensors["a"], torch.arange(5.0))


# ------------------------------------------------------- streaming exchange
@pytest.mark.parametrize("arrival", ["reversed", "in-order"])
def test_replies_reach_the_fold_in_partition_order_whatever_the_arrival(arrival):
    nodes = list(range(1, 11))
    script = {n: _ok for n in nodes}
    script[4] = "error"
    script[7] = "silent"
    grid = ScriptedGrid(nodes, [script], arrival=arrival)

    def messages():
        return [Message(RecordDict(), dst_node_id=n, message_type="query.x") for n in nodes[::-1]]

    order = {n: 10 - n for n in nodes}.__getitem__  # partition order: node 10 first
    seen, log = exchange(grid, messages, lambda m: m.metadata.src_node_id, kind="q",
                         min_replies=1, retries=0, timeout=5, order=order, fold=_Collect)  # fmt: skip
    assert seen == [10, 9, 8, 6, 5, 3, 2, 1]  # node 7 timed out, node 4 failed
    assert log.timeouts == [7] and log.replies == 8
    # Only a window of replies is ever pulled: fewer than that wait for an earlier node
    # (here 6 and 5, behind the silent node 7).
    assert log.held_max == 2 < PULL_WINDOW
    del script[7]
    grid = ScriptedGrid(nodes, [{**script, 7: _ok}], arrival=arrival)
    seen, log = exchange(grid, messages, lambda m: m.metadata.src_node_id, kind="q",
                         min_replies=1, retries=0, timeout=5, order=order, fold=_Collect)  # fmt: skip
    assert seen == [10, 9, 8, 7, 6, 5, 3, 2, 1]
    assert log.held_max == (0 if arrival == "in-order" else PULL_WINDOW - 1)


def test_gathered_sums_are_the_ordered_fp64_sums_and_drop_the_grams():
    from lorm_flwr import wire
    from lorm_flwr.server.strategies.base import Gathered

    gen = torch.Generator().manual_seed(0)
    grams = [torch.randn(5, 5, generator=gen) for _ in range(4)]
    gathered = Gathered()
    for i, g in enumerate(grams):
        gathered.add(wire.Reply(node=i, grams={"l|G": g}, metrics={wire.NUM_EXAMPLES: 1}))
    expected = grams[0].double()
    for g in grams[1:]:
        expected = expected + g.double()
    assert torch.equal(gathered.total("l|G"), expected)  # the same additions, the same order
    assert all(r.grams == {} for r in gathered) and len(gathered) == 4


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_server_pins_glibc_mmap_threshold():
    # In a process of its own: this one goes on running client code.
    code = "from lorm_flwr.runtime import keep_server_heap_flat as k; assert k() is True"
    subprocess.run([sys.executable, "-c", code], check=True)


def _huge_pages_always() -> bool:
    """Transparent huge pages for every allocation: a fault then maps 2 MiB, not a page."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE"):
        return True
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


# The pages of the 68 MiB of activations the heap tests allocate, on this machine.
_PAGES = (24 + 20 + 16 + 8) * 2**20 // os.sysconf("SC_PAGE_SIZE")
_COUNTS_FAULTS = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or _huge_pages_always(),
    reason="mallopt is glibc's; page faults count pages only without huge pages",
)


_REFAULTS = """
import resource, sys, torch
from lorm_flwr.runtime import keep_client_heap_warm
warm = sys.argv[1] == "warm" and keep_client_heap_warm()
faults = []
for _ in range(2):  # a pass: activations of a few sizes alive together, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = [torch.ones(n << 18) for n in (24, 20, 16, 8)]  # MiB
    del live
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(warm, faults[1])  # the second pass
"""


@_COUNTS_FAULTS
def test_a_client_reuses_freed_activation_memory_without_page_faults():
    # 68 MiB of activations, freed and asked for again pass after pass: glibc's defaults
    # give the memory back and fault in all its pages anew on the next pass; a client's
    # heap keeps it (only the allocator changes, so every result stays the same).
    runs = {}
    for mode in ("default", "warm"):
        out = subprocess.run(
            [sys.executable, "-c", _REFAULTS, mode], capture_output=True, text=True, check=True
        )
        warm, faults = out.stdout.split()
        runs[mode] = (warm == "True", int(faults))
    assert runs["warm"][0] is True and runs["default"][0] is False
    assert runs["default"][1] > 0.85 * _PAGES  # every page, again
    assert runs["warm"][1] < runs["default"][1] / 4


_SERVER_EVALUATION = """
import os, resource, torch
from lorm_flwr.runtime import keep_server_heap_flat, warm_heap

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def second_pass_faults():
    faults = []
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        live = [torch.ones(n << 18) for n in (24, 20, 16, 8)]  # MiB
        del live
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults[1]

assert keep_server_heap_flat()
flat = second_pass_faults()
before = resident_mib()
with warm_heap():
    warm = second_pass_faults()
    held = resident_mib() - before
print(flat, warm, held, resident_mib() - before)
"""


@_COUNTS_FAULTS
def test_the_server_heap_is_warm_only_while_it_evaluates():
    # The flat heap faults every page in anew; within warm_heap (evaluation) freed pages
    # are reused, so the heap holds them; after it, they go back to the system.
    out = subprocess.run(
        [sys.executable, "-c", _SERVER_EVALUATION], capture_output=True, text=True, check=True
    )
    flat, warm, held, kept = map(float, out.stdout.split())
    assert flat > 0.85 * _PAGES and warm < flat / 4
    assert held > 50  # MiB: the 68 MiB of freed activations, kept for reuse
    assert kept < 10  # ... and returned at the block's end


class _RefusingGrid(ScriptedGrid):
    """A SuperLink that refuses some pushes ("" ids, as Flower's runtime does, or a short
    list) and answers a refused id's pull with a fresh error message every time."""

    def __init__(self, nodes, script, refuse=(), short=False):
        super().__init__(nodes, script)
        self.refuse, self.short, self.pulls = set(refuse), short, 0

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if self.short:
            return []
        return ["" if m.metadata.dst_node_id in self.refuse else i for m, i in zip(messages, ids)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if "" in message_ids:  # Flower: "message unavailable", from the SuperLink, reply_to ""
            return [Message(Error(code=0, reason="message unavailable"), reply_to=Message(
                RecordDict(), dst_node_id=1, message_type="query.x"))]  # fmt: skip
        return super().pull_messages(message_ids)


@pytest.mark.parametrize("short", [False, True])
def test_refused_pushes_are_named_and_never_hang_the_exchange(short):
    nodes = [1, 2, 3, 4]
    grid = _RefusingGrid(nodes, [{n: _ok for n in nodes}], refuse={2, 3}, short=short)

    def messages():
        return [Message(RecordDict(), dst_node_id=n, message_type="query.x") for n in nodes]

    if short:  # nothing can be matched to a node: every message counts as not sent
        with pytest.raises(ExchangeFailed, match="only 0 valid replies"):
            exchange(grid, messages, lambda m: m.metadata.src_node_id, kind="q",
                     min_replies=1, retries=0, timeout=5)  # fmt: skip
        return
    values, log = exchange(grid, messages, lambda m: m.metadata.src_node_id, kind="q",
                           min_replies=1, retries=0, timeout=5)  # fmt: skip
    assert values == [1, 4]
    assert log.failures == ["q, node 2: could not be sent", "q, node 3: could not be sent"]
    assert grid.pulls < 20


def test_pulls_that_never_resolve_a_node_end_at_the_timeout():
    class Chatty(ScriptedGrid):
        def pull_messages(self, message_ids):  # always something, never ours
            return [Message(RecordDict(), reply_to=Message(RecordDict(), dst_node_id=9,
                                                           message_type="query.x"))]  # fmt: skip

    grid = Chatty([1], [{1: _ok}])

    def messages():
        return [Message(RecordDict(), dst_node_id=1, message_type="query.x")]

    with pytest.raises(ExchangeFailed, match="no reply"):
        exchange(grid, messages, lambda m: 1, kind="q", min_replies=1, retries=0, timeout=3)
    assert grid.now >= 3  # it slept (fake clock) instead of spinning
