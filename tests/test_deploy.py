"""Several nodes on one machine: the nginx config (checked by the real nginx) and
LocalCluster (real redis-server, nodes and nginx) serving chats round-robin, losing a
node without failing a client, and leaving nothing behind, also when its start fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER_PROBLEM, SHIPPED_MODELS
from system_packages import NGINX
from websockets.sync.client import connect
from websockets.typing import Subprotocol

from ws_server.deploy.local_cluster import ClusterError, LocalCluster, free_port
from ws_server.deploy.nginx import TEMP_PATHS, UPSTREAM, render_nginx_config, worker_user

pytestmark = pytest.mark.cluster

CLI = Path(sys.executable).parent / "anything-agent"
OFFER = [Subprotocol("anything-agent.v1"), Subprotocol("resumable")]
PATH_DIRECTIVES = re.compile(r"^\s*(pid|error_log|access_log|\w+_temp_path)\s+(\S+)", re.MULTILINE)


@pytest.fixture(autouse=True)
def programs(pytestconfig: pytest.Config) -> None:
    problem = pytestconfig.stash.get(CLUSTER_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"the cluster tests need redis-server and nginx: {problem}", pytrace=False)


@pytest.fixture
def echo_only(tmp_path: Path) -> Path:
    """The shipped echo model alone: nothing to build, so nodes start in a blink."""
    models = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    return models


def block(config: str, opening: str) -> str:
    """The text of the ``{ ... }`` block opened by the line starting with ``opening``."""
    start = config.index(opening)
    depth = 0
    for index in range(config.index("{", start), len(config)):
        depth += {"{": 1, "}": -1}.get(config[index], 0)
        if depth == 0:
            return config[start : index + 1]
    raise AssertionError(f"unclosed block {opening!r}")


# ------------------------------------------------------------------ the config
def test_the_upstream_has_every_node_and_nothing_sticky(tmp_path: Path) -> None:
    ports = [9101, 9102, 9103]
    config = render_nginx_config(8080, ports, tmp_path)
    upstream = block(config, f"upstream {UPSTREAM}")
    servers = re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+)\b", upstream, re.MULTILINE)
    assert sorted(int(port) for port in servers) == ports
    for sticky in ("ip_hash", "hash ", "sticky", "least_conn", "random"):
        assert sticky not in upstream
    assert "proxy_next_upstream error timeout;" in config
    assert "proxy_connect_timeout 1s;" in config
    assert config.count(f"proxy_pass http://{UPSTREAM};") == 2  # / and reload, nothing else


def test_the_config_upgrades_websockets_and_streams(tmp_path: Path) -> None:
    config = render_nginx_config(8080, [9101], tmp_path)
    upgrade_map = block(config, "map $http_upgrade $connection_upgrade")
    assert re.search(r"default\s+upgrade;", upgrade_map)
    assert re.search(r"''\s+close;", upgrade_map)
    for line in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_set_header Host $http_host;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_read_timeout 3600s;",
        "proxy_send_timeout 3600s;",
        "proxy_buffering off;",
    ):
        assert line in config
    assert "Sec-WebSocket-Protocol" not in config.replace(
        "# Sec-WebSocket-Protocol", ""
    )  # never set nor cleared: it passes untouched
    assert re.findall(r"^\s*listen\s+(\S+);", config, re.MULTILINE) == ["127.0.0.1:8080"]


def test_everything_nginx_writes_is_in_the_runtime_dir(tmp_path: Path) -> None:
    config = render_nginx_config(8080, [9101, 9102], tmp_path)
    paths = dict(PATH_DIRECTIVES.findall(config))
    assert set(paths) == {"pid", "error_log", "access_log"} | {f"{t}_temp_path" for t in TEMP_PATHS}
    for directive, path in paths.items():
        assert Path(path.rstrip(";")).parent == tmp_path, directive
    assert "worker_processes 1;" in config


def test_user_is_set_only_when_asked_and_root_asks_for_root(tmp_path: Path) -> None:
    assert not re.search(r"^\s*user\s", render_nginx_config(8080, [9101], tmp_path), re.M)
    as_root = render_nginx_config(8080, [9101], tmp_path, user="root")
    assert re.search(r"^user root;$", as_root, re.MULTILINE)
    assert worker_user() == ("root" if os.geteuid() == 0 else None)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one node"):
        render_nginx_config(8080, [], tmp_path)
    with pytest.raises(ValueError, match="not a port"):
        render_nginx_config(8080, [70000], tmp_path)
    with pytest.raises(ValueError, match="absolute"):
        render_nginx_config(8080, [9101], Path("relative"))
    with pytest.raises(ValueError, match="may not hold"):
        render_nginx_config(8080, [9101], tmp_path / "a b")


@pytest.mark.parametrize("user", [None, worker_user()], ids=["no-user", "worker-user"])
def test_nginx_accepts_the_config(tmp_path: Path, user: str | None) -> None:
    text = render_nginx_config(8080, [9101, 9102], tmp_path, user=user)
    (tmp_path / "nginx.conf").write_text(text)
    test = [str(NGINX), "-t", "-p", str(tmp_path), "-c", "nginx.conf"]
    result = subprocess.run(
        [*test, "-e", str(tmp_path / "error.log")],  # not the compiled-in error log
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# ------------------------------------------------------------------ the cluster
def echo_turn(url: str, text: str) -> tuple[str, dict[str, object], str | None]:
    """One chat with echo: the reply, the ready frame and the subprotocol agreed."""
    with connect(url, subprotocols=OFFER, open_timeout=5) as ws:
        ready = json.loads(ws.recv(timeout=5))
        ws.send(text)
        chunks = []
        while True:
            frame = json.loads(ws.recv(timeout=5))
            if frame["type"] == "done":
                assert frame["reason"] == "stop", frame
                break
            assert frame["type"] == "chunk", frame
            chunks.append(frame["content"])
        ws.close()  # 1000: the session ends now, not after a resume window
        return "".join(chunks), ready, ws.subprotocol


def chat_nodes(cluster: LocalCluster, count: int) -> list[str]:
    """Which node nginx sent each chat to, from its access log (``node=ADDRESS``), once
    ``count`` chats are logged (nginx logs a WebSocket when it closes)."""
    log = cluster.nginx_dir / "access.log"
    deadline = time.monotonic() + 5
    while True:
        nodes = re.findall(r'"GET /v1/chat/echo" 101 .* node=(\S+)', log.read_text())
        if len(nodes) >= count or time.monotonic() > deadline:
            return nodes
        time.sleep(0.05)


def pids_of(cluster: LocalCluster) -> list[int]:
    """Every process of the cluster: Redis, nginx's master and workers, the nodes."""
    assert cluster.redis_process is not None and cluster.nginx_process is not None
    master = cluster.nginx_process.pid
    workers = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True)
    pids = [cluster.redis_process.pid, master, *map(int, workers.stdout.split())]
    return pids + [node.process.pid for node in cluster.nodes]


