"""The reference code's behaviours, each behind a run-config key (issue: fidelity).

Unit tests on the pieces; ``test_reference_preset_runs_*`` runs them all in a
real Flower simulation.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from torch import nn

from lorm_flwr import wire
from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.datasets import LabelledData, hold_out_validation
from lorm_flwr.math.cross_task import TaskHistory, mean_delta, mean_delta_factors
from lorm_flwr.math.merge import merge_from_sums, psd_solve_right
from lorm_flwr.models.adapters import get_tensors, model_layout
from lorm_flwr.runtime import initial_tensors, model_of
from lorm_flwr.server.strategies.base import Gathered
from lorm_flwr.server.strategies.lorm import LoRM
from lorm_flwr.train import CENTER_CROP_RATIO, InputSpec, _parameter_groups, train_local

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ------------------------------------------------------- diagonal Grams: exact
def test_a_diagonal_system_is_divided_exactly_however_small_the_entry():
    d = torch.tensor([1.0, 1e-9, 0.0, 1e-30, 3e5], dtype=torch.float64)
    rhs = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = psd_solve_right(rhs, d)
    # The least-squares oracle: X diag(d) = rhs, minimum norm (column 2 is free: 0).
    expected = np.linalg.lstsq(np.diag(d.numpy()).T, rhs.numpy().T, rcond=None)[0].T
    expected[:, 3] = rhs[:, 3].numpy() / 1e-30  # beyond lstsq's own cut-off, still exact
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    assert torch.equal(got[:, 2], torch.zeros(3, dtype=torch.float64))


def test_a_quotient_beyond_fp32_is_zero_so_the_global_tensor_stays_finite():
    """Only a dishonest reply can make ``rhs_j / d_j`` exceed fp32 (``|rhs_j| <= max|A| d_j``)."""
    got = merge_from_sums(torch.tensor([[0.5, 1e30]], dtype=torch.float64),
                          torch.tensor([1.0, 1e-40], dtype=torch.float64))  # fmt: skip
    assert torch.isfinite(got.float()).all() and got[0, 0] == 0.5 and got[0, 1] == 0.0


def test_a_low_energy_feature_keeps_its_column_in_the_lorm_a_merge():
    """Column j of A_M is the g_ij-weighted mean of the clients' columns, even when the
    feature carries 1e-9 of the energy (the old 1e-6 cut-off zeroed it)."""
    gen = torch.Generator().manual_seed(1)
    As = [torch.randn(2, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    gs = [torch.tensor([1.0, 2.0, 1e-9 * (i + 1), 0.5], dtype=torch.float64) for i in range(3)]
    merged = merge_from_sums(sum(a * g for a, g in zip(As, gs)), sum(gs))
    weights = torch.stack([g[2] for g in gs])
    expected = sum(a[:, 2] * w for a, w in zip(As, weights)) / weights.sum()
    torch.testing.assert_close(merged[:, 2], expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- inputs
def _images(n=4, size=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_augmentation_is_seeded_per_image_and_keeps_the_shape():
    spec = InputSpec(32, (0.5,) * 3, (0.5,) * 3, augment=True)
    images = np.repeat(_images(1), 8, axis=0)  # the same image 8 times
    torch.manual_seed(3)
    first = spec(images, CPU)
    torch.manual_seed(3)
    again = spec(images, CPU)
    torch.manual_seed(4)
    other = spec(images, CPU)
    assert first.shape == (8, 3, 32, 32)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # a crop drawn per image, not per batch


def test_center_crop_resizes_by_256_over_224_then_crops():
    assert round(224 / CENTER_CROP_RATIO) == 256
    spec = InputSpec(32, (0.0,) * 3, (1.0,) * 3, center_crop=True)
    plain = InputSpec(32, (0.0,) * 3, (1.0,) * 3)
    x = _images(2)
    cropped, resized = spec(x, CPU), plain(x, CPU)
    assert cropped.shape == resized.shape == (2, 3, 32, 32)
    assert not torch.allclose(cropped, resized)
    # A constant image stays constant under resize and crop.
    flat = np.full((1, 28, 28), 128, dtype=np.uint8)
    torch.testing.assert_close(spec(flat, CPU), torch.full((1, 3, 32, 32), 128 / 255))


# -------------------------------------------------------------- training
class _Toy(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        inner = nn.Module()
        inner.fc = nn.Linear(12, 6)
        inner.linear_head = nn.Linear(6, 3)
        inner.forward = lambda x: inner.linear_head(inner.fc(x.flatten(1)[:, :12]))
        cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["fc"],
                         modules_to_save=["linear_head"], lora_dropout=dropout)  # fmt: skip
        self.peft = get_peft_model(inner, cfg)
        for name, p in self.peft.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)

    def forward(self, x):
        return self.peft(x)


def _flat_inputs(images, device):
    return torch.from_numpy(images.astype(np.float32) / 255.0).to(device)


def _train(model, *, n=40, **kw):
    images = _images(n, size=4)
    labels = np.arange(n) % 3
    args = {"task_classes": [0, 1, 2], "inputs": _flat_inputs, "epochs": 1, "batch_size": 8,
            "lr": 0.01, "weight_decay": 0.0, "device": CPU, "seed": 0, "optimizer": "sgd"}  # fmt: skip
    return train_local(model, images, labels, **{**args, **kw})


def test_each_side_of_the_adapter_and_the_head_get_their_learning_rate():
    model = _Toy()
    groups = _parameter_groups(model, {"A": 0.1, "B": 0.2, "head": 0.3})
    names = {id(p): n for n, p in model.named_parameters()}
    by_rate = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert all("lora_A" in n for n in by_rate[0.1])
    assert all("lora_B" in n for n in by_rate[0.2])
    assert by_rate[0.3] and all("linear_head" in n for n in by_rate[0.3])


def test_run_config_learning_rates_fall_back_to_lr():
    cfg = RunConfig(lr=0.01, lr_a=0.003)
    assert (cfg.lr_of("A"), cfg.lr_of("B"), cfg.lr_of("head")) == (0.003, 0.01, 0.01)


def test_local_steps_train_exactly_that_many_batches():
    assert _train(_Toy(), n=20, batch_size=8).steps == 3  # one epoch: 8 + 8 + 4
    assert _train(_Toy(), n=20, batch_size=8, steps=7, epochs=5).steps == 7


def test_warmup_scales_the_first_step_by_one_over_the_warmup():
    def first_step_change(**kw):
        model = _Toy()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        _train(model, steps=1, **kw)
        return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}

    plain, warm = first_step_change(), first_step_change(warmup_steps=10)
    for name in plain:  # plain SGD: the step is proportional to the learning rate
        # (fp32 round-off of p_after - p_before is ~1e-8 at these magnitudes)
        torch.testing.assert_close(warm[name], plain[name] / 10, rtol=1e-3, atol=3e-8)


def test_adapter_dropout_is_on_only_while_training():
    model = _Toy(dropout=0.5)
    seen = []
    drops = [
        m for n, m in model.named_modules() if "lora_dropout" in n and isinstance(m, nn.Dropout)
    ]
    assert drops
    drops[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    _train(model, n=8)
    assert seen and all(seen)
    assert not any(m.training for m in model.modules())  # the backbone stays in eval mode
    # Seeded: the same seed gives the same trained model despite the dropout.
    again = _Toy(dropout=0.5)
    _train(again, n=8)
    for (n1, p1), (_, p2) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p1, p2), n1


# ------------------------------------------------------------ validation
def test_validation_is_held_out_of_training_per_class_seeded_and_disjoint():
    y = np.repeat(np.arange(4), [10, 10, 3, 1])
    x = np.arange(len(y))
    data = LabelledData(x, y, x[:2], y[:2], ("a", "b", "c", "d"))
    held = hold_out_validation(data, 0.2, seed=5)
    assert hold_out_validation(data, 0.0, seed=5) is data
    assert sorted(np.concatenate([held.train_x, held.validation_x])) == list(x)
    assert [int((held.validation_y == c).sum()) for c in range(4)] == [2, 2, 1, 0]
    assert [int((held.train_y == c).sum()) for c in range(4)] == [8, 8, 2, 1]  # never all
    again = hold_out_validation(data, 0.2, seed=5)
    assert np.array_equal(held.validation_x, again.validation_x)
    assert np.array_equal(held.test_x, data.test_x)


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"gram-passes": 2}, "needs augment=true"),
        ({"gram-passes": 0}, "gram-passes=0 is invalid"),
        ({"lora-dropout": 1.0}, "lora-dropout=1.0 is invalid"),
        ({"lr-a": -0.1}, "lr-a=-0.1 is invalid"),
        ({"local-steps": -1}, "local-steps=-1 is invalid"),
        ({"warmup-steps": -2}, "warmup-steps=-2 is invalid"),
        ({"validation-fraction": 1.0}, "validation-fraction=1.0 is invalid"),
        ({"lorm-round-grams": "mean"}, "lorm-round-grams='mean' is not known"),
        ({"lorm-first-task": "plain"}, "lorm-first-task='plain' is not known"),
        ({"round-eval-model": "merged"}, "round-eval-model='merged' is not known"),
        ({"augment": True, "dataset": "bbc-news", "backbone": "minilm"}, "applies to images"),
        (
            {"eval-center-crop": True, "dataset": "bbc-news", "backbone": "minilm"},
            "applies to images",
        ),
    ],
)
def test_bad_reference_keys_stop_before_any_work(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(changes)


def test_the_reference_preset_parses_and_turns_every_behaviour_on():
    with (ROOT / "configs" / "offline-mnist-reference.toml").open("rb") as f:
        preset = tomllib.load(f)
    cfg = RunConfig.from_mapping(preset)
    assert cfg.augment and cfg.gram_passes >= 1 and cfg.eval_center_crop
    assert cfg.lorm_round_grams == "mean-delta" and cfg.lorm_reference_grams
    assert cfg.lorm_first_task == "keep" and cfg.round_eval_model == "mean-delta"
    assert cfg.gram_alpha == 0.0 and cfg.head_gram_alpha == 0.5
    assert cfg.head_init == "trunc-normal" and cfg.resize_interpolation == "bicubic"


# --------------------------------------------------- mean-delta (LoRM)
def test_mean_delta_factors_multiply_to_the_mean_of_the_deltas():
    gen = torch.Generator().manual_seed(2)
    bs = [torch.randn(5, 2, dtype=torch.float64, generator=gen) for _ in range(3)]
    As = [torch.randn(2, 4, dtype=torch.float64, generator=gen) for _ in range(3)]
    history = TaskHistory(scaled_bs=bs[:2], a_mats=As[:2])
    a_cat, b_cat = mean_delta_factors(history, bs[2], As[2])
    expected = sum(b @ a for b, a in zip(bs, As)) / 3
    torch.testing.assert_close(b_cat @ a_cat, expected)
    a0, b0 = mean_delta_factors(TaskHistory(), bs[0], As[0])  # task 0: the task itself
    torch.testing.assert_close(b0 @ a0, bs[0] @ As[0])
    past_b, past_a = torch.cat(bs[:2], 1), torch.cat(As[:2], 0)
    a1, b1 = mean_delta(past_b, past_a, bs[2], As[2])
    torch.testing.assert_close(b1 @ a1, expected)


def _tiny_cfg(**changes):
    return RunConfig(dataset="digits", backbone="vit-tiny", image_size=16, lora_rank=2, **changes)


def test_past_tasks_record_round_trips_and_bad_records_are_named():
    cfg = _tiny_cfg()
    layout = model_layout(model_of(cfg))
    past = {ly.name: (torch.randn(ly.d_out, 2 * ly.rank), torch.randn(2 * ly.rank, ly.d_in))
            for ly in layout.layers}  # fmt: skip
    content = RecordDict({wire.PAST_TASKS: wire.past_tasks_record(past)})
    got = wire.decode_past_tasks(content, layout, task=2)
    for name, (b, a) in past.items():
        assert torch.equal(got[name][0], b) and torch.equal(got[name][1], a)
    assert wire.decode_past_tasks(RecordDict(), layout, task=2) is None
    with pytest.raises(ValueError, match="expected finite"):
        wire.decode_past_tasks(content, layout, task=1)  # shapes of another task
    with pytest.raises(ValueError, match="no past tasks"):
        wire.decode_past_tasks(content, layout, task=0)
    first = layout.layers[0].name
    bad = dict(past)
    bad[first] = (past[first][0] * float("nan"), past[first][1])
    with pytest.raises(ValueError, match="expected finite"):
        wire.decode_past_tasks(
            RecordDict({wire.PAST_TASKS: wire.past_tasks_record(bad)}), layout, task=2
        )
    extra = wire.past_tasks_record({**past, "stray": (torch.zeros(1, 1), torch.zeros(1, 1))})
    with pytest.raises(ValueError, match="unexpected entries"):
        wire.decode_past_tasks(RecordDict({wire.PAST_TASKS: extra}), layout, task=2)


def _lorm_after_one_task(**changes):
    """A LoRM strategy that has folded task 0, and the task's merged tensors."""
    cfg = _tiny_cfg(**changes)
    strategy = LoRM(cfg, model_layout(model_of(cfg)))
    tensors = strategy.begin_task(0, dict(initial_tensors(cfg)))
    gen = torch.Generator().manual_seed(0)
    for layer in strategy.layout.layers:
        tensors[layer.b_key] = torch.randn(tensors[layer.b_key].shape, generator=gen)

    def query(record_on, plan):  # rank-deficient Grams: fold and keep differ
        grams = {}
        for ly in strategy.layout.layers:
            x = torch.randn(ly.d_in, 2, generator=gen)
            grams[wire.gram_key(ly.name, wire.G)] = x @ x.T
        gathered = Gathered()
        gathered.add(wire.Reply(node=1, grams=grams, metrics={wire.NUM_EXAMPLES: 2}))
        return gathered

    return strategy, tensors, strategy.end_task(0, tensors, query)


