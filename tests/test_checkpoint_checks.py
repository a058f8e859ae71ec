"""A checkpoint is checked like a reply before a resume uses any of it.

Its SHA-256 sits in the same file, so an edited checkpoint carries a valid one: each
test here edits a valid checkpoint and saves it again with ``save_checkpoint`` (a new,
matching checksum), so only the field checks of ``resume_point`` can catch it. No
federation runs: everything happens before the hello.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict

import pytest
import torch

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.server.checkpoint import (
    CHECKPOINT_FILE,
    FORMAT_VERSION,
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from lorm_flwr.server.checkpoint_checks import CheckpointError
from lorm_flwr.server.run import run_federated
from tests.checkpoints import small_config, valid_checkpoint

CFG = small_config()  # LoRM, 5 tasks of 2 rounds
TASK, ROUND = 1, 1  # the edited checkpoint: one task done, one round of task 1


def _key(c: Checkpoint, fragment: str) -> str:
    return next(k for k in sorted(c.tensors) if fragment in k)


def _layer(c: Checkpoint) -> str:
    return min(c.strategy["history"])


def _set_tensor(c: Checkpoint, key: str, value: torch.Tensor) -> None:
    c.tensors = {**c.tensors, key: value}  # never the cached tensors themselves


def _nan(c: Checkpoint) -> str:
    key = _key(c, ".lora_A.")
    t = c.tensors[key].clone()
    t.view(-1)[0] = float("nan")
    _set_tensor(c, key, t)
    return rf"tensors\['{re.escape(key)}'\] holds NaN or infinite values"


def _inf(c: Checkpoint) -> str:
    key = _key(c, "linear_head.weight")
    t = c.tensors[key].clone()
    t.view(-1)[-1] = float("inf")
    _set_tensor(c, key, t)
    return rf"tensors\['{re.escape(key)}'\] holds NaN or infinite values"


def _wrong_shape(c: Checkpoint) -> str:
    key = _key(c, ".lora_B.")
    shape = tuple(c.tensors[key].shape)
    _set_tensor(c, key, torch.zeros(shape[0], shape[1] + 1, *shape[2:]))
    return rf"tensors\['{re.escape(key)}'\] has shape \(.*\); this run's is"


def _wrong_dtype(c: Checkpoint) -> str:
    key = _key(c, ".lora_A.")
    _set_tensor(c, key, c.tensors[key].double())
    return rf"tensors\['{re.escape(key)}'\] has dtype torch.float64; this run's is torch.float32"


def _extra(c: Checkpoint) -> str:
    _set_tensor(c, "backbone.extra.lora_A.weight", torch.zeros(2, 2))
    return r"tensors does not hold the expected keys: unexpected 'backbone.extra.lora_A.weight'"


def _missing(c: Checkpoint) -> str:
    key = _key(c, ".lora_B.")
    c.tensors = {k: v for k, v in c.tensors.items() if k != key}
    return rf"tensors does not hold the expected keys: missing {re.escape(key)}"


def _sparse(c: Checkpoint) -> str:
    key = _key(c, "linear_head.bias")
    _set_tensor(c, key, c.tensors[key].to_sparse())
    return rf"tensors\['{re.escape(key)}'\] is a Tensor, not a dense tensor"


def _history(c: Checkpoint) -> dict:
    return c.strategy["history"][_layer(c)]


def _history_count(c: Checkpoint) -> str:
    h = _history(c)
    h["scaled_bs"] = [*h["scaled_bs"], h["scaled_bs"][0].clone()]
    return (
        rf"strategy\['history'\]\['{re.escape(_layer(c))}'\]\['scaled_bs'\] is not a list "
        r"of 1 tensors \(one per task done\)"
    )


def _history_shape(c: Checkpoint) -> str:
    h = _history(c)
    h["a_mats"] = [h["a_mats"][0].T.contiguous()]
    return r"\['a_mats'\]\[0\] has shape \(\d+, 2\); this run's is \(2, \d+\)"


def _history_nan(c: Checkpoint) -> str:
    h = _history(c)
    t = h["a_grams"][0].clone()
    t[0, 0] = float("nan")
    h["a_grams"] = [t]
    return r"\['a_grams'\]\[0\] holds NaN or infinite values"


def _gram_not_psd(c: Checkpoint) -> str:
    h = _history(c)
    h["gram_total"] = -h["gram_total"]
    return r"\['gram_total'\] has a negative diagonal entry"


def _gram_missing(c: Checkpoint) -> str:
    _history(c)["gram_total"] = None
    return r"\['gram_total'\] is a NoneType, not a dense tensor"


def _history_layer_missing(c: Checkpoint) -> str:
    layer = _layer(c)
    del c.strategy["history"][layer]
    return rf"strategy\['history'\] does not hold the expected keys: missing {re.escape(layer)}"


def _attr(name, value):
    return lambda c: setattr(c, name, value)


def _update(part, **values):
    return lambda c: part(c).update(values)


def _drop(part, key):
    return lambda c: part(c).pop(key)


def _rng(c: Checkpoint) -> dict:
    return c.rng


def _numpy(c: Checkpoint) -> dict:
    return c.rng["numpy"]


def _python_entry(index: int, value):
    def edit(c: Checkpoint) -> None:
        words = list(c.rng["python"])
        words[index] = value
        c.rng["python"] = words

    return edit


def _strategy(c: Checkpoint) -> dict:
    return c.strategy


def _recorder(c: Checkpoint) -> dict:
    return c.recorder


def _rows(c: Checkpoint) -> list:
    return c.recorder["rounds"]


N, R = CFG.num_tasks, CFG.rounds_per_task
# name -> (an edit of a valid checkpoint at (TASK, ROUND), the pattern the refusal must
# hold after resume-from and the file; None: the pattern the edit returns).
EDITS = {
    # schedule
    "task=-1": (_attr("task", -1), r"task=-1, round_in_task=1 is not a point"),
    "task past the last": (
        _attr("task", N + 1),
        rf"task={N + 1}, round_in_task=1 is not a point of this run's schedule \(num-tasks={N}, "
        + rf"rounds-per-task={R}\)",
    ),
    "task=num-tasks, a round into it": (_attr("task", N), rf"task={N}, round_in_task=1 is not"),
    "round_in_task=-3": (_attr("round_in_task", -3), r"task=1, round_in_task=-3 is not a point"),
    "round_in_task=99": (_attr("round_in_task", 99), r"task=1, round_in_task=99 is not a point"),
    "task not an integer": (_attr("task", 1.0), r"task=1\.0, round_in_task=1 must be integers"),
    # tensors
    "tensor with NaN": (_nan, None),
    "tensor with inf": (_inf, None),
    "tensor of the wrong shape": (_wrong_shape, None),
    "tensor of the wrong dtype": (_wrong_dtype, None),
    "extra tensor": (_extra, None),
    "missing tensor": (_missing, None),
    "sparse tensor": (_sparse, None),
    # RNG
    "rng python truncated": (
        lambda c: c.rng.update(python=c.rng["python"][:-5]),
        r"rng\['python'\] is not a list of 627",
    ),
    "rng python word too large": (
        _python_entry(0, 2**40),
        r"rng\['python'\]: its first 624 entries are not 32-bit words",
    ),
    "rng python version a tensor": (
        _python_entry(-2, torch.tensor([3, 3])),
        r"rng\['python'\]: version tensor\(\[3, 3\]\) is not this Python's",
    ),
    "rng numpy has_gauss a tensor": (
        _update(_numpy, has_gauss=torch.tensor([0, 1])),
        r"rng\['numpy'\]\['has_gauss'\] tensor\(\[0, 1\]\) is not 0 or 1",
    ),
    "a config value a tensor": (
        lambda c: c.config.update(lr=torch.tensor([0.1, 0.2])),
        r"config holds malformed values",
    ),
    "rng python position out of range": (
        _python_entry(624, 10_000),
        r"rng\['python'\]: position 10000 is not in 0\.\.624",
    ),
    "rng numpy keys of the wrong length": (
        lambda c: c.rng["numpy"].update(keys=c.rng["numpy"]["keys"][:100].clone()),
        r"rng\['numpy'\]\['keys'\] has shape \(100,\); this run's is \(624,\)",
    ),
    "rng numpy keys negative": (
        lambda c: c.rng["numpy"].update(keys=-c.rng["numpy"]["keys"].abs() - 1),
        r"rng\['numpy'\]\['keys'\] are not 32-bit words",
    ),
    "rng numpy wrong kind": (_update(_numpy, kind="PCG64"), r"rng\['numpy'\]\['kind'\] is 'PCG64'"),
    "rng numpy missing pos": (
        _drop(_numpy, "pos"),
        r"rng\['numpy'\] does not hold the expected keys: missing pos",
    ),
    "rng torch of the wrong shape": (
        lambda c: c.rng.update(torch=c.rng["torch"][:100].clone()),
        r"rng\['torch'\] has shape \(100,\)",
    ),
    "rng torch of the wrong dtype": (
        lambda c: c.rng.update(torch=c.rng["torch"].long()),
        r"rng\['torch'\] has dtype torch.int64",
    ),
    "rng missing a key": (
        _drop(_rng, "numpy"),
        r"rng does not hold the expected keys: missing numpy",
    ),
    "rng not a mapping": (_attr("rng", [1, 2, 3]), r"rng is a list, not a mapping"),
    # strategy
    "strategy missing a key": (
        _drop(_strategy, "history"),
        r"strategy does not hold the expected keys: missing history",
    ),
    "strategy with an unexpected key": (
        _update(_strategy, rounds=[]),
        r"strategy does not hold the expected keys: unexpected 'rounds'",
    ),
    "strategy of the wrong task": (
        _update(_strategy, task=3),
        r"strategy\['task'\] is 3; at task 1 round 1 it is 1",
    ),
    "history with an extra entry": (_history_count, None),
    "history tensor of the wrong shape": (_history_shape, None),
    "history tensor with NaN": (_history_nan, None),
    "history gram_total not PSD": (_gram_not_psd, None),
    "history gram_total missing": (_gram_missing, None),
    "history missing a layer": (_history_layer_missing, None),
    # recorder
    "recorder missing a round": (
        lambda c: _rows(c).pop(),
        r"recorder\['rounds'\] holds 2 rounds that are not the 3 rounds before task 1 round 1",
    ),
    "recorder round of another task": (
        lambda c: _rows(c)[-1].update(task=4),
        r"recorder\['rounds'\] holds 3 rounds that are not the 3",
    ),
    "recorder with an extra accuracy row": (
        lambda c: c.recorder["accuracy_matrix"].append([0.1] * N),
        r"recorder\['accuracy_matrix'\] has 2 rows; 1 tasks are done",
    ),
    "recorder with an unexpected key": (
        _update(_recorder, message_bytes={}),
        r"recorder holds unexpected keys 'message_bytes'",
    ),
    "recorder rounds not a list": (
        _update(_recorder, rounds={}),
        r"recorder\['rounds'\] is a dict, not a list",
    ),
    # the rest
    "elapsed_seconds NaN": (
        _attr("elapsed_seconds", math.nan),
        r"elapsed_seconds=nan is not a finite number",
    ),
    "elapsed_seconds negative": (
        _attr("elapsed_seconds", -1.0),
        r"elapsed_seconds=-1\.0 is not a finite number",
    ),
    "config not a mapping": (
        _attr("config", ["lr"]),
        r"config is not a mapping of run-config keys",
    ),
}


def _edit(checkpoint: Checkpoint, name: str) -> str:
    """Apply edit ``name`` to ``checkpoint``; the pattern its refusal must hold."""
    edit, pattern = EDITS[name]
    returned = edit(checkpoint)
    return pattern or returned


def _refusal(tmp_path, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        resume_point(CFG.replace(resume_from=str(tmp_path), **overrides))
    assert isinstance(info.value, CheckpointError)
    message = str(info.value)
    assert message.startswith(f"resume-from={str(tmp_path)!r}: "), message
    assert str(checkpoint_path(tmp_path)) in message, message
    return message


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_checkpoint_with_a_valid_checksum_is_refused_naming_the_field(tmp_path, edit):
    checkpoint = valid_checkpoint(CFG, TASK, ROUND)
    expected = _edit(checkpoint, edit)
    save_checkpoint(tmp_path, checkpoint)  # a new checksum: it matches the edited state
    load_checkpoint(tmp_path)  # the checksum alone finds nothing wrong
    message = _refusal(tmp_path)
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    "strategy, task, round_in_task, overrides",
    [
        ("lorm", 0, 1, {}),
        ("lorm", 1, 0, {}),  # saved after task 0's end
        ("lorm", 1, 1, {}),
        ("lorm", 2, 2, {}),  # task 2's rounds done, only its end left
        ("lorm", 5, 0, {}),  # every task done
        ("lorm", 2, 1, {"gram_alpha": 0.0}),  # diagonal Grams
        ("fedit", 1, 0, {}),
        ("fedsa", 3, 1, {}),
    ],
)
def test_a_valid_checkpoint_still_resumes(tmp_path, strategy, task, round_in_task, overrides):
    cfg = small_config(strategy=strategy, **overrides)
    checkpoint = valid_checkpoint(cfg, task, round_in_task)
    save_checkpoint(tmp_path, checkpoint)
    back = resume_point(cfg.replace(resume_from=str(tmp_path), output_dir="/elsewhere"))
    assert isinstance(back, Checkpoint) and back.version == FORMAT_VERSION
    assert (back.task, back.round_in_task) == (task, round_in_task)
    assert set(back.tensors) == set(checkpoint.tensors)
    assert all(torch.equal(back.tensors[k], t) for k, t in checkpoint.tensors.items())
    assert back.strategy["task"] == checkpoint.strategy["task"]


def test_a_format_3_checkpoint_resumes_without_resume_unverified(tmp_path):
    # Format 3 (the release before) kept its checksummed state as pickled bytes.
    import hashlib
    import io

    checkpoint = valid_checkpoint(CFG, TASK, ROUND)
    buffer = io.BytesIO()
    torch.save({**asdict(checkpoint), "version": 3}, buffer)
    payload = buffer.getvalue()
    torch.save({"version": 3, "sha256": hashlib.sha256(payload).hexdigest(), "state": payload},
               tmp_path / CHECKPOINT_FILE)  # fmt: skip
    back = resume_point(CFG.replace(resume_from=str(tmp_path)))
    assert back.version == 3 and back.checksummed
    assert (back.task, back.round_in_task) == (TASK, ROUND)


def test_a_state_claiming_a_checksummed_format_without_its_checksum_is_refused(tmp_path):
    _write_old_format(tmp_path, valid_checkpoint(CFG, TASK, ROUND), FORMAT_VERSION)
    with pytest.raises(ConfigError, match="damaged or not a lorm-flwr checkpoint: KeyError"):
        resume_point(CFG.replace(resume_from=str(tmp_path), resume_unverified=True))


def test_a_flipped_bit_anywhere_in_the_file_is_named_or_harmless(tmp_path):
    # One flipped bit at bytes across the file (the zip magic and headers included): the
    # load names the file as damaged, or it reads exactly what was saved (zip padding).
    checkpoint = valid_checkpoint(CFG, TASK, ROUND)
    save_checkpoint(tmp_path, checkpoint)
    path = tmp_path / CHECKPOINT_FILE
    data = path.read_bytes()
    positions = sorted({0, 1, 27, 30, len(data) - 1, *range(0, len(data), len(data) // 60)})
    for at in positions:
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[at] ^= bit
            path.write_bytes(bytes(damaged))
            try:
                back = load_checkpoint(tmp_path)
            except ValueError as exc:
                assert "damaged or not a lorm-flwr checkpoint" in str(exc)
                continue
            assert back.checksummed and (back.task, back.round_in_task) == (TASK, ROUND)
            assert all(torch.equal(back.tensors[k], t) for k, t in checkpoint.tensors.items())


def _write_old_format(folder, checkpoint: Checkpoint, version: int) -> None:
    """A checkpoint as formats 1 and 2 were written: the state itself, no checksum."""
    state = {**asdict(checkpoint), "version": version}
    if version == 1:  # the strategy's round log; message sizes, no handshakes or provenance
        state["strategy"] = {**state["strategy"], "rounds": [{"failures": [], "train_loss": 1.0}]}
        recorder = {k: v for k, v in state["recorder"].items()
                    if k not in ("handshakes", "provenance")}  # fmt: skip
        state["recorder"] = {**recorder, "message_bytes": {"round 0 down": 10}}
    torch.save(state, folder / CHECKPOINT_FILE)


@pytest.mark.parametrize("version", [1, 2])
def test_a_format_without_checksum_needs_resume_unverified(tmp_path, version):
    _write_old_format(tmp_path, valid_checkpoint(CFG, TASK, ROUND), version)
    assert load_checkpoint(tmp_path).version == version  # it still loads
    message = _refusal(tmp_path)
    assert f"has checkpoint format {version}, which carries no checksum" in message
    assert "resume-unverified=true" in message

    unverified = CFG.replace(resume_from=str(tmp_path), resume_unverified=True)
    back = resume_point(unverified)
    assert isinstance(back, Checkpoint) and back.version == version
    assert (back.task, back.round_in_task) == (TASK, ROUND)


@pytest.mark.parametrize("version", [1, 2])
def test_resume_unverified_still_checks_every_field(tmp_path, version):
    checkpoint = valid_checkpoint(CFG, TASK, ROUND)
    expected = _nan(checkpoint)
    _write_old_format(tmp_path, checkpoint, version)
    message = _refusal(tmp_path, resume_unverified=True)
    assert re.search(expected, message), message
    assert "resume-unverified" not in message


def test_resume_unverified_without_resume_from_is_a_config_error():
    # RunConfig(...) itself does not validate; from_mapping, replace and validate do.
    with pytest.raises(ConfigError, match=r"resume-unverified=true applies to resume-from only"):
        RunConfig(resume_unverified=True).validate()
    with pytest.raises(ConfigError, match="resume-unverified"):
        RunConfig.from_mapping({"resume-unverified": True})
    with pytest.raises(ConfigError, match="resume-unverified"):
        CFG.replace(resume_unverified=True)
    assert RunConfig.from_mapping({"resume-unverified": True, "resume-from": "x"}).resume_unverified


class _Untouchable:
    """A grid that fails the test if the run uses it at all (a hello, a node count)."""

    def __getattr__(self, name):
        raise AssertionError(f"the grid was used ({name}) before the checkpoint was checked")


@pytest.mark.parametrize("edit", ["task=-1", "tensor with NaN", "rng python truncated",
                                  "history with an extra entry"])  # fmt: skip
def test_a_bad_checkpoint_stops_the_run_before_the_hello(tmp_path, edit):
    checkpoint = valid_checkpoint(CFG, TASK, ROUND)
    _edit(checkpoint, edit)
    save_checkpoint(tmp_path, checkpoint)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"resume-from=.*does not fit this run"):
        run_federated(_Untouchable(), CFG.replace(resume_from=str(tmp_path)))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # left as it was


def test_a_format_without_checksum_stops_the_run_before_the_hello(tmp_path):
    _write_old_format(tmp_path, valid_checkpoint(CFG, TASK, ROUND), 2)
    with pytest.raises(CheckpointError, match="resume-unverified=true"):
        run_federated(_Untouchable(), CFG.replace(resume_from=str(tmp_path)))


def test_the_untouchable_grid_is_reached_with_a_valid_checkpoint(tmp_path):
    """The control of the two tests above: a valid checkpoint passes, the hello comes next."""
    save_checkpoint(tmp_path, valid_checkpoint(CFG, TASK, ROUND))
    with pytest.raises(AssertionError, match="the grid was used"):
        run_federated(_Untouchable(), CFG.replace(resume_from=str(tmp_path)))
