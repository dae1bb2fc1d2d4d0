"""Plain HTTP/1.1 on the chat port (``http/http1.py`` behind ``http/front_door.py``), byte
by byte from a raw socket: what curl and HTTP libraries rely on beyond the happy path."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
from conftest import SHIPPED_MODELS, ServerProcess, copy_models

ECHO = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()


def post_head(length: int, *extra: str) -> bytes:
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: test",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(status_line.split()[1]), headers, rest[:length]


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_a_client_waiting_for_100_continue_is_told_to_send_its_body(
    clients_server: ServerProcess,
) -> None:
    with connect(clients_server) as sock:
        sock.sendall(post_head(len(ECHO), "Expect: 100-continue"))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
        sock.sendall(ECHO)
        status, _, body = read_response(sock)
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "hi"


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    clients_server: ServerProcess,
) -> None:
    with connect(clients_server) as sock:
        sock.sendall(post_head(10**9))
        status, headers, body = read_response(sock)
        assert sock.recv(1024) == b""  # and the connection is closed
    assert status == 413 and headers["connection"] == "close"
    assert "over this server's limit of 1048576 bytes" in json.loads(body)["error"]["message"]


def test_pipelined_requests_are_answered_in_order(clients_server: ServerProcess) -> None:
    second = ECHO.replace(b'"hi"', b'"two words"')
    with connect(clients_server) as sock:
        sock.sendall(post_head(len(ECHO)) + ECHO + post_head(len(second)) + second)
        replies = [read_response(sock) for _ in range(2)]
    assert [json.loads(b)["choices"][0]["message"]["content"] for _, _, b in replies] == [
        "hi",
        "two words",
    ]


def test_a_malformed_request_gets_a_400_that_says_so(clients_server: ServerProcess) -> None:
    with connect(clients_server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n")
        status, _, body = read_response(sock)
    assert status == 400 and "malformed HTTP request" in json.loads(body)["error"]["message"]
    assert httpx.get(clients_server.http_url + "/healthz").status_code == 200


def test_head_works_wherever_get_does(clients_server: ServerProcess) -> None:
    for path in ("/healthz", "/v1/models", "/"):
        head = httpx.head(clients_server.http_url + path)
        get = httpx.get(clients_server.http_url + path)
        assert head.status_code == get.status_code == 200
        assert head.content == b"" and head.headers["content-length"] == str(len(get.content))


def test_a_wrong_method_is_405_with_allow(clients_server: ServerProcess) -> None:
    response = httpx.delete(clients_server.http_url + "/v1/models")
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = httpx.get(clients_server.http_url + "/v1/models/reload")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    response = httpx.put(clients_server.http_url + "/v1/chat/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"  # OpenAI's envelope


def test_a_connection_that_never_sends_a_request_is_closed(
    tmp_path: Path, start_server: Any
) -> None:
    live = start_server(copy_models(tmp_path / "m", "slow"), "--handshake-timeout", "0.5")
    with connect(live) as sock:
        began = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - began < 3


def test_shutdown_ends_replies_with_an_error_and_closes_idle_connections(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "m", "slow", "slow_start")
    (models / "slow" / "config.yaml").write_text("parameters:\n  pause: 30\n")
    copy_models(models, "echo", source=SHIPPED_MODELS)
    live = start_server(models, "--grace-period", "0.5")
    idle = httpx.Client(base_url=live.http_url, timeout=10)
    assert idle.post("/v1/chat/completions", content=ECHO).status_code == 200  # kept alive
    starting = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    start_body = ECHO.replace(b'"echo"', b'"slow_start"')  # on_chat_start takes 30 s
    starting.sendall(post_head(len(start_body)) + start_body)
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.stream("POST", live.http_url + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert "first" in next(lines)
        began = time.monotonic()
        live.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert json.loads(rest[0].removeprefix("data: "))["error"]["code"] == "unavailable"
    assert rest[1:] == ["data: [DONE]"]
    status, _, answer = read_response(starting)
    assert status == 503 and json.loads(answer)["error"]["code"] == "unavailable"
    starting.close()
    assert live.stop() == 0
    assert time.monotonic() - began < 5
    idle.close()


def test_plain_http_connections_count_against_the_per_address_limit(
    tmp_path: Path, start_server: Any
) -> None:
    live = start_server(
        copy_models(tmp_path / "m", "echo", source=SHIPPED_MODELS),
        "--max-connections-per-address",
        "2",
    )
    held = [connect(live) for _ in range(2)]
    for sock in held:  # each keeps its connection after a request
        sock.sendall(post_head(len(ECHO)) + ECHO)
        assert read_response(sock)[0] == 200
    with connect(live) as third:
        third.sendall(post_head(len(ECHO)) + ECHO)
        status, _, body = read_response(third)
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limited"
    held.pop().close()
    time.sleep(0.2)
    assert post_status(live) == 200
    for sock in held:
        sock.close()


def post_status(server: ServerProcess) -> int:
    with connect(server) as sock:
        sock.sendall(post_head(len(ECHO)) + ECHO)
        return read_response(sock)[0]


def test_head_of_a_refused_request_has_no_body(clients_server: ServerProcess) -> None:
    with connect(clients_server) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and body == b""
    assert "HTTP connection from" not in clients_server.log  # no traceback


def test_too_much_pipelined_data_closes_the_connection_after_the_answer(
    clients_server: ServerProcess,
) -> None:
    with connect(clients_server) as sock:
        sock.sendall(post_head(len(ECHO)) + ECHO + b"x" * 200_000)
        status, _, _ = read_response(sock)
        assert status == 200
        while sock.recv(65536):
            pass  # and then the server closes it
