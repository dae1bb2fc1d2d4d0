"""Access control and abuse limits: API keys (header and browser subprotocol), the admin
key and loopback-only admin, origin checks, connection/rate/history/session limits,
handshake and idle timeouts, keepalive, slow readers, and secrets kept out of sight."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RESUME_MODELS,
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    chat,
    copy_models,
    http,
    launch_server,
    read_events,
    recv_frame,
    run_turn,
)
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Response

from ws_server.exceptions import AdminOnly, Unauthorized
from ws_server.http.exchange import HttpRequest
from ws_server.http.routes import HttpApi
from ws_server.http.security import AccessPolicy, key_protocol, presented_key
from ws_server.registry.catalog import Registry
from ws_server.settings import ServerSettings

SECURITY_MODELS = Path(__file__).resolve().parent / "security_models"
KEYS = ("key-one-4f1c9a", "key-two-77b0e2")
ADMIN_KEY = "admin-key-90c4d1"
ALLOWED = "https://allowed.example"


def models_dir(target: Path, *, max_sessions: int | None = None) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("echo",):
        _copy(SHIPPED_MODELS / name, target / name)
    for name in ("recorder", "slow"):
        _copy(TEST_MODELS / name, target / name)
    for name in ("flood", "secretive"):
        _copy(SECURITY_MODELS / name, target / name)
    capped = target / "capped"
    _copy(SHIPPED_MODELS / "echo", capped)
    (capped / "config.yaml").write_text("name: capped\nsettings:\n  max_sessions: 1\n")
    return target


def _copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def raw_http(server: ServerProcess, request: str) -> tuple[int, dict[str, str], str]:
    """Send a hand-written HTTP request; returns status, headers and body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    status_line, *header_lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split()[1]), headers, body


async def refusal(url: str, **kwargs: Any) -> Any:
    """The HTTP response a WebSocket handshake was refused with."""
    try:
        async with connect(url, **kwargs):
            pass
    except InvalidStatus as exc:
        return exc.response
    raise AssertionError(f"the handshake to {url} was accepted")