def test_first_task_keep_evaluates_the_tasks_own_adapter_and_fold_does_not():
    _, tensors, kept = _lorm_after_one_task(lorm_first_task="keep")
    assert kept.rank == 2 and all(torch.equal(kept.tensors[k], v) for k, v in tensors.items())
    strategy, _, folded = _lorm_after_one_task()
    layer = strategy.layout.layers[0]
    assert not torch.allclose(folded.tensors[layer.a_key], tensors[layer.a_key])
    # Either way the history holds task 0 for the next tasks' cross-task merge.
    assert len(strategy.history[layer.name].scaled_bs) == 1


def test_mean_delta_round_messages_carry_the_past_tasks_and_evaluate_on_the_mean():
    from tests.messages import ScriptedGrid

    strategy, tensors, _ = _lorm_after_one_task(
        lorm_round_grams="mean-delta", round_eval_model="mean-delta"
    )
    task1 = strategy.begin_task(1, tensors)
    grid = ScriptedGrid([1, 2], [{}])
    arrays = wire.tensors_to_arrays(strategy.shared(task1))
    messages = list(strategy.configure_train(1, arrays, wire.Instructions(1).to_config(), grid))
    assert len(messages) == 2
    past = wire.decode_past_tasks(messages[0].content, strategy.layout, task=1)
    layer = strategy.layout.layers[0]
    torch.testing.assert_close(
        past[layer.name][0].double(), strategy.history[layer.name].scaled_bs[0], rtol=1e-6, atol=0
    )
    model = strategy.round_model(task1)
    assert model.rank == 4 and model.alpha == 4.0
    # Task 0 without mean-delta keys: no record.
    plain, _, _ = _lorm_after_one_task()
    plain.begin_task(0, tensors)
    messages = list(plain.configure_train(1, arrays, wire.Instructions(0).to_config(), grid))
    assert wire.PAST_TASKS not in messages[0].content


