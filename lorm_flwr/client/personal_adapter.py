"""FedSA's end product on each node: its personalised adapter (the shared A, its own B
and head), written where the node's user finds it. Nothing of it leaves the node."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorm_flwr.client.round import client_tensors
from lorm_flwr.config import RunConfig
from lorm_flwr.models.export import export_adapter
from lorm_flwr.runtime import model_of, scenario_of

__all__ = ["personal_adapter_folder", "write_personal_adapter"]

log = logging.getLogger(__name__)


def personal_adapter_folder(cfg: RunConfig, run_folder_name: str, partition_id: int) -> Path:
    """``<output-dir>/<run folder>/clients/partition-<K>/adapter`` on this node; in a
    simulation, inside the server's own run folder."""
    return cfg.output_root / run_folder_name / "clients" / f"partition-{partition_id}" / "adapter"


def write_personal_adapter(
    cfg: RunConfig,
    partition_id: int,
    num_partitions: int,
    global_tensors: dict[str, torch.Tensor],
    local_tensors: dict[str, torch.Tensor] | None,
    run_folder_name: str,
    metrics: dict,
) -> Path:
    """Export the global parts plus this client's own parts as a peft adapter folder
    (:func:`lorm_flwr.models.export.export_adapter`); returns the folder."""
    tensors = client_tensors(cfg, global_tensors, local_tensors)
    folder = personal_adapter_folder(cfg, run_folder_name, partition_id)
    tasks = [list(t) for t in scenario_of(cfg, num_partitions).tasks]
    export_adapter(model_of(cfg), tensors, folder, cfg, tasks, metrics)  # loads the tensors
    log.info("lorm-flwr: partition %d's personalised adapter in %s", partition_id, folder)
    return folder
