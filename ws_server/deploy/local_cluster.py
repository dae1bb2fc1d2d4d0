"""Several nodes on one machine: a Redis, N ``anything-agent serve`` nodes and nginx.

``LocalCluster`` is what ``anything-agent cluster`` runs and what the several-node tests
start: a private ``redis-server`` on a unix socket (no TCP port at all), nodes on free
loopback ports sharing it (``ANYTHING_AGENT_REDIS_URL``, never a flag: argv is public),
and nginx round-robin in front (``render_nginx_config``). Everything lives in one
temporary directory, which ``stop()`` removes with every process it started, also when
``start()`` failed halfway.

    with LocalCluster(nodes=3, models_dir=Path("models")) as cluster:
        print(cluster.ws_url)            # ws://127.0.0.1:PORT, nginx
        cluster.nodes[0].kill()          # SIGKILL one node...
        cluster.nodes[0].restart()       # ...and start it again, same port and node id
        cluster.redis_stop(); cluster.redis_start()

Children run in process groups of their own: a Ctrl-C on the terminal reaches only the
process that owns the cluster, which then stops them in order (nginx, the nodes, Redis).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TextIO

from ws_server.deploy.nginx import render_nginx_config, worker_user
from ws_server.deploy.redis_server import RedisServer, RedisUnavailable

HOST: Final = "127.0.0.1"
REDIS_URL_ENV: Final = "ANYTHING_AGENT_REDIS_URL"
INSTALL_HINT: Final = "sudo apt-get install -y redis-server nginx"
# Where Debian puts binaries that an ordinary user's PATH often lacks.
SYSTEM_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin", "/usr/local/bin")
SUN_PATH_MAX: Final = 107  # a unix socket's path, without its terminating NUL
LISTENING: Final = "listening on ws://"
POLL: Final = 0.02


class ClusterError(RuntimeError):
    """The cluster could not start (the message says which part and why)."""


def find_program(name: str, package: str) -> Path:
    """``name`` on PATH or in the system directories, or ``ClusterError`` naming its
    Debian package."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SYSTEM_DIRS))
    if found is None:
        raise ClusterError(
            f"{name} is not installed (Debian package {package}); install both with: {INSTALL_HINT}"
        )
    return Path(found)


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nginx binds
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise ClusterError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None


