"""A private redis-server on a unix socket: for ``anything-agent cluster``, the tests and
the benchmarks (never a shared or system Redis; nothing kept on disk)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Final

POLL: Final = 0.02


class RedisUnavailable(RuntimeError):
    """redis-server could not be started (the message says why)."""


class RedisServer:
    """``redis-server`` (Debian's ``redis-server`` package) listening only on
    ``directory/redis.sock``, started and stopped by its owner."""

    def __init__(self, binary: Path, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start it (again, on the same socket: empty, as a Redis without persistence)
        and wait until it answers PING."""
        if self.running:
            raise RedisUnavailable("redis-server is already running")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [
            str(self.binary),
            *("--port", "0"),  # no TCP at all: the unix socket only
            *("--unixsocket", str(self.socket_path)),
            *("--unixsocketperm", "700"),
            *("--save", ""),
            *("--appendonly", "no"),
            *("--daemonize", "no"),
            *("--dir", str(self.directory)),
            *("--logfile", str(self.directory / "redis.log")),
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        )
        self._wait(timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL past ``timeout``; always reaped."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            try:
                process.terminate()
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def _wait(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        problem = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.directory / "redis.log"
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RedisUnavailable(
                    f"redis-server exited with {self.process.returncode}:\n{text}"
                )
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect(str(self.socket_path))
                    probe.sendall(b"PING\r\n")
                    answer = probe.recv(64)
                if answer.startswith(b"+PONG"):
                    return
                problem = repr(answer)
            except OSError as exc:
                problem = str(exc)
            time.sleep(POLL)
        self.stop()
        raise RedisUnavailable(
            f"redis-server did not answer PING within {timeout:.0f} s: {problem}"
        )
