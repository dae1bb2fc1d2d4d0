"""Shared fixtures: real servers in subprocesses on ephemeral ports, real WebSocket clients.

One server (``server``) is shared by every test that only chats; tests that change the
models directory or stop the server start their own with ``start_server``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from system_packages import (
    BWRAP,
    CHROMIUM,
    NGINX,
    REDIS_SERVER,
    PackageUnavailable,
    ensure_package,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from ws_server.deploy.ray_head import RayHead
from ws_server.isolation import cgroups

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = ROOT / "models"
TEST_MODELS = Path(__file__).resolve().parent / "models"
RESUME_MODELS = Path(__file__).resolve().parent / "resume_models"
LISTENING = re.compile(r"listening on ws://([\d.]+):(\d+)")
RECV_TIMEOUT = 10.0
# Where a test run leaves what a person may want to look at (the browser tests' screenshots).
OUTPUT_DIR = Path(os.environ.get("ANYTHING_AGENT_TEST_OUTPUT", ROOT / "test-output"))
CHROMIUM_PROBLEM = pytest.StashKey[str]()
BWRAP_PROBLEM = pytest.StashKey[str]()
CLUSTER_PROBLEM = pytest.StashKey[str]()
BROWSER_TESTS = pytest.StashKey[bool]()
# Tests with this marker need these programs from these Debian packages; why one is
# missing (if it is, and cannot be installed) is stashed under this key.
SYSTEM_PACKAGES = {
    "browser": ([(CHROMIUM, "chromium")], CHROMIUM_PROBLEM),
    "sandbox": ([(BWRAP, "bubblewrap")], BWRAP_PROBLEM),
    "cluster": ([(REDIS_SERVER, "redis-server"), (NGINX, "nginx")], CLUSTER_PROBLEM),
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """When browser, sandbox or cluster tests are about to run, make sure Chromium,
    bubblewrap, or Redis and nginx are there (installing them if it can); a failure is
    kept for those tests to report, so the others still run."""
    for marker, (programs, problem) in SYSTEM_PACKAGES.items():
        if any(item.get_closest_marker(marker) for item in session.items):
            if marker == "browser":
                session.config.stash[BROWSER_TESTS] = True
            try:
                for binary, package in programs:
                    ensure_package(binary, package)
            except (PackageUnavailable, OSError, subprocess.SubprocessError) as exc:
                session.config.stash[problem] = str(exc)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    shots = OUTPUT_DIR / "screenshots"
    if config.stash.get(BROWSER_TESTS, False) and shots.is_dir():
        terminalreporter.write_line(f"browser screenshots: {shots}")


@dataclass
class ServerProcess:
    """A running ``anything-agent serve`` with its log captured line by line."""

    process: subprocess.Popen[str]
    models_dir: Path
    events_dir: Path
    port: int = 0
    log_lines: list[str] = field(default_factory=list)
    signalled: bool = False
    mode: str = "shared"
    placement: str | None = None  # isolated models': "local" or "ray"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    def chat_url(self, model: str) -> str:
        return f"{self.ws_url}/v1/chat/{model}"

    def send_signal(self, sig: int) -> None:
        """Send a signal (as an operator's kill or Ctrl-C would)."""
        self.signalled = True
        self.process.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the server (unless a test already did) and wait for it to exit; returns
        its exit code."""
        if self.process.poll() is None and not self.signalled:
            self.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None

    def wait_for_log(self, pattern: str, timeout: float = 10) -> str:
        """Block until a log line matches ``pattern``; returns that line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if regex.search(line):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log}")