def test_a_client_records_mean_delta_grams_on_the_past_and_its_own_delta():
    """The client's Grams with past factors equal those on the dense mean-delta model."""
    from lorm_flwr.client.round import _mean_delta_model

    cfg = _tiny_cfg()
    model = model_of(cfg)
    layout = model_layout(model)
    tensors = dict(get_tensors(model))
    past = {ly.name: (torch.randn(ly.d_out, ly.rank), torch.randn(ly.rank, ly.d_in))
            for ly in layout.layers}  # fmt: skip
    record = _mean_delta_model(cfg, list(layout.layers), tensors, past)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for ly in layout.layers:
            sub = record.get_submodule("base_model.model." + ly.name)
            delta = sub.get_delta_weight("default").reshape(ly.d_out, ly.d_in)
            b, a = past[ly.name]
            own = ly.scaling * ly.matrix(tensors[ly.b_key]) @ ly.matrix(tensors[ly.a_key])
            torch.testing.assert_close(delta, (b @ a + own) / 2, rtol=1e-5, atol=1e-6)
        assert record(x).shape[0] == 3


# ------------------------------------------------------------ simulations
REFERENCE_MODE = {
    "augment": True,
    "gram-passes": 2,
    "eval-center-crop": True,
    "lorm-round-grams": "mean-delta",
    "lorm-reference-grams": True,
    "lorm-first-task": "keep",
    "round-eval-model": "mean-delta",
    "gram-alpha": 0.0,
    "lr-a": 0.002,
    "lr-b": 0.0005,
    "lora-dropout": 0.1,
    "validation-fraction": 0.2,
}


