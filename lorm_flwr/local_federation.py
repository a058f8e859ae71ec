"""Run the app for real on this machine: a simulation SuperLink on 127.0.0.1 that
this process owns, then ``flwr run``. Used by the integration tests and benchmarks.

The SuperLink is started in its own process session and always stopped by its
PID (with its whole process group), even when the caller fails.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the app (pyproject.toml) in a source checkout
BIN = Path(sys.executable).parent


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
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


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
def simulation_superlink(tmp: Path) -> Iterator[Federation]:
    home = tmp / "flwr-home"
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