def launch_server(
    models_dir: Path,
    events_dir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> ServerProcess:
    """Start a server on a free port and wait until it listens (``pass_fds``: descriptors
    it inherits, as a careless parent process might leave it)."""
    # Test models record their hooks in events_dir, which sandboxed workers share: they
    # run as nobody when the tests run as root, so it must be theirs to write in too.
    events_dir.chmod(0o777)
    environment = {
        **os.environ,
        "MODEL_TEST_EVENTS": str(events_dir),
        "ANYTHING_AGENT_SANDBOX_SHARE": "MODEL_TEST_EVENTS",
    }
    environment.update(env or {})
    command = [
        sys.executable,
        "-m",
        "ws_server",
        "serve",
        "--port",
        "0",
        "--models-dir",
        str(models_dir),
        *extra,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=ROOT,
        pass_fds=pass_fds,
    )
    server = ServerProcess(process, models_dir, events_dir)
    assert process.stderr is not None
    stderr = process.stderr

    def pump() -> None:
        for line in stderr:
            server.log_lines.append(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(server.log_lines):
            match = LISTENING.search(line)
            if match:
                server.port = int(match.group(2))
                return server
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"server did not start listening:\n{server.log}")


def copy_models(target: Path, *names: str, source: Path = TEST_MODELS) -> Path:
    """Copy model directories into ``target`` (created) and return it."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(source / name, target / name)
    return target


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Whatever the tests start (servers, `check`) caches under a test directory, never
    in the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def env_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Isolated models' virtualenvs, built once for the whole test session."""
    return tmp_path_factory.mktemp("envs")


# Test models whose config.yaml is broken on purpose keep it as is in the isolated copy.
KEEP_CONFIG = {"broken_yaml", "broken_type", "Bad-Name"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One private single-node Ray cluster on loopback for the whole run (the ``ray`` extra
    that the test command installs), stopped with every process it started."""
    head = RayHead(tmp_path_factory.mktemp("ray"))
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="session", params=["shared", "isolated", "ray"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, env_cache: Path
) -> Iterator[ServerProcess]:
    """One server over the shipped models plus every test model, broken ones included; the
    chat and lifecycle tests run against it three times: every model shared, then every
    model isolated in a local worker, then every model isolated as an actor on a Ray
    cluster (the same behaviour is promised in every mode and placement)."""
    placement = request.param
    isolated = placement != "shared"
    models = tmp_path_factory.mktemp(f"models-{placement}")
    for source in (SHIPPED_MODELS, TEST_MODELS):
        for directory in source.iterdir():
            if directory.is_dir() and not directory.name.startswith(("_", ".")):
                shutil.copytree(directory, models / directory.name)
                if isolated and directory.name not in KEEP_CONFIG:
                    config = models / directory.name / "config.yaml"
                    text = config.read_text() if config.exists() else ""
                    config.write_text(text + "\nisolation: true\n")
    events = tmp_path_factory.mktemp(f"events-{placement}")
    extra = ["--grace-period", "2", "--env-cache-dir", str(env_cache)]
    env: dict[str, str] = {}
    if placement == "ray":
        head = request.getfixturevalue("ray_head")
        extra += ["--ray-address", head.address]
        env = head.client_env
    running = launch_server(models, events, *extra, env=env)
    running.mode = "isolated" if isolated else "shared"
    running.placement = placement if isolated else None
    wait_until_built(running)
    yield running
    assert running.stop() == 0, running.log


BROWSER_MODELS = Path(__file__).resolve().parent / "browser_models"


def client_models(target: Path) -> Path:
    """What the client tests (browser, terminal, Python API) talk to: echo as shipped, the
    scripted test model, models that time out or fail to start, one that fails to load, and
    one that answers with the params it was given."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SHIPPED_MODELS / "echo", target / "echo")
    shutil.copytree(BROWSER_MODELS / "scripted", target / "scripted")
    for name in ("sleepy", "start_fails", "broken_syntax", "params_echo", "agent_events"):
        shutil.copytree(TEST_MODELS / name, target / name)
    return target


@pytest.fixture(scope="session")
def clients_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared-mode server for every client test."""
    models = client_models(tmp_path_factory.mktemp("client-models"))
    running = launch_server(models, tmp_path_factory.mktemp("client-events"))
    yield running
    assert running.stop() == 0, running.log


def wait_until_built(server: ServerProcess, timeout: float = 120) -> None:
    """Block until no model is building a new revision (isolated environments and workers),
    whether it is ``building`` or a previous version serves meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = http(server, "/v1/models")
        if all(row["pending_revision"] is None for row in body["data"]):
            return
        time.sleep(0.1)
    raise AssertionError(f"models still building after {timeout}s:\n{server.log}")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Any]:
    """Start servers private to one test; each is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(models_dir: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        events = tmp_path / f"events{len(started)}"
        events.mkdir()
        running = launch_server(models_dir, events, *extra, env=env)
        started.append(running)
        return running

    yield start
    for running in started:  # as an operator stops it: its workers and cgroups go too
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
            try:
                running.process.wait(20)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()


@pytest.fixture(scope="session", autouse=True)
def no_cgroups_left_behind() -> Iterator[None]:
    """Servers a test killed outright (kill -9 is tested) can't remove their cgroups;
    the run removes what its servers left, as the next server start would."""
    yield
    cgroups.remove_stale()


# ---------------------------------------------------------------------- client helpers
@asynccontextmanager
async def chat(server: ServerProcess, model: str, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """Open a chat and consume its ``ready`` frame."""
    async with connect(server.chat_url(model), **kwargs) as ws:
        ready = await recv_frame(ws)
        assert ready["type"] == "ready", ready
        ws.ready = ready  # type: ignore[attr-defined]
        yield ws


async def recv_frame(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
    """The next frame, parsed; fails the test rather than hanging.

    Every test checks design.md's ``seq`` rule as it reads: each chunk, done and error
    frame of a session carries the seq one above the last. The seq is then taken off, so
    that tests compare frames by what they say."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    frame = json.loads(raw)
    assert isinstance(frame, dict)
    if frame.get("type") in ("ready", "resumed"):
        ws.last_seq = frame.get("after", 0)  # type: ignore[attr-defined]
    elif "seq" in frame:
        expected = getattr(ws, "last_seq", 0) + 1
        assert frame["seq"] == expected, f"seq {frame['seq']} where {expected} was due: {frame}"
        ws.last_seq = frame.pop("seq")  # type: ignore[attr-defined]
    else:
        assert frame.get("type") == "error", f"a frame without seq: {frame}"
    return frame


@dataclass
class Turn:
    """Everything one turn sent back, in order."""

    frames: list[dict[str, Any]]

    @property
    def chunks(self) -> list[str]:
        return [f["content"] for f in self.frames if f["type"] == "chunk"]

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def done(self) -> dict[str, Any]:
        return self.frames[-1]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == "error"]


