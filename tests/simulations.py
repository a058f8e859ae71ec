"""The integration tests' shared simulation settings and runner."""

from __future__ import annotations

TINY = {
    "dataset": "digits",
    "backbone": "vit-tiny",
    "num-tasks": 2,
    "rounds-per-task": 1,
    "local-epochs": 1,
    "batch-size": 32,
    "image-size": 16,
    "lora-rank": 2,
    "lora-alpha": 2.0,
    "seed": 1,
}
ALL_STRATEGIES = [
    "fedit", "lorm", "fedsa", "fedsa-rslora", "fedsa-vera", "ffa", "regmean", "joint", "joint-incremental",
]  # fmt: skip
# The session's one run per strategy: LoRM runs 2 rounds per task (a B-round and an
# A-round), the others 1. Three of them track (read back in test_simulation; LoRM's
# MLflow run also in test_resume, killed and resumed).
TRACKED = {"lorm": "mlflow", "fedit": "tensorboard", "joint-incremental": "wandb"}
# FedSA-VeRA's shared run also runs the FedSA reference's schedule keys (test_fidelity).
FEDSA_REFERENCE_STEPS = {"local-steps": 3, "lora-dropout": 0.05, "warmup-steps": 2,
                         "fedsa-weighted": False, "lr-a": 0.003}  # fmt: skip
SHARED_RUN = {
    s: {
        **TINY, "strategy": s, **({"rounds-per-task": 2} if s == "lorm" else {}),
        **({"tracking": TRACKED[s]} if s in TRACKED else {}),
        **(FEDSA_REFERENCE_STEPS if s == "fedsa-vera" else {}),
    }
    for s in ALL_STRATEGIES
}  # fmt: skip
SHARED_CLIENTS = 2


def run_app(federation, out, num_clients, cfg, **kwargs):
    """``flwr run`` of ``cfg`` to the end; returns (run folder, results, process)."""
    from harness.local_federation import load_results

    proc = federation.run({**cfg, "output-dir": str(out)}, num_supernodes=num_clients, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.exists(), proc.stdout[-5000:] + proc.stderr[-3000:]
    folder, results = load_results(out)
    assert results["status"] == "completed", proc.stdout[-3000:]
    return folder, results, proc
