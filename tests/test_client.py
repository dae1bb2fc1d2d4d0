"""The Python client API (``ws_server.client``) as a bot frontend uses it, against a real
server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, client_models

from ws_server.client import ChatClient, chat_url, connect
from ws_server.exceptions import (
    ChatRefused,
    ClientError,
    ConnectionLost,
    ServerError,
    TurnFailed,
)


async def test_a_turn_streams_each_chunk_as_the_model_yields_it(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "echo") as chat:
        assert (chat.model, chat.version) == ("echo", "1.0.0")
        assert len(chat.session_id) == 16
        turn = await chat.send("one two three")
        assert turn.number == 1
        received = [chunk async for chunk in turn]
        assert received == ["one", " two", " three"]
        assert turn.reason == "stop"
        assert turn.text == "one two three"


async def test_ask_returns_the_whole_reply_and_history_mirrors_the_server(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "scripted") as chat:
        assert await chat.ask("first") == "first"
        assert await chat.ask("recall") == "You said 2 things: first | recall"
        assert chat.history == [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "first"},
            {"role": "user", "content": "recall"},
            {"role": "assistant", "content": "You said 2 things: first | recall"},
        ]
        chat.history.clear()  # a copy: the session's history is not touched
        assert len(chat.history) == 4


async def test_replace_history_runs_a_turn_on_the_given_messages(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "scripted") as chat:
        await chat.ask("forgotten")
        given = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "recall"},
        ]
        turn = await chat.replace_history(given)
        assert await turn.reply() == "You said 2 things: a | recall"
        assert chat.history == [*given, {"role": "assistant", "content": turn.text}]


async def test_cancel_from_another_task_ends_the_turn_with_cancelled(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "scripted") as chat:
        turn = await chat.send("long")
        chunks = []
        async for chunk in turn:
            chunks.append(chunk)
            if len(chunks) == 2:
                asyncio.get_running_loop().create_task(chat.cancel())
        assert turn.reason == "cancelled"
        assert 2 <= len(chunks) < 20
        assert chat.running is None
        # the partial reply is in the history, as on the server
        assert chat.history[-1] == {"role": "assistant", "content": turn.text}
        assert await chat.ask("recall") == "You said 2 things: long | recall"


async def test_a_failed_turn_raises_turn_failed_and_the_session_goes_on(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "scripted") as chat:
        turn = await chat.send("boom")
        with pytest.raises(TurnFailed) as failure:
            async for _ in turn:
                pass
        error = failure.value
        assert (error.code, error.reason, error.turn) == ("model_error", "error", 1)
        assert error.partial == "Starting… "
        assert "hunter2" not in error.message
        assert await chat.ask("after") == "after"


async def test_a_timed_out_turn_raises_turn_failed_with_timeout(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "sleepy") as chat:
        with pytest.raises(TurnFailed) as failure:
            await chat.ask("hi")
        assert (failure.value.code, failure.value.reason) == ("timeout", "timeout")
        assert failure.value.partial == "dozing"


async def test_sending_while_a_turn_runs_is_refused_locally(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "scripted") as chat:
        turn = await chat.send("long")
        with pytest.raises(ClientError, match="turn 1 is still running"):
            await chat.send("too soon")
        await turn.cancel()
        await turn.reply()
        assert turn.reason == "cancelled"


@pytest.mark.parametrize(
    ("model", "status", "code", "named"),
    [
        ("no_such_model", 404, "not_found", "no_such_model"),
        ("broken_syntax", 503, "unavailable", "main.py"),
    ],
)
async def test_a_refused_handshake_raises_chat_refused_with_the_servers_reason(
    clients_server: ServerProcess, model: str, status: int, code: str, named: str
) -> None:
    with pytest.raises(ChatRefused) as refusal:
        await ChatClient.open(clients_server.ws_url, model)
    assert (refusal.value.status, refusal.value.code) == (status, code)
    assert named in refusal.value.message
    assert f"HTTP {status}" in refusal.value.message


async def test_no_server_at_the_address_raises_chat_refused_with_status_0(
    unused_tcp_port: int,
) -> None:
    with pytest.raises(ChatRefused) as refusal:
        await ChatClient.open(f"ws://127.0.0.1:{unused_tcp_port}", "echo", open_timeout=5)
    assert (refusal.value.status, refusal.value.code) == (0, "unreachable")
    assert f"127.0.0.1:{unused_tcp_port}" in refusal.value.message


async def test_a_failing_on_chat_start_raises_server_error(
    clients_server: ServerProcess,
) -> None:
    with pytest.raises(ServerError) as failure:
        await ChatClient.open(clients_server.ws_url, "start_fails")
    assert failure.value.code == "model_error"
    assert "SECRET-START" not in failure.value.message


async def test_frames_can_be_observed_raw(clients_server: ServerProcess) -> None:
    raw: list[str] = []
    async with connect(clients_server.ws_url, "echo", on_frame=raw.append) as chat:
        await chat.ask("hi")
    assert raw[0].startswith('{"type":"ready"')
    assert raw[1:] == [
        '{"type":"chunk","turn":1,"content":"hi"}',
        '{"type":"done","turn":1,"reason":"stop"}',
    ]


async def test_the_server_going_away_mid_turn_raises_connection_lost(
    start_server: Any, tmp_path: Path
) -> None:
    server = start_server(client_models(tmp_path / "models"), "--grace-period", "0")
    async with connect(server.ws_url, "scripted") as chat:
        turn = await chat.send("long")
        async for _ in turn:
            if len(turn.chunks) == 2:
                break
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        # the server cancels the running turn, then closes with 1001 (going away)
        async for _ in turn:
            pass
        assert turn.reason == "cancelled"
        # Then messages are refused (no new turns while stopping) until the connection
        # closes with 1001 (going away).
        for _ in range(50):
            try:
                await chat.ask("anyone?")
            except ServerError as refused:
                assert refused.code == "unavailable" and "shutting down" in refused.message
                assert chat.running is None  # the refused message never became a turn
            except ConnectionLost as lost:
                assert lost.close_code == 1001
                break
        else:
            raise AssertionError("the connection never closed")
    assert await stopping == 0


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("ws://127.0.0.1:8000", "ws://127.0.0.1:8000/v1/chat/echo"),
        ("http://example.test:8000/", "ws://example.test:8000/v1/chat/echo"),
        ("https://example.test/prefix", "wss://example.test/prefix/v1/chat/echo"),
        ("127.0.0.1:9000", "ws://127.0.0.1:9000/v1/chat/echo"),
    ],
)
def test_chat_url_maps_a_server_address_to_the_model_endpoint(base: str, expected: str) -> None:
    assert chat_url(base, "echo") == expected


def test_chat_url_quotes_the_model_name_and_rejects_other_schemes() -> None:
    assert chat_url("ws://h", "a/../b") == "ws://h/v1/chat/a%2F..%2Fb"
    with pytest.raises(ValueError, match="not a server URL"):
        chat_url("ftp://h", "echo")
