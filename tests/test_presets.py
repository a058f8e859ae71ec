"""Presets under configs/: they parse and validate; dry runs plan without training."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lorm_flwr.config import RunConfig
from lorm_flwr.server.plan import main as plan_main
from lorm_flwr.server.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.toml"))
APP_KEYS = set(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
)


def _load(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def test_the_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {
        "lorm-cifar100",
        "lorm-eurosat",
        "lorm-imagenet-r",
        "lorm-imagenet-a",
        "lorm-cub200",
        "lorm-cars196",
        "fedsa-rte",
        "offline-mnist",
        "offline-bbc-news",
        "offline-arithmetic",
        "fedsa-gsm8k",
    } <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parses_validates_and_uses_only_app_keys(path):
    values = _load(path)
    assert set(values) <= APP_KEYS  # flwr --run-config only overrides keys the app declares
    assert values["num-clients"] >= values.get("min-clients", 2)  # presets pin the client count
    RunConfig.from_mapping(values)


def test_offline_default_preset_equals_the_app_defaults():
    assert RunConfig.from_mapping(_load(ROOT / "configs" / "offline-mnist.toml")) == RunConfig()


def test_dry_run_of_the_offline_default_plans_everything():
    plan = make_plan(RunConfig(), num_clients=3)
    assert plan.unreachable == []
    assert plan.tasks == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert [sum(s) for s in plan.shard_sizes] == [800] * 5
    assert plan.adapted_layers == 32 and plan.adapter_parameters > 0
    down, up_b = plan.messages[0]
    _, up_a = plan.messages[1]
    assert up_a > up_b > 0 < down  # the A-round carries the full Grams
    assert plan.end_of_task[0] == down and plan.end_of_task[1] > 0
    text = "\n".join(plan.lines())
    assert "nothing is trained" in text and "could not reach" not in text


def test_dry_run_of_a_hub_preset_offline_names_what_it_could_not_reach(capsys):
    plan_main(["--clients", "10", "--run-config", str(ROOT / "configs" / "lorm-cifar100.toml")])
    out = capsys.readouterr().out
    assert "could not reach the data 'cifar100'" in out
    assert "could not reach the weights of 'vit-base-in21k'" in out
    # the architecture alone still gives the layout: 48 layers of rank 1
    assert "48 adapted layers, rank 1" in out


def test_dry_run_of_the_cars_preset_offline_names_the_data_it_could_not_reach():
    plan = make_plan(RunConfig.from_mapping(_load(ROOT / "configs" / "lorm-cars196.toml")), 10)
    assert any("cars196" in reason for reason in plan.unreachable)


def test_dry_run_of_a_text_hub_preset_offline():
    plan = make_plan(RunConfig.from_mapping(_load(ROOT / "configs" / "fedsa-rte.toml")), 3)
    reasons = "\n".join(plan.unreachable)
    assert "glue-rte" in reasons and "roberta-large" in reasons
    assert plan.tasks is None


def test_the_dry_run_says_when_a_message_would_exceed_max_message_mb():
    from lorm_flwr.server.plan import make_plan

    plan = make_plan(
        RunConfig(dataset="digits", backbone="vit-tiny", image_size=16, max_message_mb=0.01), 3
    )
    assert any(line.startswith("the run would stop: each client's") for line in plan.lines())
    assert not make_plan(
        RunConfig(dataset="digits", backbone="vit-tiny", image_size=16), 3
    ).problems


def test_the_plan_command_prints_the_apps_message_for_a_misspelt_key():
    with pytest.raises(
        SystemExit, match="unknown run-config key 'lora_rank'; did you mean 'lora-rank'"
    ):
        plan_main(["--clients", "3", "lora_rank=8"])
