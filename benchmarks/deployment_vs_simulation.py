"""Wall time of the first 2 rounds of the default scenario: deployment against simulation.

Both engines run the app's defaults (LoRM, MNIST, EfficientNet-Lite0, 3 clients) on
this machine. Deployment: ``scripts/deploy_local.sh`` starts a SuperLink and 3
SuperNodes on 127.0.0.1 first (long-lived in a real deployment, so not timed), then
``flwr run . local-deploy``; once with every message handled in its fresh ClientApp
process (``LORM_FLWR_NODE_WORKER=0``), once through each node's long-lived worker
(``lorm_flwr/client/node_worker.py``, the script's default). Simulation: a simulation
SuperLink, then ``flwr run`` (Ray and its actors start inside the timed span, as they
do for every simulated run). Each row starts with an empty node cache of its own
(``LORM_FLWR_CACHE``), so each pays its first data preparation once. Timed: from
``flwr run`` until ``results.json`` holds round 2 (the first task's two rounds), plus
the server-side time of those rounds from ``results.json``; "round 2 alone" is one
training message per client, its merge and the evaluation (the end-of-task query comes
after it). The run is then stopped (``flwr stop``, then the script's ``stop``).

    python benchmarks/deployment_vs_simulation.py --repeats 5 --out benchmarks/results/deployment_vs_simulation

Rows alternate (simulation, process per message, node worker, then again), each run in
a fresh temporary folder; the table gives each row's medians and the median of the
repeats' deployment/simulation ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.local_federation import BIN, processes_mentioning, simulation_superlink

ROUNDS = 2
CLIENTS = 3


def _wait_rounds(out: Path, runner: subprocess.Popen, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in out.glob("*/results.json"):
            try:
                results = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if len(results["rounds"]) >= ROUNDS:
                return results
        if runner.poll() is not None:
            raise RuntimeError(f"flwr run ended early: {runner.communicate()}")
        time.sleep(0.2)
    raise TimeoutError("round 2 never finished")


def _measure(cmd: list[str], env: dict, cwd: Path, out: Path) -> dict:
    start = time.perf_counter()
    runner = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        results = _wait_rounds(out, runner)
        wall = time.perf_counter() - start
    finally:
        runner.kill()
        runner.wait()
    r1, r2 = results["rounds"][0], results["rounds"][1]
    return {
        "wall_seconds_to_round_2": wall,
        "server_seconds_rounds_1_2": r2["elapsed_seconds"],
        "round_2_seconds": r2["elapsed_seconds"] - r1["elapsed_seconds"],
        "client_training_seconds_max": [
            r1["client_train_seconds_max"],
            r2["client_train_seconds_max"],
        ],
    }


def simulation(tmp: Path) -> dict:
    with simulation_superlink(
        tmp / "sim", extra_env={"LORM_FLWR_CACHE": str(tmp / "cache-sim")}
    ) as fed:
        out = tmp / "sim-runs"
        cmd = fed.command({"output-dir": str(out)}, num_supernodes=CLIENTS)
        try:
            return _measure(cmd, fed.env, fed.home, out)
        finally:
            fed.kill()


def deployment(tmp: Path, worker: bool) -> dict:
    name = "worker" if worker else "process"
    state, out = tmp / f"deploy-{name}", tmp / f"deploy-{name}-runs"
    env = dict(os.environ)
    env.update(LORM_FLWR_NODE_WORKER="1" if worker else "0",
               LORM_FLWR_CACHE=str(tmp / f"cache-{name}"))  # fmt: skip
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    script = str(ROOT / "scripts" / "deploy_local.sh")
    subprocess.run([script, "start", str(CLIENTS), str(state)], check=True, env=env, timeout=180)
    try:
        cmd = [str(BIN / "flwr"), "run", str(ROOT), "local-deploy", "--stream",
               "--run-config", f"output-dir='{out}'"]  # fmt: skip
        return _measure(cmd, {**env, "FLWR_HOME": str(state / "flwr-home")}, tmp, out)
    finally:
        _stop_runs({**env, "FLWR_HOME": str(state / "flwr-home")}, tmp)
        subprocess.run([script, "stop", str(state)], env=env, timeout=180, check=False)


def _stop_runs(env: dict, cwd: Path) -> None:
    """Stop the deployment's unfinished runs through Flower: the ServerApp process that
    Flower's SuperExec started for a run lives in a session of its own, so stopping the
    SuperLink and SuperNodes alone leaves it behind."""
    flwr = str(BIN / "flwr")
    listed = subprocess.run([flwr, "list", "local-deploy", "--format", "json"], env=env,
                            cwd=cwd, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    try:
        runs = json.loads(listed.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        print(f"could not list the runs to stop them: {listed.stdout[-500:]}", file=sys.stderr)
        return
    for run in runs:
        if not str(run.get("status", "")).startswith("finished"):
            subprocess.run([flwr, "stop", str(run["run-id"]), "local-deploy"], env=env, cwd=cwd,
                           capture_output=True, timeout=120, check=False)  # fmt: skip
    # The ServerApp notices the stop within seconds; the SuperLink must still be up then.
    address = re.search(
        r'address = "([^"]+)"', (Path(env["FLWR_HOME"]) / "config.toml").read_text()
    )
    deadline = time.monotonic() + 60
    while address and _server_apps(address.group(1)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _server_apps(address.group(1)) if address else []:
        print(f"killing ServerApp {pid}: still running 60 s after flwr stop", file=sys.stderr)
        os.kill(pid, signal.SIGKILL)


def _server_apps(address: str) -> list[int]:
    """PIDs of the ServerApp processes connected to the SuperLink at ``address``."""
    pids = []
    for pid in processes_mentioning(address):
        try:
            if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


ROWS = {
    "simulation": simulation,
    "deployment, a process per message": lambda t: deployment(t, worker=False),
    "deployment, node worker": lambda t: deployment(t, worker=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs of each row, alternating")
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    runs: dict[str, list[dict]] = {name: [] for name in ROWS}
    for repeat in range(args.repeats):
        for name, fn in ROWS.items():  # alternating: each repeat runs every row once
            with tempfile.TemporaryDirectory(prefix="lfr-dvs-") as tmp:
                runs[name].append(fn(Path(tmp)))
            print(
                f"repeat {repeat + 1}/{args.repeats}", name, json.dumps(runs[name][-1]), flush=True
            )
    lines = [
        (
            "| engine | flwr run to end of round 2 (s) | server time, rounds 1-2 (s) "
            "| round 2 alone (s) | round 2 against simulation's (median of the repeats' ratios) |"
        ),
        "|---|---|---|---|---|",
    ]
    sim = [r["round_2_seconds"] for r in runs["simulation"]]
    summary = {}
    for name, rs in runs.items():
        ratios = [r["round_2_seconds"] / base for r, base in zip(rs, sim, strict=True)]
        summary[name] = {
            "wall_seconds_to_round_2": statistics.median(r["wall_seconds_to_round_2"] for r in rs),
            "server_seconds_rounds_1_2": statistics.median(
                r["server_seconds_rounds_1_2"] for r in rs
            ),
            "round_2_seconds": statistics.median(r["round_2_seconds"] for r in rs),
            "round_2_seconds_all": [r["round_2_seconds"] for r in rs],
            "ratio_to_simulation": statistics.median(ratios),
            "ratios": ratios,
        }
        m = summary[name]
        lines.append(f"| {name} | {m['wall_seconds_to_round_2']:.0f} | {m['server_seconds_rounds_1_2']:.0f} | "
                     f"{m['round_2_seconds']:.1f} ({min(m['round_2_seconds_all']):.1f}-"
                     f"{max(m['round_2_seconds_all']):.1f}) | {m['ratio_to_simulation']:.2f}x "
                     f"({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
    lines.append(f"\nMedians of {args.repeats} repeats (range in brackets), rows alternating.")
    print("\n".join(lines))
    if args.out:
        Path(args.out).with_suffix(".json").write_text(
            json.dumps({"repeats": args.repeats, "summary": summary, "runs": runs}, indent=2)
        )
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
