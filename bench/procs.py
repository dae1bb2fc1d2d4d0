"""Server processes for the bench: started pinned to their own core, watched through /proc,
stopped with everything they started.

The load generator runs on CPU 0 and every server on CPU 1 (where there are two cores or
more), so client and server never compete for a core and a server's figures are what one
core of it does. A server's log goes to a file, not a pipe the client would have to drain
on its own core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import redis

LISTENING: Final = re.compile(r"listening on ws://[\d.]+:(\d+)")
CLIENT_CPU: Final = 0
SERVER_CPU: Final = 1
_PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


def pin(cpu: int) -> None:
    """Run the calling process on ``cpu`` alone, when the machine has more than one."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def running_on(cpus: Iterable[int] | None = None) -> Iterator[None]:
    """Run the calling thread, and the processes it starts meanwhile, on ``cpus`` (default:
    every CPU), where the machine has more than one."""
    if not hasattr(os, "sched_getaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, range(os.cpu_count() or 1) if cpus is None else cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (capped by the hard
    limit) and return the soft limit now in force. Servers started afterwards inherit it,
    which is how they can hold as many sessions as the client opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def busy() -> float:
    """CPU seconds the whole machine has spent busy (not idle or waiting for I/O) since boot,
    every process counted, the bench's or not."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Server:
    """A started server: its process, the port it listens on, its log file."""

    def __init__(self, process: subprocess.Popen[Any], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @property
    def pids(self) -> list[int]:
        """The server and every process below it (an isolated worker, a spawned runner, the
        server processes of a ``--workers`` supervisor)."""
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text()
                    todo.extend(int(child) for child in children.split())
        return found

    def rss_kib(self) -> int:
        """Resident memory of the whole process tree, in KiB."""
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_KIB
        return total

    def cpu_ticks(self) -> int:
        """CPU time (user + system, in clock ticks) the process tree has used so far."""
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        return total

    def write_calls(self) -> int:
        """Write system calls (write, writev, sendmsg...) the process tree has made so far:
        per chunk, it shows whether a server batches frames into fewer socket writes."""
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                    if line.startswith("syscw:"):
                        total += int(line.split()[1])
        return total

    async def settle(self, quiet: float = 0.1, limit: float = 30.0) -> None:
        """Wait until the server has finished what the last mode left it (closing
        thousands of sessions, spawned processes): under 10 % of a core for ``quiet`` s, or
        ``limit`` s at most."""
        allowance = max(1, int(quiet * os.sysconf("SC_CLK_TCK") / 10))
        deadline = time.monotonic() + limit
        before = self.cpu_ticks()
        while time.monotonic() < deadline:
            await asyncio.sleep(quiet)
            now = self.cpu_ticks()
            if now - before <= allowance:
                return
            before = now

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL for whatever is left in its group."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own group: see start()
        self.process.wait()


def start(
    command: Sequence[str],
    log: Path,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    listeners: int = 1,
) -> Server:
    """Start a server on ``SERVER_CPU`` and return it once its log says where it listens.

    It gets a process group of its own (so a Ctrl-C at the terminal reaches only the
    runner, which stops it) and inherits the runner's RLIMIT_NOFILE; ``env`` adds to (or
    overrides) the runner's environment, ``cwd`` is where it starts (default: here).
    Whatever it starts inherits its CPU and its group: a ``serve --workers N`` supervisor's
    server processes run on ``SERVER_CPU`` too, count in ``rss_kib``, ``cpu_ticks`` and
    ``write_calls`` (its whole tree), and go with it in ``stop``. ``listeners`` is how many
    of its processes log "listening on" (N: each on the port the supervisor reserved):
    it is returned once all have, so no load starts while one process alone accepts.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            env={**os.environ, **env} if env else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            start_new_session=True,
            preexec_fn=lambda: pin(SERVER_CPU),
        )
    server = Server(process, 0, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ports = LISTENING.findall(log.read_text(errors="replace"))
        if len(ports) >= listeners:
            if len(set(ports)) > 1:
                server.stop()
                found = sorted(set(ports))
                raise RuntimeError(f"{' '.join(command)}: its processes listen on ports {found}")
            server.port = int(ports[0])
            return server
        if process.poll() is not None:
            server.stop()  # whatever it started before it exited goes with it
            raise RuntimeError(
                f"{command[-1]} exited with {process.returncode}:\n{server.log_tail()}"
            )
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(
        f"{' '.join(command)}: {listeners} process(es) did not listen within {timeout:g} s"
    )


def redis_used_kib(socket: Path) -> float:
    """What the Redis listening on ``socket`` holds (``INFO memory``'s ``used_memory``),
    less its clients' buffers (which grow with the connections a server opens, not with
    the sessions it keeps)."""
    with redis.Redis(unix_socket_path=str(socket)) as client:
        memory = client.info("memory")
    return float(memory["used_memory"] - memory["mem_clients_normal"]) / 1024
