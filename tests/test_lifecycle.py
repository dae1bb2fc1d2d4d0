"""Hook order: on_chat_start, then on_chat_messages per turn, then on_chat_end exactly once,
whether the client leaves politely, vanishes mid-stream, or the server shuts down."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ServerProcess,
    chat,
    copy_models,
    read_events,
    read_turn,
    recv_frame,
    run_turn,
    wait_for_events,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def instance_of(ws: Any) -> str:
    return str(json.loads((await run_turn(ws, "state")).text)["instance"])


async def test_hooks_run_in_order_and_end_exactly_once(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        instance = await instance_of(ws)
        await run_turn(ws, "hello")
    events = await wait_for_events(server, instance, "end")
    assert events == ["start", "messages", "messages", "end"]


async def test_abrupt_disconnect_mid_stream_cancels_turn_and_ends_once(
    server: ServerProcess,
) -> None:
    ws = await connect(server.chat_url("recorder"))
    await recv_frame(ws)
    instance = await instance_of(ws)
    await ws.send("stream 200")
    assert (await recv_frame(ws))["type"] == "chunk"
    ws.transport.abort()  # no close frame: the TCP connection just drops
    events = await wait_for_events(server, instance, "end")
    assert events == ["start", "messages", "messages", "generator-closed", "end"]
    await asyncio.sleep(0.3)
    assert read_events(server, instance).count("end") == 1


async def test_closing_politely_mid_stream_cancels_turn(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        instance = await instance_of(ws)
        await ws.send("stream 200")
        await recv_frame(ws)
    events = await wait_for_events(server, instance, "end")
    assert events[-2:] == ["generator-closed", "end"]


@pytest.fixture
def private_server(tmp_path: Path, start_server: Any) -> ServerProcess:
    models = copy_models(tmp_path / "models", "recorder", "slow")
    return start_server(models, "--grace-period", "3")  # type: ignore[no-any-return]


async def test_shutdown_lets_running_turn_finish_then_closes_1001(
    private_server: ServerProcess,
) -> None:
    async with chat(private_server, "recorder") as idle, chat(private_server, "slow") as busy:
        idle_instance = await instance_of(idle)
        await busy.send("go")  # 1.5 s turn, inside the 3 s grace period
        assert (await recv_frame(busy))["content"] == "first"
        private_server.process.send_signal(signal.SIGTERM)
        rest = await read_turn(busy)
        assert rest.chunks == ["second"] and rest.done["reason"] == "stop"
        for ws in (idle, busy):
            with pytest.raises(ConnectionClosed) as closed:
                await recv_frame(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert private_server.stop() == 0
    assert read_events(private_server, idle_instance) == ["start", "messages", "end"]


async def test_shutdown_cancels_turns_still_running_after_grace(
    private_server: ServerProcess,
) -> None:
    async with chat(private_server, "recorder") as ws:
        instance = await instance_of(ws)
        await ws.send("stream 1000")  # 50 s of chunks: far past the 3 s grace period
        await recv_frame(ws)
        private_server.process.send_signal(signal.SIGTERM)
        frames = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frames.append(await recv_frame(ws, timeout=8))
    assert frames[-1] == {"type": "done", "turn": 2, "reason": "cancelled"}
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert private_server.stop() == 0
    assert read_events(private_server, instance) == [
        "start",
        "messages",
        "messages",
        "generator-closed",
        "end",
    ]


async def test_no_new_connections_during_shutdown(private_server: ServerProcess) -> None:
    async with chat(private_server, "slow") as busy:
        await busy.send("go")
        await recv_frame(busy)
        private_server.process.send_signal(signal.SIGTERM)
        private_server.wait_for_log("stopping:")
        with pytest.raises(OSError):  # the listening socket is closed: refused
            async with connect(private_server.chat_url("recorder"), open_timeout=2) as ws:
                await recv_frame(ws, timeout=2)
    assert private_server.stop() == 0