def assert_all_gone(pids: list[int], ports: list[int], runtime: Path | None) -> None:
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} is still there"
    if runtime is not None:  # Redis and nginx name it in their argv
        left = subprocess.run(["pgrep", "-af", str(runtime)], capture_output=True, text=True)
        assert left.stdout == "", left.stdout
        assert not runtime.exists()
    for port in ports:
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
    assert not [t for t in threading.enumerate() if t.name.startswith("node-")]


@pytest.fixture
def cluster(echo_only: Path) -> Iterator[LocalCluster]:
    with LocalCluster(2, models_dir=echo_only) as running:
        yield running


def test_a_cluster_serves_chats_round_robin_and_leaves_nothing(cluster: LocalCluster) -> None:
    with urllib.request.urlopen(f"{cluster.url}/healthz", timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read())["status"] == "ok"
    for index in range(4):
        reply, ready, subprotocol = echo_turn(cluster.chat_url("echo"), f"hello world {index}")
        assert reply == f"hello world {index}"
        assert subprotocol == "anything-agent.v1"  # Sec-WebSocket-Protocol got through...
        assert "resume_token" in ready  # ...with every entry offered
    chats = chat_nodes(cluster, 4)
    # Round robin alternates: two chats each, whatever came first.
    assert sorted(chats) == sorted([f"127.0.0.1:{node.port}" for node in cluster.nodes] * 2)
    for node in cluster.nodes:
        # The Redis URL reaches the nodes by their environment, never their argv.
        argv = Path(f"/proc/{node.process.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{node.process.pid}/environ").read_bytes().split(b"\0")
        assert b"redis" not in argv
        assert f"ANYTHING_AGENT_REDIS_URL={cluster.redis_url}".encode() in environ
        assert f"--node-id\0node-{node.index}\0".encode() in argv
    pids, runtime = pids_of(cluster), cluster.runtime_dir
    ports = [cluster.port, *(node.port for node in cluster.nodes)]
    cluster.stop()
    assert_all_gone(pids, ports, runtime)


