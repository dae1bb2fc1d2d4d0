"""A private single-node Ray cluster (``ray start --head --block``) on loopback: for the
tests and the benchmarks of the Ray placement. Every port Ray would otherwise take at a
fixed default is a free one, its files live in its own directory, nothing is reported
anywhere, and stopping it stops every process it started (its own process group).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

POLL: Final = 0.1
# ray start's options that take a port, each given a free one (the worker ports are a range).
_PORT_OPTIONS: Final = (
    "--port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-port",
)
# Ports Ray reads from the environment instead.
_PORT_VARIABLES: Final = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
# Without it, Ray swaps 127.0.0.1 for the machine's routable address (so that other nodes
# could join) and listens there; with it, as on a laptop, the node and every process that
# talks to it stay on loopback. Its clients (the server) need it too: see client_env.
_LOOPBACK_ONLY: Final = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class RayUnavailable(RuntimeError):
    """The Ray head could not be started (the message says why)."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RayHead:
    """A Ray head node on 127.0.0.1, its temporary files under ``directory``."""

    def __init__(self, directory: Path, num_cpus: int = 8, object_store_bytes: int = 80_000_000):
        self.directory = directory
        self.num_cpus = num_cpus
        self.object_store_bytes = object_store_bytes
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """What ``serve --ray-address`` takes."""
        return f"127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a process connecting to this head adds to its environment (a driver that
        looked for its node at the machine's routable address would not find it)."""
        return {**_LOOPBACK_ONLY, "RAY_USAGE_STATS_ENABLED": "0"}

    def start(self, timeout: float = 90.0) -> None:
        """Start the head and wait until its GCS accepts connections."""
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray is None:
            raise RayUnavailable("the ray command is not installed (pip install '.[ray]')")
        self.directory.mkdir(parents=True, exist_ok=True)
        ports = free_ports(len(_PORT_OPTIONS) + len(_PORT_VARIABLES))
        self.port = ports[0]
        command = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        command += [f"{option}={port}" for option, port in zip(_PORT_OPTIONS, ports, strict=False)]
        command += [
            "--include-dashboard=false",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--temp-dir={self.directory}",
        ]
        environment = {
            **os.environ,
            **self.client_env,
            "RUNTIME_ENV_RETRY_TIMES": "1",  # a broken requirements.txt fails once, not thrice
            **dict(zip(_PORT_VARIABLES, map(str, ports[len(_PORT_OPTIONS) :]), strict=True)),
        }
        with open(self.directory / "ray-start.log", "wb") as log:  # the child keeps its own
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                process_group=0,  # stop() ends the whole group, workers included
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RayUnavailable(f"ray start exited:\n{self.log()}")
            if "Ray runtime started" in self.log():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), 1),
                ):
                    return
            time.sleep(POLL)
        self.stop()
        raise RayUnavailable(f"the Ray head did not start within {timeout:g} s:\n{self.log()}")

    def log(self) -> str:
        path = self.directory / "ray-start.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM to the head's process group, then, past ``timeout``, SIGKILL to it and
        to every process it started (Ray's workers run in sessions of their own)."""
        process = self.process
        if process is None:
            return
        started = _descendants(process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        for pid in started | _descendants(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.process = None


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (by parent pid, from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