@pytest.mark.slow
def test_reference_mode_lorm_runs_with_validation_and_sends_the_past_tasks(federation, tmp_path):
    from tests.simulations import TINY, run_app

    cfg = {**TINY, "strategy": "lorm", "rounds-per-task": 2, **REFERENCE_MODE}
    _, results, _ = run_app(federation, tmp_path / "runs", 2, cfg)
    val = results["validation"]
    assert len(val["accuracy_matrix"]) == 2 and 0.0 <= val["final_average_accuracy"] <= 1.0
    assert all("validation" in t for t in results["task_end"])
    # Task 1's rounds also carry the past task's factors down; task 0's do not.
    down = [r["bytes_down"] for r in results["rounds"]]
    assert down[2] > down[0] and down[3] > down[1]
    # Task 0 keeps its own adapter (rank r), task 1 is the cross-task merge (rank 2r).
    assert [t["adapter_rank"] for t in results["task_end"]] == [2, 4]


def test_fedsa_reference_steps_dropout_and_warmup_run(per_strategy):
    """The session's shared FedSA-VeRA run carries the FedSA reference's schedule keys."""
    from tests.simulations import FEDSA_REFERENCE_STEPS

    _, results, _ = per_strategy["fedsa-vera"]
    for key, value in FEDSA_REFERENCE_STEPS.items():
        assert results["config"][key] == value
    assert len(results["accuracy_matrix"]) == 2
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["rounds"])