def test_a_lost_node_fails_no_client_and_comes_back(cluster: LocalCluster) -> None:
    lost = cluster.nodes[0]
    lost.kill()
    assert lost.process.returncode == -9
    for index in range(4):  # nginx retries the dead node's connects on the other
        assert (
            echo_turn(cluster.chat_url("echo"), f"still here {index}")[0] == f"still here {index}"
        )
    port = lost.port
    lost.restart()
    assert lost.running and lost.port == port
    assert echo_turn(lost.ws_url + "/v1/chat/echo", "back")[0] == "back"
    cluster.redis_stop()  # what chats do meanwhile is the several-node tests' business
    assert cluster.redis_process is not None and cluster.redis_process.poll() is not None
    cluster.redis_start()  # on the same socket, answering PING
    assert cluster.redis_process.poll() is None


def test_the_cluster_command_runs_until_ctrl_c(echo_only: Path) -> None:
    port = free_port()
    command = [str(CLI), "cluster", "--nodes", "2", "--port", str(port), "--quiet"]
    process = subprocess.Popen(
        [*command, "--models-dir", str(echo_only), "--", "--resume-window", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        shown = []
        for line in iter(process.stdout.readline, ""):  # until it says it is up, or ends
            shown.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        text = "".join(shown)
        assert f"chat with:  anything-agent chat --url ws://127.0.0.1:{port} echo" in text
        reply = subprocess.run(
            [str(CLI), "chat", "--url", f"ws://127.0.0.1:{port}", "echo", "-m", "via nginx"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert reply.returncode == 0 and reply.stdout.strip() == "via nginx", reply.stderr
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
        pids = [int(pid) for pid in children.stdout.split()]
        assert len(pids) == 4, text  # redis-server, two nodes, nginx
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:  # a failed test still stops the cluster
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert_all_gone(pids, [port], None)


def test_a_failed_start_stops_what_it_started(echo_only: Path) -> None:
    parent = Path(tempfile.mkdtemp(prefix="aa-"))  # short: Redis' socket path must fit
    try:
        with socket.socket() as taken:  # nginx's port, already in use: nginx cannot start
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            # Its nodes get SIGTERM the moment they listen; how long they take to stop then
            # is not this test's business (SIGKILL past stop_timeout is part of stop()).
            cluster = LocalCluster(
                2, models_dir=echo_only, port=port, runtime_parent=parent, stop_timeout=5
            )
            with pytest.raises(ClusterError, match=r"cannot listen on .*: Address already in use"):
                cluster.start()
        assert len(cluster.nodes) == 2 and cluster.redis_process is not None  # all had started
        pids = [cluster.redis_process.pid, *(node.process.pid for node in cluster.nodes)]
        assert_all_gone(pids, [node.port for node in cluster.nodes], None)
        assert list(parent.iterdir()) == []
    finally:
        shutil.rmtree(parent)
