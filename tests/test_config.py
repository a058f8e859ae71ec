"""Run-config parsing and validation: one test per rejected value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.data.scenario import ScenarioError, build_scenario

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_parse_and_match_dataclass():
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_mapping(defaults)
    assert cfg == RunConfig()  # pyproject and dataclass defaults agree
    assert set(cfg.to_dict()) == set(defaults)  # every key has a pyproject default


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("strategy", "fedavgx", "strategy='fedavgx' is not known"),
        ("dataset", "imagenet-1k", "dataset='imagenet-1k' is not known"),
        ("backbone", "resnet9000", "backbone='resnet9000' is not known; allowed: "),
        ("lora-rank", 0, "lora-rank=0 is invalid: must be > 0"),
        ("lora-rank", -3, "lora-rank=-3 is invalid: must be > 0"),
        ("dirichlet-beta", 0.0, "dirichlet-beta=0.0 is invalid: must be > 0"),
        ("dirichlet-beta", -1.0, "dirichlet-beta=-1.0 is invalid: must be > 0"),
        ("num-tasks", 11, "num-tasks=11 is invalid: dataset 'mnist' has only 10 classes"),
        ("lr", 0.0, "lr=0.0 is invalid"),
        ("gram-alpha", 1.5, "gram-alpha=1.5 is invalid: must be in [0, 1]"),
        ("device", "tpu", "device='tpu' is not known"),
        ("lora-rank", "four", "lora-rank='four' is invalid: expected a int"),
        ("strategy", "fedavg", "strategy='fedavg' is not known; did you mean 'fedit'?"),
        ("strategy", "lrom", "did you mean 'lorm'?"),
        ("seed", 10**14, "seed=100000000000000 is invalid: must be in [0, 4294967295]"),
        ("min-samples-per-client", 0, "min-samples-per-client=0 is invalid: must be > 0"),
        ("lora-targets", ",", "lora-targets=',' names no module"),
        ("image-size", 1_000_000, "image-size=1000000 is invalid: must be in [8, 1024]"),
        ("num-clients", -1, "num-clients=-1 is invalid: must be >= 0"),
        ("num-clients", 1, "min-clients=2 is invalid: more than num-clients=1"),
        ("device", "cuda:abc", "device='cuda:abc' is not known"),
        ("device", "cuda:", "device='cuda:' is not known"),
        ("lora-targets", ["conv_pw", "conv_pwl"], "expected a str (a single value, not a list"),
        ("output-dir", {"a": 1}, "expected a str (a single value, not a list or table)"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("key", "closest"),
    [("lora-rnak", "lora-rank"), ("learning-rate", "lr"), ("lora_rank", "lora-rank")],
)
def test_unknown_key_is_rejected_with_the_closest_known_one(key, closest):
    with pytest.raises(
        ConfigError, match=f"unknown run-config key '{key}'; did you mean '{closest}'\\?"
    ):
        RunConfig.from_mapping({key: 4})


def test_client_below_minimum_samples_is_rejected_before_training():
    import numpy as np

    labels = np.repeat(np.arange(4), 10)  # 10 samples per class
    with pytest.raises(ScenarioError, match="min-samples-per-client=30"):
        build_scenario(
            labels, 4, num_tasks=2, num_clients=3, beta=0.5, min_samples=30,
            order="natural", seed=0,
        )  # fmt: skip
    assert issubclass(ScenarioError, ConfigError)


def test_ints_accepted_for_floats_and_config_is_frozen():
    cfg = RunConfig.from_mapping({"lr": 1, "lora-alpha": 8})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    with pytest.raises(AttributeError):
        cfg.lr = 2.0  # type: ignore[misc]


def test_gram_alpha_auto_is_each_strategys_default_and_a_number_overrides_it():
    from lorm_flwr.config import GRAM_ALPHA_DEFAULTS

    assert RunConfig().gram_alpha == GRAM_ALPHA_DEFAULTS["lorm"] == 1.0
    assert RunConfig.from_mapping({"strategy": "regmean"}).gram_alpha == 0.0
    assert RunConfig.from_mapping({"strategy": "fedit", "gram-alpha": "auto"}).gram_alpha == 1.0
    assert RunConfig.from_mapping({"strategy": "regmean", "gram-alpha": 0.5}).gram_alpha == 0.5
    assert RunConfig.from_mapping({"gram-alpha": "0.25"}).gram_alpha == 0.25
    assert RunConfig().to_dict()["gram-alpha"] == 1.0  # results record the number used
    for bad in ("full", True, float("nan")):
        with pytest.raises(ConfigError, match="gram-alpha="):
            RunConfig.from_mapping({"gram-alpha": bad})


def test_valid_device_strings_pass():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert RunConfig.from_mapping({"device": device}).device == device


def test_the_dry_run_bounds_lora_rank_by_the_smallest_adapted_layer():
    """lora-rank=1000000 used to reach peft and die with a raw allocator error."""
    from lorm_flwr.server.plan import main as plan_main
    from lorm_flwr.server.plan import make_plan

    cfg = RunConfig.from_mapping({"dataset": "digits", "image-size": 16, "lora-rank": 1_000_000})
    with pytest.raises(ValueError, match=r"lora-rank=1000000 is invalid: the smallest adapted "
                       r"layer, .*, has dimension 16; give lora-rank <= 16"):  # fmt: skip
        make_plan(cfg, 3)
    with pytest.raises(SystemExit, match="lora-rank=17 is invalid"):
        plan_main(["--clients", "3", "dataset='digits'", "image-size=16", "lora-rank=17"])
    assert make_plan(cfg.replace(lora_rank=16), 3).adapter_parameters > 0


def test_the_dry_run_bounds_max_length_by_the_text_backbones_positions():
    """max-length=1000000000 used to allocate (N, 1e9) token ids and die."""
    from lorm_flwr.server.plan import make_plan

    cfg = RunConfig.from_mapping(
        {"dataset": "bbc-news", "backbone": "minilm", "max-length": 1_000_000_000}
    )
    with pytest.raises(ConfigError, match=r"max-length=1000000000 is invalid: backbone 'minilm' "
                       r"takes at most 512 tokens"):  # fmt: skip
        make_plan(cfg, 3)
