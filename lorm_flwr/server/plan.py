"""Dry run: what a run would do, computed without training anything (no Flower).

``dry-run=true`` makes the ServerApp print this plan and stop. It builds what it
can: the data split (tasks, samples per client) and the model's layout (adapted
layers, parameters, the tensors of every message). Whatever it cannot reach
offline (hub data, hub weights) is named, and the rest is still reported; for a
timm backbone the architecture alone gives every shape.

    python -m lorm_flwr.server.plan --clients 10 --run-config configs/lorm-cifar100.toml
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import dataclass, field
from typing import Any

from lorm_flwr.config import ConfigError, RunConfig
from lorm_flwr.wire.limits import BYTES_PER_FLOAT

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    cfg: RunConfig
    num_clients: int
    tasks: list[list[int]] | None = None
    shard_sizes: list[list[int]] | None = None  # [task][client]
    adapted_layers: int | None = None
    adapter_parameters: int | None = None
    head_parameters: int | None = None
    # round in task -> (floats down per client, floats up per client)
    messages: dict[int, tuple[int, int]] = field(default_factory=dict)
    end_of_task: tuple[int, int] | None = None  # LoRM's statistics exchange: (down, up) per client
    unreachable: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what would stop the run

    def lines(self) -> list[str]:
        c = self.cfg
        out = [
            (
                f"dry run: strategy {c.strategy}, dataset {c.dataset}, backbone {c.backbone}, "
                f"{self.num_clients} clients, {c.num_tasks} tasks x {c.rounds_per_task} rounds "
                f"x {c.local_epochs} local epochs; nothing is trained"
            ),
        ]
        if self.tasks is not None:
            out.append(f"tasks (classes): {self.tasks}")
            for t, sizes in enumerate(self.shard_sizes or []):
                out.append(f"  task {t}: samples per client {sizes} (total {sum(sizes)})")
        if self.adapter_parameters is not None:
            out.append(
                f"adapter: {self.adapted_layers} adapted layers, rank {c.lora_rank}, "
                f"{self.adapter_parameters:,} trainable adapter parameters; head "
                f"{self.head_parameters:,} parameters"
            )
        per_round = self.num_clients
        if 0 < c.clients_per_round < self.num_clients:
            per_round = c.clients_per_round
            out.append(f"each round trains {per_round} of the {self.num_clients} clients "
                       "(clients-per-round), drawn with the seed")  # fmt: skip
        for r, (down, up) in sorted(self.messages.items()):
            out.append(
                f"round {r} of each task, per client: down {down:,} floats ({_mb(down)}), "
                f"up {up:,} floats ({_mb(up)}); clients of the round: {_mb((down + up) * per_round)}"
            )
        if c.strategy == "lorm" and c.lorm_round_grams == "mean-delta" and c.num_tasks > 1:
            out.append("rounds' down messages are the last task's, the largest: with "
                       "lorm-round-grams=mean-delta they carry every past task's factors")  # fmt: skip
        if self.end_of_task is not None:
            down, up = self.end_of_task
            out.append(f"end-of-task statistics, per client: down {down:,} floats ({_mb(down)}), "
                       f"up {up:,} floats ({_mb(up)})")  # fmt: skip
        if self.messages:
            period = len(self.messages)  # rounds alternate with this period
            rounds = sum(sum(self.messages[r % period]) for r in range(c.rounds_per_task))
            # The end-of-task statistics come from every client, the rounds from those drawn.
            per_task = rounds * per_round + sum(self.end_of_task or (0, 0)) * self.num_clients
            out.append(f"whole run, all clients: about {_mb(per_task * c.num_tasks)}")
        for problem in self.problems:
            out.append(f"the run would stop: {problem}")
        for what in self.unreachable:
            out.append(f"could not reach {what}")
        if self.unreachable:
            out.append(
                "the run itself would fail until these are reachable (internet or a local copy)"
            )
        return out


def _mb(floats: int) -> str:
    return f"{floats * BYTES_PER_FLOAT / 2**20:.2f} MiB"


def make_plan(cfg: RunConfig, num_clients: int) -> Plan:
    """Everything knowable about the run of ``cfg`` on ``num_clients`` clients."""
    from lorm_flwr.data.datasets import DataUnavailableError
    from lorm_flwr.models.backbones import BackboneUnavailableError
    from lorm_flwr.runtime import scenario_of
    from lorm_flwr.server.tracking import missing_tracker

    plan = Plan(cfg, num_clients)
    if problem := missing_tracker(cfg):
        plan.problems.append(problem)
    try:
        scenario = scenario_of(cfg, num_clients)
        plan.tasks = [list(t) for t in scenario.tasks]
        plan.shard_sizes = scenario.shard_sizes()
    except (DataUnavailableError, BackboneUnavailableError) as exc:
        plan.unreachable.append(f"the data '{cfg.dataset}': {_short(exc)}")
    layout = _layout(cfg, plan)
    if layout is not None:
        _messages(cfg, layout, plan)
    return plan


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300]


def _layout(cfg: RunConfig, plan: Plan):
    from lorm_flwr.data.datasets import DATASETS
    from lorm_flwr.models.adapters import adapter_kind, attach_lora, check_lora_rank, model_layout
    from lorm_flwr.models.backbones import BackboneUnavailableError, build_classifier
    from lorm_flwr.runtime import lora_targets

    num_classes = DATASETS[cfg.dataset].num_classes
    base = None
    try:
        base = build_classifier(
            cfg.backbone, cfg.image_size, num_classes, cfg.seed, cfg.backbone_checkpoint
        )
    except BackboneUnavailableError as exc:
        plan.unreachable.append(f"the weights of '{cfg.backbone}': {_short(exc)}")
        try:  # the architecture alone still gives every shape
            base = build_classifier(
                cfg.backbone, cfg.image_size, num_classes, cfg.seed, with_weights=False
            )
        except (BackboneUnavailableError, OSError) as exc2:
            plan.unreachable.append(f"the architecture of '{cfg.backbone}': {_short(exc2)}")
            return None
    check_lora_rank(base, lora_targets(cfg), cfg.lora_rank)
    model = attach_lora(
        base, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=lora_targets(cfg),
        kind=adapter_kind(cfg.strategy), seed=cfg.seed,
    )  # fmt: skip
    return model_layout(model)


def _messages(cfg: RunConfig, layout, plan: Plan) -> None:
    from lorm_flwr.models.adapters import group_of
    from lorm_flwr.registry import strategy_class
    from lorm_flwr.server.joint import JOINT_STRATEGIES
    from lorm_flwr.wire.limits import (
        MessageTooLarge,
        check_message_sizes,
        max_message_bytes,
        message_shapes,
    )

    def size(shapes) -> int:
        return sum(math.prod(s) for s in shapes)

    plan.adapted_layers = len(layout.layers)
    plan.head_parameters = size(s for k, s in layout.shapes.items() if group_of(k) == "head")
    plan.adapter_parameters = size(s for k, s in layout.shapes.items() if group_of(k) != "head")
    if cfg.strategy in JOINT_STRATEGIES:
        return  # no federation, no messages
    strategy = strategy_class(cfg.strategy)(cfg, layout)
    try:  # the run itself would refuse to start
        check_message_sizes(strategy, max_message_bytes(cfg))
    except MessageTooLarge as exc:
        plan.problems.append(str(exc))
    shapes = message_shapes(strategy)
    floats = {name: sum(math.prod(t) for t in s.values()) for name, s in shapes.items()}
    for r in range(min(cfg.rounds_per_task, 2)):  # rounds alternate with period <= 2
        plan.messages[r] = (floats[f"round {r} down"], floats[f"round {r} up"])
    if "end-of-task up" in floats:
        plan.end_of_task = (floats["end-of-task down"], floats["end-of-task up"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the plan of a run without training.")
    p.add_argument(
        "--clients", type=int, default=0, help="clients to plan for (default: num-clients, else 3)"
    )
    p.add_argument("--run-config", default="", help="a TOML file of run-config keys (a preset)")
    p.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = p.parse_args(argv)
    values: dict[str, Any] = {}
    if args.run_config:
        with open(args.run_config, "rb") as f:
            values.update(tomllib.load(f))
    for item in args.overrides:
        key, _, raw = item.partition("=")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw  # a bare string
    try:
        cfg = RunConfig.from_mapping(values)
    except ConfigError as exc:  # the app's own message, e.g. the closest key to a misspelt one
        raise SystemExit(f"error: {exc}") from None
    try:
        plan = make_plan(cfg, args.clients or cfg.num_clients or 3)
    except ValueError as exc:  # ConfigError (an impossible split), unmatched lora-targets
        raise SystemExit(f"error: {exc}") from None
    for line in plan.lines():
        print(line)


if __name__ == "__main__":
    main()
