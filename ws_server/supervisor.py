"""``serve --workers N``: N server processes on one port, supervised.

The supervisor reserves the port (a bound socket with ``SO_REUSEPORT`` that never listens,
so it gets no connections) and starts N ``anything-agent serve`` processes that each listen
on it with ``SO_REUSEPORT``; the kernel spreads new connections over them. It replaces a
process that dies (with backoff), relays reloads (a process that reloaded writes its index
to a pipe; the others get SIGHUP and reload too), and on SIGTERM or SIGINT passes the
signal on and waits until every process has drained. It runs no event loop and no model.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Final

from ws_server.settings import ServerSettings

log = logging.getLogger("anything_agent.supervisor")

BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0  # a process that lived this long resets the backoff
TICK: Final = 0.2


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None
    restarts: int = field(default=0)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) with SO_REUSEPORT, so the port is ours and, if it was 0,
    chosen; the server processes bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Runs and watches the server processes of one ``serve --workers N``."""

    def __init__(self, settings: ServerSettings, argv: list[str]) -> None:
        self.settings = settings
        self.argv = argv  # the serve options as given, passed on to every process
        self.children = [_Child(index) for index in range(1, settings.workers + 1)]
        self.stopping = 0  # signals received
        self._reserved: socket.socket | None = None
        self._reload_read, self._reload_write = os.pipe()
        os.set_blocking(self._reload_read, False)
        self.port = 0

    def run(self) -> int:
        """Start every process, watch them until a stop signal, then drain them all."""
        self._reserved = reserve_port(self.settings.host, self.settings.port)
        self.port = self._reserved.getsockname()[1]
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        log.info(
            "supervising %d server processes on %s:%d (SO_REUSEPORT)",
            len(self.children),
            self.settings.host,
            self.port,
        )
        for child in self.children:
            self._start(child)
        try:
            while not self.stopping:
                self._relay_reloads()
                self._replace_the_dead()
        finally:
            code = self._drain()
            self._reserved.close()
            os.close(self._reload_read)
            os.close(self._reload_write)
        return code

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping += 1
        for child in self.children:  # a second signal reaches them too: cancel at once
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signum)

    # ------------------------------------------------------------------ processes
    def _start(self, child: _Child) -> None:
        command = [
            sys.executable,
            "-m",
            "ws_server",
            "serve",
            *self.argv,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--worker-index",
            str(child.index),
            "--supervisor-fd",
            str(self._reload_write),
            "--supervisor-pid",
            str(os.getpid()),
        ]
        child.process = subprocess.Popen(command, pass_fds=(self._reload_write,))
        child.started = time.monotonic()
        child.restart_at = None
        log.info("server process %d started (pid %d)", child.index, child.process.pid)

    def _replace_the_dead(self) -> None:
        if self.stopping:  # exits now are the drain's, not crashes
            return
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is not None and child.restart_at is None:
                if now - child.started > STABLE_AFTER:
                    child.backoff = BACKOFF_FIRST
                log.error(
                    "server process %d (pid %d) exited with %s; replacing it in %.1f s",
                    child.index,
                    process.pid,
                    process.returncode,
                    child.backoff,
                )
                child.restart_at = now + child.backoff
                child.backoff = min(child.backoff * 2, BACKOFF_MAX)
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._start(child)

    def _relay_reloads(self) -> None:
        """Wait a tick for a process to say it reloaded; have the others reload too."""
        try:
            ready, _, _ = select.select([self._reload_read], [], [], TICK)
        except InterruptedError:  # a signal: the loop looks at it
            return
        if not ready:
            return
        try:
            data = os.read(self._reload_read, 4096)
        except BlockingIOError:
            return
        for token in data.split():
            origin = int(token) if token.isdigit() else 0
            for child in self.children:
                if child.index != origin and child.process and child.process.poll() is None:
                    child.process.send_signal(signal.SIGHUP)
            log.info("process %d reloaded: the others reload too", origin)

    def _drain(self) -> int:
        """Wait until every process has shut down (each drains its own sessions)."""
        code = 0
        for child in self.children:
            if child.process is None:
                continue
            if child.process.poll() is None and not self.stopping:
                child.process.send_signal(signal.SIGTERM)
            returncode = child.process.wait()
            if returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
                code = 1
        log.info("all server processes stopped")
        return code


def die_with_supervisor(supervisor: int | None) -> None:
    """From a supervised server process: be stopped when the supervisor dies, even by
    kill -9, so no server process outlives it (Linux; elsewhere a no-op). ``supervisor``
    is its pid: if it is already gone when we get here, we stop at once."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if supervisor is not None and os.getppid() != supervisor:  # it died before prctl
        raise SystemExit(0)


def notify_reloaded(settings: ServerSettings) -> None:
    """From a supervised server process: tell the supervisor this process reloaded."""
    if settings.supervisor_fd is None or settings.worker_index is None:
        return
    try:
        os.write(settings.supervisor_fd, f"{settings.worker_index}\n".encode())
    except OSError as exc:
        log.error("could not tell the supervisor about the reload: %s", exc)