def _stop_process(process: subprocess.Popen[str], timeout: float, signalled: bool = False) -> None:
    """SIGTERM (unless ``signalled`` already: a second one means "cancel running turns
    now" to a node), wait up to ``timeout``, then SIGKILL; always reaped."""
    if process.poll() is None:
        try:
            if not signalled:
                process.terminate()
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ClusterNode:
    """One ``anything-agent serve`` of the cluster, its output captured line by line."""

    def __init__(
        self,
        index: int,
        port: int,
        command: list[str],
        env: dict[str, str],
        echo: TextIO | None,
        stop_timeout: float,
    ) -> None:
        self.index = index
        self.node_id = f"node-{index}"
        self.port = port
        self.log_lines: list[str] = []  # across restarts, in order
        self._command = command
        self._env = env
        self._echo = echo
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[str] | None = None
        self._sigterm_sent = False
        self._pumps: list[threading.Thread] = []
        self._started_at_line = 0

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ClusterNode {self.node_id} 127.0.0.1:{self.port} {state}>"

    @property
    def process(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise ClusterError(f"{self.node_id} was never started")
        return self._process

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def launch(self) -> None:
        """Start the process (not waiting for it: see ``wait_ready``)."""
        if self.running:
            raise ClusterError(f"{self.node_id} is already running")
        self._started_at_line = len(self.log_lines)
        process = subprocess.Popen(
            self._command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=self._env,
            process_group=0,
        )
        self._process = process
        self._sigterm_sent = False
        pump = threading.Thread(
            target=self._pump, args=(process,), name=f"{self.node_id}-log", daemon=True
        )
        pump.start()
        self._pumps.append(pump)

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with process.stdout:
            for raw in process.stdout:
                line = raw.rstrip("\n")
                self.log_lines.append(line)
                if self._echo is not None:
                    print(f"[{self.node_id}] {line}", file=self._echo, flush=True)

    def wait_ready(self, timeout: float) -> None:
        """Block until this run of the node logs that it listens."""
        deadline = time.monotonic() + timeout
        expected = f"{LISTENING}{HOST}:{self.port}"
        while time.monotonic() < deadline:
            if any(expected in line for line in self.log_lines[self._started_at_line :]):
                return
            if self.process.poll() is not None:
                self._join_pumps(1.0)  # its last lines say why
                raise ClusterError(
                    f"{self.node_id} exited with {self.process.returncode} before "
                    f"listening:\n{self._recent_log()}"
                )
            time.sleep(POLL)
        raise ClusterError(
            f"{self.node_id} did not listen on {HOST}:{self.port} within {timeout:.0f} s:\n"
            f"{self._recent_log()}"
        )

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Block until a log line holds ``text``; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if text in line:
                    return line
            time.sleep(POLL)
        raise TimeoutError(f"{self.node_id} logged no {text!r} within {timeout} s")

    def _recent_log(self) -> str:
        return "\n".join(self.log_lines[self._started_at_line :][-30:])

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would, and wait for it."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
        self._join_pumps(5.0)

    def terminate(self, timeout: float | None = None) -> None:
        """SIGTERM (the node drains its running turns for ``--grace-period``) and wait;
        SIGKILL if it is still there after ``timeout``."""
        self.send_sigterm()
        self.wait(timeout)

    def send_sigterm(self) -> None:
        """SIGTERM once: a second one would cancel the node's running turns at once."""
        if self.running and not self._sigterm_sent:
            self.process.terminate()
            self._sigterm_sent = True

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the node to exit (SIGKILL past ``timeout``) and for its log reader."""
        if self._process is not None:
            limit = self._stop_timeout if timeout is None else timeout
            _stop_process(self._process, limit, signalled=self._sigterm_sent)
        self._join_pumps(5.0)

    def restart(self, timeout: float = 30.0) -> None:
        """Start it again (stopping it first if it runs) on the same port with the same
        node id, and wait until it listens."""
        self.terminate()
        self.launch()
        self.wait_ready(timeout)

    def _join_pumps(self, timeout: float) -> None:
        """The log readers end at the end of their output: when the node and anything that
        inherited its output (its isolated workers) have gone."""
        for pump in self._pumps:
            pump.join(timeout)
        self._pumps = [pump for pump in self._pumps if pump.is_alive()]


class LocalCluster:
    """Redis, ``nodes`` server nodes and nginx in front, all on loopback (see the module
    docstring). ``port``: nginx's port (0 picks a free one); ``extra_args``: more
    ``serve`` options for every node; ``env``: added to the nodes' environment; ``echo``:
    copy the nodes' output, each line prefixed ``[node-i]``, to stderr; ``runtime_parent``:
    where its temporary directory is made (default: the system's, ``TMPDIR``)."""

    def __init__(
        self,
        nodes: int = 3,
        *,
        models_dir: Path | str = Path("models"),
        port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        resume_window: float | None = None,
        node_ttl: float | None = None,
        echo: bool = False,
        startup_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        runtime_parent: Path | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.node_count = nodes
        self.models_dir = Path(models_dir).resolve()
        self.requested_port = port
        self.port = port  # nginx's, once started
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.resume_window = resume_window
        self.node_ttl = node_ttl
        self.echo = echo
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.runtime_parent = runtime_parent
        self.nodes: list[ClusterNode] = []
        self._runtime: Path | None = None
        self._redis: RedisServer | None = None
        self._nginx: subprocess.Popen[str] | None = None
        self._nginx_binary: Path | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def runtime_dir(self) -> Path:
        """The temporary directory holding Redis' socket, nginx's files and logs."""
        if self._runtime is None:
            raise ClusterError("the cluster is not started")
        return self._runtime

    @property
    def redis_socket(self) -> Path:
        return self.runtime_dir / "redis" / "redis.sock"

    @property
    def redis_url(self) -> str:
        return f"unix://{self.redis_socket}"

    @property
    def url(self) -> str:
        """nginx's address, for HTTP: ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        """nginx's address, for chats: ``ws://127.0.0.1:PORT``."""
        return f"ws://{HOST}:{self.port}"

    @property
    def nginx_dir(self) -> Path:
        return self.runtime_dir / "nginx"

    @property
    def nginx_process(self) -> subprocess.Popen[str] | None:
        return self._nginx

    @property
    def redis_process(self) -> subprocess.Popen[bytes] | None:
        return self._redis.process if self._redis is not None else None

    def chat_url(self, model: str) -> str:
        return f"{self.ws_url}/v1/chat/{model}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Start Redis, the nodes and nginx, each ready when this returns; on any failure
        (a Ctrl-C included) everything started so far is stopped again."""
        if self._runtime is not None:
            raise ClusterError("the cluster is already started")
        redis_server = find_program("redis-server", "redis-server")
        self._nginx_binary = find_program("nginx", "nginx")
        if not self.models_dir.is_dir():
            raise ClusterError(f"no models directory at {self.models_dir}")
        self._runtime = Path(
            tempfile.mkdtemp(prefix="anything-agent-cluster-", dir=self.runtime_parent)
        )
        self.nodes, self.port = [], self.requested_port
        try:
            if len(str(self.redis_socket)) > SUN_PATH_MAX:
                raise ClusterError(
                    f"{self.redis_socket} is too long for a unix socket; set TMPDIR to a "
                    "shorter directory"
                )
            self._redis = RedisServer(redis_server, self.redis_socket.parent)
            self.redis_start()
            self._start_nodes()
            self._start_nginx()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this cluster started (SIGTERM, then SIGKILL past
        ``stop_timeout``) and remove its directory; safe to call more than once."""
        try:
            if self._nginx is not None:
                _stop_process(self._nginx, self.stop_timeout)
            for node in self.nodes:  # all at once: their grace periods overlap
                node.send_sigterm()
            for node in self.nodes:
                node.wait(self.stop_timeout)
            self.redis_stop()
        finally:
            if self._runtime is not None:
                shutil.rmtree(self._runtime, ignore_errors=True)
                self._runtime = None

    # ------------------------------------------------------------------ Redis
    def redis_start(self, timeout: float | None = None) -> None:
        """Start Redis (again) on the same socket and wait until it answers PING. It keeps
        nothing on disk: after a restart it is empty, as a Redis without persistence."""
        if self._redis is None:
            raise ClusterError("the cluster is not started")
        try:
            self._redis.start(self.startup_timeout if timeout is None else timeout)
        except RedisUnavailable as exc:
            raise ClusterError(str(exc)) from None

    def redis_stop(self) -> None:
        """SIGTERM Redis and wait for it (the nodes lose it until ``redis_start``)."""
        if self._redis is not None:
            self._redis.stop(self.stop_timeout)

    # ------------------------------------------------------------------ nodes
    def _start_nodes(self) -> None:
        environment = {**os.environ, **self.env, REDIS_URL_ENV: self.redis_url}
        options = list(self.extra_args)
        if self.resume_window is not None:
            options += ["--resume-window", str(self.resume_window)]
        if self.node_ttl is not None:
            options += ["--node-ttl", str(self.node_ttl)]
        used: set[int] = {self.port}
        for index in range(self.node_count):
            port = free_port()
            while port in used:
                port = free_port()
            used.add(port)
            command = [
                sys.executable,
                *("-m", "ws_server", "serve"),
                *("--host", HOST, "--port", str(port)),
                *("--models-dir", str(self.models_dir)),
                *("--node-id", f"node-{index}"),
                *options,
            ]
            node = ClusterNode(
                index,
                port,
                command,
                environment,
                sys.stderr if self.echo else None,
                self.stop_timeout,
            )
            self.nodes.append(node)
            node.launch()
        deadline = time.monotonic() + self.startup_timeout
        for node in self.nodes:  # they start side by side; the slowest sets the pace
            node.wait_ready(max(0.1, deadline - time.monotonic()))

    # ------------------------------------------------------------------ nginx
    def nginx_config(self) -> str:
        """The config nginx runs with (``render_nginx_config``)."""
        return render_nginx_config(
            self.port,
            [node.port for node in self.nodes],
            self.nginx_dir,
            HOST,
            user=worker_user(),
        )

    def _start_nginx(self) -> None:
        assert self._nginx_binary is not None
        if self.port != 0:
            _check_port_free(self.port)  # nginx itself would retry for seconds first
        if self.port == 0:
            taken = {node.port for node in self.nodes}
            self.port = free_port()
            while self.port in taken:
                self.port = free_port()
        directory = self.nginx_dir
        directory.mkdir(mode=0o700)
        (directory / "nginx.conf").write_text(self.nginx_config(), encoding="utf-8")
        output = directory / "stderr.log"
        with output.open("w") as sink:
            self._nginx = subprocess.Popen(
                [
                    str(self._nginx_binary),
                    *("-p", str(directory), "-c", "nginx.conf"),
                    *("-e", str(directory / "error.log")),  # not the compiled-in log
                    *("-g", "daemon off;"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
                text=True,
                process_group=0,
            )
        self._wait_for_nginx(self.startup_timeout)

    def _wait_for_nginx(self, timeout: float) -> None:
        """Until ``GET /healthz`` through nginx is answered 200 by a node."""
        assert self._nginx is not None
        deadline = time.monotonic() + timeout
        problem = "no answer"
        while time.monotonic() < deadline:
            if self._nginx.poll() is not None:
                raise ClusterError(
                    f"nginx exited with {self._nginx.returncode}:\n"
                    f"{_tail(self.nginx_dir / 'stderr.log')}\n"
                    f"{_tail(self.nginx_dir / 'error.log')}"
                )
            connection = http.client.HTTPConnection(HOST, self.port, timeout=2.0)
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                response.read()
                if response.status == 200:
                    return
                problem = f"GET /healthz answered {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                problem = str(exc)
            finally:
                connection.close()
            time.sleep(POLL)
        raise ClusterError(
            f"nginx did not answer on {HOST}:{self.port} within {timeout:.0f} s ({problem}):\n"
            f"{_tail(self.nginx_dir / 'error.log')}"
        )