# ---------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """API keys from the environment, an admin key, one extra allowed origin."""
    running = launch_server(
        models_dir(tmp_path_factory.mktemp("guarded-models")),
        tmp_path_factory.mktemp("guarded-events"),
        "--admin-key",
        ADMIN_KEY,
        "--allowed-origins",
        ALLOWED,
        env={"ANYTHING_AGENT_API_KEYS": ",".join(KEYS), "SECRETIVE_TEST_KEY": "env-secret-31337"},
    )
    yield running
    assert running.stop() == 0, running.log
    for key in (*KEYS, ADMIN_KEY, "env-secret-31337", "inline-secret-value-42", "wrong-key-x1"):
        assert key not in running.log, f"{key} reached the log"


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No keys, small limits, fast keepalive."""
    running = launch_server(
        models_dir(tmp_path_factory.mktemp("strict-models")),
        tmp_path_factory.mktemp("strict-events"),
        "--max-connections-per-address",
        "4",
        "--max-messages-per-minute",
        "6",
        "--max-history-messages",
        "4",
        "--max-history-bytes",
        "3000",
        "--handshake-timeout",
        "1",
        env={"SECRETIVE_TEST_KEY": "env-secret-31337"},
    )
    yield running
    assert running.stop() == 0, running.log


# ---------------------------------------------------------------------- API keys
async def test_without_a_key_the_handshake_is_refused_with_401(guarded: ServerProcess) -> None:
    response = await refusal(guarded.chat_url("echo"))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(response.body)["error"]["code"] == "unauthorized"


async def test_a_wrong_key_is_refused_and_never_echoed(guarded: ServerProcess) -> None:
    response = await refusal(guarded.chat_url("echo"), additional_headers=bearer("wrong-key-x1"))
    assert response.status_code == 401
    assert b"wrong-key-x1" not in response.body
    assert json.loads(response.body)["error"]["message"] == "the API key is not valid"


@pytest.mark.parametrize("key", KEYS)
async def test_each_configured_key_opens_a_chat(guarded: ServerProcess, key: str) -> None:
    async with chat(guarded, "echo", additional_headers=bearer(key)) as ws:
        assert (await run_turn(ws, "hello")).text == "hello"


async def test_browsers_send_the_key_as_a_subprotocol_and_it_is_never_selected(
    guarded: ServerProcess,
) -> None:
    protocols = ["anything-agent.v1", key_protocol(KEYS[0])]
    async with chat(guarded, "echo", subprotocols=protocols) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "anything-agent.v1"
        assert (await run_turn(ws, "hi")).text == "hi"
    wrong = ["anything-agent.v1", key_protocol("wrong-key-x1")]
    response = await refusal(guarded.chat_url("echo"), subprotocols=wrong)
    assert response.status_code == 401


def test_the_model_list_needs_a_key_but_health_and_the_page_do_not(
    guarded: ServerProcess,
) -> None:
    assert http(guarded, "/v1/models")[0] == 401
    assert http(guarded, "/v1/models/echo")[0] == 401
    status, _, body = raw_http(
        guarded,
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[1]}\r\n\r\n",
    )
    assert status == 200 and '"echo"' in body
    assert http(guarded, "/healthz")[0] == 200
    assert http(guarded, "/")[0] == 200


async def test_keys_rotate_through_the_keys_file_without_a_restart(
    start_server: Any, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# one key a line\nfirst-key-aaaa\n")
    server = start_server(models_dir(tmp_path / "models"), "--api-keys-file", str(keys_file))
    async with chat(server, "echo", additional_headers=bearer("first-key-aaaa")):
        pass
    keys_file.write_text("second-key-bbbbbb\n")
    assert (
        await refusal(server.chat_url("echo"), additional_headers=bearer("first-key-aaaa"))
    ).status_code == 401
    async with chat(server, "echo", additional_headers=bearer("second-key-bbbbbb")):
        pass
    assert "first-key-aaaa" not in server.log and "second-key-bbbbbb" not in server.log


def test_a_missing_keys_file_stops_the_start_with_its_name(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ws_server",
            "serve",
            "--port",
            "0",
            "--api-keys-file",
            str(tmp_path / "nope.txt"),
            "--models-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "nope.txt" in result.stderr


def test_the_key_is_read_from_the_authorization_header_or_the_subprotocol() -> None:
    assert presented_key(Headers({"Authorization": "Bearer abc"})) == "abc"
    assert presented_key(Headers({"Authorization": "Basic abc"})) is None
    offered = Headers({"Sec-WebSocket-Protocol": f"anything-agent.v1, {key_protocol('ké y')}"})
    assert presented_key(offered) == "ké y"
    assert presented_key(Headers({"Sec-WebSocket-Protocol": "bearer.!!!"})) is None


# ---------------------------------------------------------------------- admin routes
def test_reload_needs_the_admin_key_when_one_is_set(guarded: ServerProcess) -> None:
    reload = "POST /v1/models/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    assert raw_http(guarded, reload + "\r\n")[0] == 401
    assert raw_http(guarded, reload + f"Authorization: Bearer {KEYS[0]}\r\n\r\n")[0] == 401
    status, _, body = raw_http(guarded, reload + f"Authorization: Bearer {ADMIN_KEY}\r\n\r\n")
    assert status == 200 and "unchanged" in body


def test_without_an_admin_key_reload_is_accepted_from_this_machine_only() -> None:
    policy = AccessPolicy(ServerSettings())
    policy.check_admin(Headers(), "127.0.0.1")
    policy.check_admin(Headers(), "::1")
    with pytest.raises(AdminOnly):
        policy.check_admin(Headers(), "203.0.113.7")
    keyed = AccessPolicy(ServerSettings(api_keys=("k-123456",)))
    with pytest.raises(Unauthorized):  # from this machine, but without a key
        keyed.check_admin(Headers(), "127.0.0.1")


def test_cors_grants_only_an_allowed_origin_spelt_as_origins_are() -> None:
    policy = AccessPolicy(ServerSettings(allowed_origins=("*",)))
    assert policy.cors_origin(Headers({"Origin": "http://app.test"})) == "http://app.test"
    assert policy.cors_origin(Headers({"Origin": "http://\xe9.test"})) is None
    listed = AccessPolicy(ServerSettings(allowed_origins=("http://app.test",)))
    assert listed.cors_origin(Headers({"Origin": "http://other.test"})) is None
    assert AccessPolicy(ServerSettings()).cors_origin(Headers({"Origin": "http://a"})) is None


async def test_a_reload_from_another_address_is_refused_with_403(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    api = HttpApi(registry, AccessPolicy(ServerSettings()))
    request = HttpRequest("POST", "/v1/models/reload", Headers({"Host": "x"}), peer="203.0.113.7")
    # A peer address other than loopback can't be made in a test that stays on 127.0.0.1,
    # so this one goes through the route table directly.
    response = await api.respond(request)
    assert isinstance(response, Response) and response.status_code == 403
    assert json.loads(response.body)["error"]["code"] == "forbidden"
    await registry.close()


# ---------------------------------------------------------------------- origins
@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # wscat, bots
        ("own", True),
        (ALLOWED, True),
        ("https://evil.example", False),
        ("null", False),
    ],
)
async def test_websocket_origins_are_checked(
    guarded: ServerProcess, origin: str | None, allowed: bool
) -> None:
    if origin == "own":
        origin = guarded.http_url
    headers = bearer(KEYS[0])
    kwargs: dict[str, Any] = {"additional_headers": headers}
    if origin is not None:
        kwargs["origin"] = origin
    if allowed:
        async with chat(guarded, "echo", **kwargs):
            return
    response = await refusal(guarded.chat_url("echo"), **kwargs)
    assert response.status_code == 403
    assert json.loads(response.body)["error"]["code"] == "forbidden_origin"


def test_a_cross_site_post_cannot_reload(guarded: ServerProcess) -> None:
    status, _, body = raw_http(
        guarded,
        "POST /v1/models/reload HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\nContent-Length: 0\r\n\r\n",
    )
    assert status == 403 and "forbidden_origin" in body


def test_dns_rebinding_does_not_pass_for_the_servers_own_origin(strict: ServerProcess) -> None:
    """A page at evil.example that resolves to 127.0.0.1 sends Host and Origin alike."""
    port = strict.port
    status, _, _ = raw_http(
        strict,
        f"POST /v1/models/reload HTTP/1.1\r\nHost: evil.example:{port}\r\n"
        f"Origin: http://evil.example:{port}\r\nContent-Length: 0\r\n\r\n",
    )
    assert status == 403
    status, _, _ = raw_http(
        strict,
        f"POST /v1/models/reload HTTP/1.1\r\nHost: localhost:{port}\r\n"
        f"Origin: http://localhost:{port}\r\nContent-Length: 0\r\n\r\n",
    )
    assert status == 200


# ---------------------------------------------------------------------- limits
async def test_too_many_messages_a_minute_are_rate_limited_and_the_connection_stays(
    strict: ServerProcess,
) -> None:
    async with chat(strict, "echo") as ws:
        for index in range(6):
            assert (await run_turn(ws, f"m{index}")).text == f"m{index}"
        await ws.send("one too many")
        error = await recv_frame(ws)
        assert error["type"] == "error" and error["code"] == "rate_limited"
        assert "6 frames a minute" in error["message"]
        await ws.send('{"type":"cancel"}')  # a cancel is still honoured (nothing runs)
        await ws.ping()  # the connection is alive
        async with chat(strict, "echo") as other:  # another connection has its own budget
            assert (await run_turn(other, "fine")).text == "fine"


async def test_connections_per_address_are_limited_with_429(strict: ServerProcess) -> None:
    async with chat(strict, "echo"), chat(strict, "echo"), chat(strict, "echo"):
        async with chat(strict, "echo"):
            response = await refusal(strict.chat_url("echo"))
            assert response.status_code == 429
            assert json.loads(response.body)["error"]["code"] == "rate_limited"
        async with chat(strict, "echo"):  # one closed: room again
            pass


async def test_connections_in_total_are_limited_with_503(start_server: Any, tmp_path: Path) -> None:
    server = start_server(models_dir(tmp_path / "models"), "--max-connections", "2")
    async with chat(server, "echo"), chat(server, "echo"):
        response = await refusal(server.chat_url("echo"))
        assert response.status_code == 503
        assert "limit of 2 connections" in json.loads(response.body)["error"]["message"]


async def test_no_limits_lifts_rate_and_connection_limits_with_a_warning(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server(
        models_dir(tmp_path / "models"),
        "--no-limits",
        "--max-connections",
        "1",
        "--max-messages-per-minute",
        "1",
    )
    server.wait_for_log("WARNING.*--no-limits")
    async with chat(server, "echo") as ws, chat(server, "echo"):
        for index in range(5):
            assert (await run_turn(ws, f"m{index}")).text == f"m{index}"


async def test_a_models_max_sessions_is_enforced_at_the_handshake(strict: ServerProcess) -> None:
    async with chat(strict, "capped"):
        response = await refusal(strict.chat_url("capped"))
        assert response.status_code == 503
        assert "max_sessions" in json.loads(response.body)["error"]["message"]
    for _ in range(500):  # the first session is ending: its slot frees when it has
        if not http(strict, "/v1/models/capped")[2]["sessions"]:
            break
        await asyncio.sleep(0.02)
    async with chat(strict, "capped") as ws:
        assert (await run_turn(ws, "again")).text == "again"


async def test_history_keeps_the_newest_messages_within_the_limits(strict: ServerProcess) -> None:
    async with chat(strict, "recorder") as ws:
        for index in range(3):
            await run_turn(ws, f"message {index}")
        state = json.loads((await run_turn(ws, "state")).text)
    # 4 messages at most: the oldest dropped first, the newest always kept
    assert [m["content"] for m in state["messages"]] == ["ok", "message 2", "ok", "state"]


async def test_history_bytes_are_limited_and_a_message_over_the_limit_is_refused(
    strict: ServerProcess,
) -> None:
    async with chat(strict, "recorder") as ws:
        for letter in "abc":
            await run_turn(ws, letter * 1200)
        state = json.loads((await run_turn(ws, "state")).text)
        contents = [m["content"] for m in state["messages"]]
        assert sum(len(c.encode()) for c in contents) <= 3000
        assert "a" * 1200 not in contents and "c" * 1200 in contents
        await ws.send("x" * 3001)
        error = await recv_frame(ws)
        assert error["code"] == "bad_request" and "history limit of 3000 bytes" in error["message"]


async def test_a_client_that_never_finishes_its_handshake_is_dropped(strict: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/chat/echo HTTP/1.1\r\nHost: x\r\n")  # ...and nothing more
        while sock.recv(65536):  # until the server hangs up (--handshake-timeout 1)
            pass
        assert time.monotonic() - started < 5


async def test_an_idle_session_is_closed_but_never_during_a_turn(
    start_server: Any, tmp_path: Path
) -> None:
    strict = start_server(models_dir(tmp_path / "models"), "--idle-timeout", "1")
    async with chat(strict, "echo") as ws:
        notice = await recv_frame(ws, timeout=5)
        assert notice["code"] == "timeout" and "no message for 1 s" in notice["message"]
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1000, "idle timeout")
    async with chat(strict, "slow") as ws:  # a turn longer than the idle limit is not idle
        turn = await run_turn(ws, "go")
        assert turn.text == "firstsecond"
        assert (await run_turn(ws, "again")).done["reason"] == "stop"


async def test_the_idle_clock_starts_again_when_a_long_turn_ends(
    start_server: Any, tmp_path: Path
) -> None:
    """A reader of a reply that took longer than the idle limit gets the whole limit after
    it, not what was left when the turn began."""
    models = copy_models(tmp_path / "models", "counter", source=RESUME_MODELS)
    live = start_server(models, "--idle-timeout", "2")
    async with chat(live, "counter") as ws:
        assert len((await run_turn(ws, "count 25 0.1")).chunks) == 25  # 2.5 s
        await asyncio.sleep(1.5)  # within 2 s of the turn's end
        assert (await run_turn(ws, "count 1")).text == "0 "


CLIENT = textwrap.dedent(
    """
    import asyncio, sys
    from websockets.asyncio.client import connect
    async def main():
        async with connect(sys.argv[1], ping_interval=None) as ws:
            await ws.recv()
            await ws.send("state")
            print(await ws.recv(), flush=True)
            await asyncio.sleep(60)
    asyncio.run(main())
    """
)


def test_a_dead_peer_is_dropped_by_keepalive_and_its_session_ends(
    start_server: Any, tmp_path: Path
) -> None:
    strict = start_server(
        models_dir(tmp_path / "models"), "--ping-interval", "0.5", "--ping-timeout", "0.5"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", CLIENT, strict.chat_url("recorder")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        instance = json.loads(json.loads(client.stdout.readline())["content"])["instance"]
        client.send_signal(signal.SIGSTOP)  # alive, but answers no ping
        deadline = time.monotonic() + 10
        while read_events(strict, instance)[-1:] != ["end"]:
            assert time.monotonic() < deadline, read_events(strict, instance)
            time.sleep(0.1)
    finally:
        client.kill()
        client.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("mode", ["shared", "isolated", "ray"])
async def test_a_client_that_stops_reading_pauses_the_model_and_memory_stays_flat(
    start_server: Any,
    tmp_path: Path,
    env_cache: Path,
    mode: str,
    request: pytest.FixtureRequest,
) -> None:
    """Shared, in a local worker, or as a Ray actor (whose turn stream Ray holds back once
    the server stops pulling it), the model is paused, not buffered without bound."""
    models = models_dir(tmp_path / "models")
    extra: list[str] = []
    env: dict[str, str] = {}
    if mode != "shared":
        (models / "flood" / "config.yaml").write_text("isolation: true\n")
    if mode == "ray":
        head = request.getfixturevalue("ray_head")
        extra, env = ["--ray-address", head.address], head.client_env
    server = start_server(models, "--env-cache-dir", str(env_cache), *extra, env=env)
    for _ in range(600):
        if http(server, "/v1/models/flood")[2]["status"] == "ready":
            break
        await asyncio.sleep(0.1)
    async with connect(server.chat_url("flood"), max_size=None) as ws:
        await ws.recv()
        # Stop reading for good: the TCP window fills and the server must stop writing.
        ws.transport.pause_reading()
        await ws.send("go")
        await asyncio.sleep(1.5)
        before = rss_kib(server.process.pid)
        await asyncio.sleep(2.5)
        after = rss_kib(server.process.pid)
        assert after - before < 8 * 1024, f"server RSS grew {after - before} KiB while paused"
        ws.transport.resume_reading()
        await ws.send('{"type":"cancel"}')
        received = 0
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if frame["type"] == "done":
                break
            received += len(frame.get("content", ""))
    # 4 s of an unpaused model would be gigabytes; buffers hold a few megabytes.
    assert received < 48 * 1024 * 1024, received


# ---------------------------------------------------------------------- secrets
async def test_model_secrets_reach_the_model_and_nothing_else(guarded: ServerProcess) -> None:
    async with chat(guarded, "secretive", additional_headers=bearer(KEYS[0])) as ws:
        assert (await run_turn(ws, "lengths")).text == "api=16 inline=22"
        turn = await run_turn(ws, "leak")
        assert turn.done["reason"] == "error"
        assert "secret" not in json.dumps(turn.frames)
    status, _, body = raw_http(
        guarded,
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n\r\n",
    )
    assert status == 200 and "env-secret-31337" not in body and "inline-secret" not in body
    guarded.wait_for_log("failed with key \\[secret\\] and \\[secret\\]")  # its traceback


async def test_debug_error_frames_mask_secrets(start_server: Any, tmp_path: Path) -> None:
    server = start_server(
        models_dir(tmp_path / "models"), "--debug", env={"SECRETIVE_TEST_KEY": "env-secret-31337"}
    )
    async with chat(server, "secretive") as ws:
        turn = await run_turn(ws, "leak")
    message = turn.errors[0]["message"]
    assert "RuntimeError: failed with key [secret] and [secret]" in message


def test_a_secret_from_an_unset_variable_fails_the_model_naming_the_variable(
    tmp_path: Path,
) -> None:
    server = launch_server(models_dir(tmp_path / "models"), tmp_path, env={})
    try:
        row = http(server, "/v1/models/secretive")[2]
        assert row["status"] == "failed"
        assert row["error"] == (
            "config.yaml: secrets.api_key: the environment variable SECRETIVE_TEST_KEY is not set"
        )
    finally:
        server.stop()


def test_os_environ_of_the_test_does_not_hold_the_secret() -> None:
    assert "SECRETIVE_TEST_KEY" not in os.environ  # so the unset-variable test means it


# ---------------------------------------------------------------------- clients with keys
async def test_the_python_client_sends_its_api_key(guarded: ServerProcess) -> None:
    from ws_server.client import ChatClient
    from ws_server.client import connect as chat_connect
    from ws_server.exceptions import ChatRefused

    async with chat_connect(guarded.ws_url, "echo", api_key=KEYS[1]) as client:
        assert await client.ask("keyed") == "keyed"
    with pytest.raises(ChatRefused) as refused:
        await ChatClient.open(guarded.ws_url, "echo")
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")


def test_the_terminal_client_reads_its_key_from_a_file_or_the_environment(
    guarded: ServerProcess, tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "ws_server", "chat", "echo", "--url", guarded.ws_url]
    key_file = tmp_path / "key"
    key_file.write_text(KEYS[0] + "\n")
    from_file = subprocess.run(
        [*cli, "-m", "hi", "--api-key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (from_file.returncode, from_file.stdout) == (0, "hi\n"), from_file.stderr
    from_env = subprocess.run(
        [*cli, "-m", "hey"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ANYTHING_AGENT_API_KEY": KEYS[1]},
    )
    assert (from_env.returncode, from_env.stdout) == (0, "hey\n"), from_env.stderr
    without = subprocess.run([*cli, "-m", "no"], capture_output=True, text=True, timeout=30)
    assert without.returncode == 1 and "requires an API key" in without.stderr


# ---------------------------------------------------------------------- hostile isolated models
def isolated_models(target: Path, *names: str) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        _copy(SECURITY_MODELS / name, target / name)
    return target


async def test_an_isolated_models_secrets_and_the_servers_descriptors_stay_out_of_reach(
    tmp_path: Path, env_cache: Path
) -> None:
    """Secrets travel over the worker's channel, never on a command line (which `ps` shows
    every local user); descriptors the server inherited never reach the model."""
    outside = tmp_path / "outside.txt"
    outside.write_text("the server's file")
    fd = os.open(outside, os.O_RDWR)
    server = launch_server(
        isolated_models(tmp_path / "models", "peek"),
        tmp_path,
        "--env-cache-dir",
        str(env_cache),
        env={"PEEK_TEST_TOKEN": "peek-secret-8d1e0f"},
        pass_fds=(fd,),
    )
    try:
        for _ in range(600):
            if http(server, "/v1/models/peek")[2]["status"] == "ready":
                break
            await asyncio.sleep(0.1)
        async with chat(server, "peek") as ws:
            seen = json.loads((await run_turn(ws, "look")).text)
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):  # noqa: ASYNC240
                try:
                    assert b"peek-secret-8d1e0f" not in cmdline.read_bytes(), cmdline
                except OSError:
                    continue  # gone meanwhile
    finally:
        server.stop()
        os.close(fd)
    assert seen["secret_length"] == len("peek-secret-8d1e0f")  # the model has it
    targets = set(seen["fds"].values())
    assert str(outside) not in targets
    allowed = ("pipe:", "socket:", "anon_inode:", "/dev/null", "/proc")
    assert all(t.startswith(allowed) for t in targets), targets


async def test_a_worker_writing_past_flow_control_is_stopped_and_memory_stays_bounded(
    start_server: Any, tmp_path: Path, env_cache: Path
) -> None:
    server = start_server(
        isolated_models(tmp_path / "models", "hog"), "--env-cache-dir", str(env_cache)
    )
    for _ in range(600):
        if http(server, "/v1/models/hog")[2]["status"] == "ready":
            break
        await asyncio.sleep(0.1)
    before = rss_kib(server.process.pid)
    async with connect(server.chat_url("hog"), max_size=None) as ws:
        await ws.recv()
        ws.transport.pause_reading()  # a slow reader: the server's queue for it must fill
        await ws.send("400")  # 400 MiB of chunk frames, written past every "pause"
        await asyncio.sleep(3)
        ws.transport.resume_reading()
        frames = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame["type"] == "chunk":
                continue
            frames.append(frame)
            if frame["type"] == "done":
                break
    assert frames[-1]["reason"] == "error"
    assert any(f.get("code") == "model_crashed" for f in frames), frames
    assert rss_kib(server.process.pid) - before < 128 * 1024
    server.wait_for_log("ignored flow control")


@pytest.mark.parametrize(
    ("requirements", "complaint"),
    [
        ("-e .\n", "editable installs build from source"),
        ("git+https://example.invalid/pkg.git\n", "VCS requirements"),
        ("-r /etc/hostname\n", "/etc/hostname is outside the model directory"),
        ("--no-binary :all:\nsix\n", "the option --no-binary is not allowed"),
    ],
)
def test_requirements_that_would_run_code_or_read_outside_the_model_are_refused(
    tmp_path: Path, requirements: str, complaint: str
) -> None:
    from ws_server.exceptions import ModelLoadError
    from ws_server.isolation.environments import check_requirements

    with pytest.raises(ModelLoadError, match=complaint):
        check_requirements(requirements, tmp_path)


def test_isolated_installs_never_run_a_packages_build_code(tmp_path: Path) -> None:
    """A source distribution's setup.py would run on the server, outside any sandbox: a
    model that needs one fails to load instead (wheels only), and its code never runs."""
    import tarfile

    marker = tmp_path / "BUILT"
    source = tmp_path / "src" / "evil-0.1"
    source.mkdir(parents=True)
    (source / "setup.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from setuptools import setup\nsetup(name='evil', version='0.1')\n"
    )
    (source / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 0.1\n")
    model = tmp_path / "models" / "evilpkg"
    model.mkdir(parents=True)
    with tarfile.open(model / "evil-0.1.tar.gz", "w:gz") as archive:
        archive.add(source, arcname="evil-0.1")
    shutil.copy(SHIPPED_MODELS / "echo" / "main.py", model / "main.py")
    (model / "config.yaml").write_text("isolation: true\n")
    (model / "requirements.txt").write_text("./evil-0.1.tar.gz\n")
    result = subprocess.run(
        [sys.executable, "-m", "ws_server", "check", "--models-dir", str(model.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "installing the environment failed" in result.stdout
    assert not marker.exists(), "the package's build code ran on the server"


async def test_emptying_or_deleting_the_keys_file_revokes_its_keys(
    start_server: Any, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("revocable-key-1\n")
    server = start_server(models_dir(tmp_path / "models"), "--api-keys-file", str(keys_file))
    async with chat(server, "echo", additional_headers=bearer("revocable-key-1")):
        pass
    keys_file.write_text("  # nothing but a comment now\n")
    assert (
        await refusal(server.chat_url("echo"), additional_headers=bearer("revocable-key-1"))
    ).status_code == 401
    assert (
        await refusal(
            server.chat_url("echo"), additional_headers=bearer("# nothing but a comment now")
        )
    ).status_code == 401
    keys_file.write_text("revocable-key-2\n")
    async with chat(server, "echo", additional_headers=bearer("revocable-key-2")):
        pass
    keys_file.unlink()
    assert (
        await refusal(server.chat_url("echo"), additional_headers=bearer("revocable-key-2"))
    ).status_code == 401


def test_api_keys_set_but_empty_refuse_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ws_server", "serve", "--port", "0", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "ANYTHING_AGENT_API_KEYS": " , "},
    )
    assert result.returncode == 2 and "holds no key" in result.stderr


def test_duplicate_authorization_or_origin_headers_are_refused_not_a_500(
    guarded: ServerProcess,
) -> None:
    status, _, body = raw_http(
        guarded,
        f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        f"Authorization: Bearer {KEYS[1]}\r\n\r\n",
    )
    assert status == 401 and "more than one Authorization" in body
    status, _, body = raw_http(
        guarded,
        "POST /v1/models/reload HTTP/1.1\r\nHost: x\r\nOrigin: http://a.example\r\n"
        f"Origin: {ALLOWED}\r\nAuthorization: Bearer {ADMIN_KEY}\r\nContent-Length: 0\r\n\r\n",
    )
    assert status == 403 and "more than one Origin" in body


def test_a_secret_is_masked_in_worker_output_however_it_is_cut_or_escaped() -> None:
    from ws_server import redaction

    redaction.register('quote"and\\slash-secret')
    assert "quote" not in redaction.redact(repr({"k": 'quote"and\\slash-secret'}))
    assert "quote" not in redaction.redact(json.dumps('quote"and\\slash-secret'))


def test_a_secret_in_a_model_description_or_load_error_is_masked_in_the_listing(
    guarded: ServerProcess,
) -> None:
    status, _, body = raw_http(
        guarded,
        f"GET /v1/models/secretive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n\r\n",
    )
    assert status == 200
    row = json.loads(body)
    assert "inline-secret-value-42" not in row["description"] + str(row["error"])
    assert "[secret]" in row["description"]
