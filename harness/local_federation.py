"""Run the app for real on this machine: a simulation SuperLink on 127.0.0.1 that
this process owns, then ``flwr run``. Used by the integration tests and benchmarks.

The SuperLink is started in its own process session and always stopped by its
PID (with its whole process group), even when the caller fails or is sent SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the app (pyproject.toml) in a source checkout
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (in the main thread), so the ``finally``
    that stops our servers runs: by default the process would end at once and leave them,
    in sessions of their own, running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.3)
    raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{port}")


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group that ``proc`` leads, SIGKILL it after ``grace`` s; what is
    left of the group once its leader has exited is killed too."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def processes_mentioning(text: str) -> list[int]:
    """PIDs (not this process) whose command line contains ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@dataclass
class Federation:
    env: dict[str, str]
    connection: str
    home: Path
    session: int

    def command(
        self,
        run_config: dict,
        num_supernodes: int,
        cpus_per_client: float = 1,
        run_config_files: tuple[str, ...] = (),
        app: Path = ROOT,
    ) -> list[str]:
        """The ``flwr run`` command line of ``app`` (this app by default) with
        ``run_config`` (after any preset ``run_config_files``)."""
        if not run_config_files:  # the experiment's client count follows the federation's
            run_config = {"num-clients": num_supernodes, **run_config}
        items = " ".join(
            f"{k}='{v}'"
            if isinstance(v, str)
            else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in run_config.items()
        )
        cmd = [
            str(BIN / "flwr"), "run", str(app), self.connection, "--stream",
            "--federation-config", f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client}",
            # Flower takes either TOML files or key=value pairs, not both.
            *[arg for f in run_config_files for arg in ("--run-config", f)],
            *(["--run-config", items] if items else []),
        ]  # fmt: skip
        return cmd

    def run(
        self,
        run_config: dict,
        num_supernodes: int,
        timeout: float = 900,
        cpus_per_client: float = 1,
        run_config_files: tuple[str, ...] = (),
        app: Path = ROOT,
    ) -> subprocess.CompletedProcess:
        """``flwr run`` to the end (see :meth:`command`)."""
        cmd = self.command(run_config, num_supernodes, cpus_per_client, run_config_files, app)
        return subprocess.run(
            cmd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
            check=False,
        )

    def run_status(self) -> list[dict]:
        """``flwr ls`` of this SuperLink: every run with its status (e.g. ``finished:failed``)."""
        out = subprocess.run(
            [str(BIN / "flwr"), "ls", self.connection, "--format", "json"],
            env=self.env, capture_output=True, text=True, timeout=120, cwd=self.home, check=False,
        )  # fmt: skip
        return list(json.loads(out.stdout).get("runs", []))

    def kill(self) -> int:
        """SIGKILL the SuperLink and every process under it (ServerApp, Ray, client
        actors), as a crash would: nothing gets to clean up. Returns how many died."""
        killed = 0
        # The SuperLink dies last: its orphans would no longer be found by parent links.
        for last in (False, False, True):  # processes may fork while we kill
            pids = [
                p for p in self._descendants() if p != os.getpid() and (last or p != self.session)
            ]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            time.sleep(0.5)
        return killed

    def _descendants(self) -> list[int]:
        parents = _process_parents()
        out = []
        for pid in parents:
            p, hops = pid, 0
            while p > 1 and p != self.session and hops < 64:
                p, hops = parents.get(p, 0), hops + 1
            if p == self.session:
                out.append(pid)
        return out

    def process_memory(self) -> int:
        """Resident memory (bytes) of the SuperLink and all its descendants: the
        ServerApp, Ray's daemons and the client actors. Ray starts some of them in
        sessions of their own, so they are found by parent links, not by session.
        """
        page = os.sysconf("SC_PAGE_SIZE")
        total = 0
        for pid in self._descendants():
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, ValueError, IndexError):
                continue
        return total


def _process_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return parents