async def read_turn(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> Turn:
    """Read frames up to and including ``done``."""
    frames = []
    while True:
        frame = await recv_frame(ws, timeout)
        frames.append(frame)
        if frame["type"] == "done":
            return Turn(frames)


async def run_turn(ws: ClientConnection, message: str | dict[str, Any]) -> Turn:
    """Send a message (plain text or a frame object) and read the whole turn."""
    await ws.send(message if isinstance(message, str) else json.dumps(message))
    return await read_turn(ws)


async def refused_handshake(server: ServerProcess, model: str) -> Any:
    """Open a chat that the server must refuse; the HTTP response it refused with."""
    try:
        async with connect(server.chat_url(model)):
            pass
    except InvalidStatus as exc:
        return exc.response
    raise AssertionError(f"the handshake for {model!r} was accepted")


def http(server: ServerProcess, path: str, method: str = "GET") -> tuple[int, dict[str, str], Any]:
    """A plain HTTP request; returns status, headers and the JSON (or text) body."""
    request = urllib.request.Request(server.http_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, headers, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, headers, body = exc.code, dict(exc.headers), exc.read()
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, headers, json.loads(body)
    return status, headers, body.decode()


def read_events(server: ServerProcess, instance: str) -> list[str]:
    """The hook events the ``recorder`` test model wrote for one session instance."""
    path = server.events_dir / f"{instance}.log"
    return path.read_text().split() if path.exists() else []


async def wait_for_events(
    server: ServerProcess, instance: str, last: str, timeout: float = 10
) -> list[str]:
    """Poll until the recorder's events for ``instance`` end with ``last``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = read_events(server, instance)
        if events and events[-1] == last:
            return events
        await asyncio.sleep(0.02)
    raise AssertionError(
        f"events of {instance} never ended with {last!r}: {read_events(server, instance)}"
    )


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the test session (unix socket, nothing on disk); the
    stores' tests run against it. Debian's redis-server is installed when missing."""
    from ws_server.deploy.redis_server import RedisServer

    ensure_package(REDIS_SERVER, "redis-server")
    server = RedisServer(REDIS_SERVER, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def every_node_up(cluster: Any) -> Iterator[None]:
    """For tests that kill and stop the nodes (or Redis) of their module's ``cluster``:
    the next test starts with every one serving (``usefixtures("every_node_up")``)."""
    yield
    for node in cluster.nodes:
        if not node.running:
            node.restart()
    if cluster.redis_process is None or cluster.redis_process.poll() is not None:
        cluster.redis_start()


CHROMIUM_ARGS = [  # no GPU here, and no calls home (background networking is refused)
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser(pytestconfig: pytest.Config) -> Iterator[Any]:
    """Debian's Chromium, driven by Playwright (imported here: only browser tests load it)."""
    from playwright.sync_api import sync_playwright

    problem = pytestconfig.stash.get(CHROMIUM_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"the browser tests need Chromium: {problem}", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser profile per test; fails the test on any JavaScript error or any
    request that leaves this machine (the page must work with no internet), and saves a
    screenshot of how the test left the page."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on(
        "request",
        lambda sent: urlsplit(sent.url).hostname == "127.0.0.1" or elsewhere.append(sent.url),
    )
    yield opened
    from browser_support import screenshot

    screenshot(opened, request.node.name)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not elsewhere, f"the page reached beyond this machine: {elsewhere}"
