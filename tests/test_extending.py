"""The three common changes are each one room's work (docs/architecture.md, "Changing it").

- a new strategy: one module (here written to a temporary folder) and one registry line;
- a new data set: one entry in ``DATASETS`` (a backbone: one entry in ``BACKBONES``);
- a new message field: one change to the codec in ``lorm_flwr/wire/codecs.py``, which
  both sides use, held by the round trip below.
"""

from __future__ import annotations

import dataclasses
import textwrap

import numpy as np
import torch

from lorm_flwr import registry, wire
from lorm_flwr.config import RunConfig
from lorm_flwr.data.datasets import DATASETS, DatasetSpec, LabelledData
from lorm_flwr.models.adapters import model_layout
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.plan import make_plan
from lorm_flwr.server.rounds import train_exchange
from tests.messages import ScriptedGrid, train_content
from tests.simulations import TINY

NEW_STRATEGY = '''
"""FedIT whose merged adapter moves only half way from the global one (an example)."""

from lorm_flwr.server.strategies.fedit import FedIT


class HalfStep(FedIT):
    def merge(self, plan, replies, tensors):
        merged = super().merge(plan, replies, tensors)
        for key, value in merged.tensors.items():
            merged.tensors[key] = (value + tensors[key]) / 2
        return merged
'''


def test_a_new_strategy_is_one_module_and_one_registry_line(tmp_path, monkeypatch):
    (tmp_path / "half_step.py").write_text(textwrap.dedent(NEW_STRATEGY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.STRATEGIES, "half-step", "half_step:HalfStep")  # the one line

    cfg = RunConfig.from_mapping({**TINY, "strategy": "half-step"})  # a known name now
    strategy = registry.strategy_class(cfg.strategy)(cfg, model_layout(model_of(cfg)))
    tensors = dict(initial_tensors(cfg))
    reply = train_content({k: v + 2 for k, v in tensors.items()}, 5)
    grid = ScriptedGrid([1, 2], [{1: reply, 2: reply}])
    _, merged, _, _ = train_exchange(grid, strategy, tensors, 0)
    for key, value in tensors.items():  # half of the clients' +2
        torch.testing.assert_close(merged.tensors[key], value + 1)


def _tiny_shapes(test_fraction: float, seed: int) -> LabelledData:
    """Three classes of 12x12 grey images: a bar in one of three places."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 40, size=(90, 12, 12)).astype(np.uint8)
    y = np.repeat(np.arange(3), 30)
    for i, label in enumerate(y):
        x[i, :, 4 * label : 4 * label + 4] = 255
    test = np.arange(len(y)) % round(1 / test_fraction) == 0
    return LabelledData(x[~test], y[~test], x[test], y[test], ("left", "middle", "right"))


def test_a_new_data_set_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(DATASETS, "tiny-shapes", DatasetSpec(3, _tiny_shapes, "made in code"))

    cfg = RunConfig.from_mapping({**TINY, "dataset": "tiny-shapes", "num-tasks": 3})
    plan = make_plan(cfg, 2)  # the dry run: data, split, model and message sizes
    assert plan.problems == [] and [sorted(t) for t in plan.tasks] == [[0], [1], [2]]


def test_a_message_field_is_declared_once_for_both_sides():
    """Every field of the instructions travels: a field added to the dataclass but not to
    its codec (to_config / from_config) fails here, on both sides at once."""
    sent = wire.Instructions(
        task=3, round_in_task=1, train_a=True, train_b=True, train_head=True,
        grams=wire.GRAMS_LORM_A, seed=7, local=frozenset({"B"}), rank=8, alpha=4.0,
        export_to="run-1", split="validation",
    )  # fmt: skip
    defaults = wire.Instructions(task=0)
    fields = [f.name for f in dataclasses.fields(sent)]
    # Every field differs from its default, so a field the codec drops cannot pass.
    assert [f for f in fields if getattr(sent, f) == getattr(defaults, f)] == []
    assert wire.Instructions.from_config(sent.to_config()) == sent