@contextlib.contextmanager
def simulation_superlink(
    tmp: Path, extra_env: dict[str, str] | None = None
) -> Iterator[Federation]:
    """A simulation SuperLink on 127.0.0.1; ``extra_env`` reaches it and the simulation it
    starts (e.g. ``RAY_ADDRESS`` of a running Ray cluster, see :func:`ray_cluster`)."""
    with _sigterm_unwinds(), _simulation_superlink(tmp, extra_env) as federation:
        yield federation


@contextlib.contextmanager
def _simulation_superlink(tmp: Path, extra_env: dict[str, str] | None) -> Iterator[Federation]:
    home = (tmp / "flwr-home").resolve()  # absolute: the SuperLink runs in it (below)
    home.mkdir(parents=True, exist_ok=True)
    port, control = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    ray_tmp = tempfile.mkdtemp(prefix="lfr-ray-", dir="/tmp")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # Ray's AF_UNIX socket paths must stay under 107 bytes: pytest's tmp is too deep.
        RAY_TMPDIR=ray_tmp,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra_env or {})
    log = open(tmp / "superlink.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-api-address",
            f"127.0.0.1:{control}",
            "--database",
            str(home / "state.db"),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # Not the caller's folder: Flower hands the simulation's sys.path to Ray's actors, and
        # Ray puts the driver's working folder on their path too, so a client_app.py there
        # was imported instead of the app's own (`--against` another checkout ran this one's).
        cwd=home,
    )
    try:
        _wait_for_port(port, proc)
        yield Federation(env=env, connection="test", home=home, session=proc.pid)
    finally:
        stop_process_group(proc)
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def load_results(output_dir: Path) -> tuple[Path, dict]:
    runs = sorted(p for p in output_dir.iterdir() if (p / "results.json").exists())
    assert runs, f"no results.json under {output_dir}"
    folder = runs[-1]
    return folder, json.loads((folder / "results.json").read_text())


@dataclass
class RayCluster:
    address: str  # host:port of the head's GCS
    temp_dir: Path  # RAY_TMPDIR of every node of this cluster
    pids: list[int]  # `ray start --block` of the head, then of each worker

    @property
    def env(self) -> dict[str, str]:
        """What a simulation needs to run on this cluster instead of a private Ray."""
        return {"RAY_ADDRESS": self.address, "RAY_TMPDIR": str(self.temp_dir)}


def _ray_nodes_alive(address: str, env: dict[str, str]) -> int:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else 0


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[RayCluster]:
    """A multi-node Ray cluster on this machine: a head and ``nodes - 1`` workers, each its
    own raylet with ``cpus_per_node`` CPUs, all given 127.0.0.1 as their node address.

    Each node is one ``ray start --block`` process in a session of its own, stopped by
    its PID (with its process group) on exit, workers first. (Ray's GCS and raylets listen
    on every interface; Ray has no setting to bind them to one.)
    """
    with _sigterm_unwinds(), _ray_cluster(nodes, cpus_per_node) as cluster:
        yield cluster


@contextlib.contextmanager
def _ray_cluster(nodes: int, cpus_per_node: int) -> Iterator[RayCluster]:
    temp = Path(tempfile.mkdtemp(prefix="lfr-rc-", dir="/tmp"))  # short: AF_UNIX path limit
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--block"]

    def start(args: list[str], name: str) -> None:
        log = open(temp / f"{name}.log", "w")  # noqa: SIM115 - the process owns it
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", *args, *common], env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        log.close()

    try:
        start(["--head", f"--port={port}", "--include-dashboard=false",
               f"--temp-dir={temp}"], "head")  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # the head's GCS port answers
            if procs[0].poll() is not None:
                raise RuntimeError(f"ray head exited early; see {temp / 'head.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray head did not listen on {address}")
            time.sleep(0.3)
        for k in range(1, nodes):
            start([f"--address={address}"], f"worker-{k}")
        while (alive := _ray_nodes_alive(address, env)) < nodes:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a ray node exited early; see the logs under {temp}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{alive} of {nodes} ray nodes joined {address}")
            time.sleep(1.0)
        yield RayCluster(address, temp, [p.pid for p in procs])
    finally:
        for proc in reversed(procs):
            stop_process_group(proc, grace=30)
        # Ray starts some daemons in sessions of their own; they all name the temp folder.
        for pid in processes_mentioning(str(temp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
