"""Hook order: on_chat_start, then on_chat_messages per turn, then on_chat_end exactly once,
whether the client leaves politely, vanishes mid-stream, or the server shuts down."""

from __future__ import annotations

import asyncio
import json
import signal
import time
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
        private_server.send_signal(signal.SIGTERM)
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
        private_server.send_signal(signal.SIGTERM)
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
        private_server.send_signal(signal.SIGTERM)
        private_server.wait_for_log("stopping:")
        with pytest.raises(ConnectionRefusedError):  # the listening socket is closed
            async with connect(private_server.chat_url("recorder"), open_timeout=2) as ws:
                await recv_frame(ws, timeout=2)
    assert private_server.stop() == 0


async def test_sync_generator_is_closed_before_on_chat_end(server: ServerProcess) -> None:
    ws = await connect(server.chat_url("sync_recorder"))
    await recv_frame(ws)
    await ws.send("id")
    instance = (await read_turn(ws)).text
    await ws.send("go")
    assert (await recv_frame(ws))["content"] == "0 "
    ws.transport.abort()  # mid-step: the blocking step must finish, then the generator close
    events = await wait_for_events(server, instance, "end")
    assert events[:2] == ["start", "messages"]
    assert events[-2:] == ["generator-closed", "end"]


async def test_cancelled_sync_generator_never_overlaps_the_next_turn(
    server: ServerProcess,
) -> None:
    async with chat(server, "sync_recorder") as ws:
        instance = (await run_turn(ws, "id")).text
        await ws.send("go")
        await recv_frame(ws)
        await ws.send('{"type":"cancel"}')
        assert (await read_turn(ws)).done["reason"] == "cancelled"
        # By the time done arrives, the generator is closed: nothing of that turn runs on.
        assert read_events(server, instance)[-1] == "generator-closed"
        await ws.send("go")
        await recv_frame(ws)
        await ws.send('{"type":"cancel"}')
        await read_turn(ws)
    events = await wait_for_events(server, instance, "end")
    first_close = events.index("generator-closed")
    assert events[first_close + 1] == "messages"  # the second turn began only after it


async def test_client_leaving_during_on_chat_start_stops_it_and_ends(
    server: ServerProcess,
) -> None:
    ws = await connect(server.chat_url("slow_start"))  # on_chat_start sleeps 30 s
    log = server.events_dir / "slow_start-default.log"
    for _ in range(200):
        if log.exists():
            break
        await asyncio.sleep(0.02)
    ws.transport.abort()
    for _ in range(200):
        if log.read_text().split()[-1:] == ["end"]:
            break
        await asyncio.sleep(0.02)
    assert log.read_text().split() == ["start-begun", "start-cancelled", "end"]


async def test_on_chat_start_past_timeout_is_a_timeout_error(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "slow_start")
    (models / "slow_start" / "config.yaml").write_text(
        "parameters: {pause: 30, tag: t}\nsettings: {timeout: 0.5}\n"
    )
    live = start_server(models)
    async with connect(live.chat_url("slow_start")) as ws:
        error = await recv_frame(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_frame(ws)
    assert error["type"] == "error" and error["code"] == "timeout"
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_shutdown_does_not_wait_out_a_slow_on_chat_start(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "slow_start")
    live = start_server(models, "--grace-period", "1")
    async with connect(live.chat_url("slow_start")) as ws:
        live.wait_for_log("slow_start.* opened")
        await asyncio.sleep(0.2)
        started = time.monotonic()
        live.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_frame(ws, timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert live.stop() == 0
    assert time.monotonic() - started < 5
    log = live.events_dir / "slow_start-default.log"
    assert log.read_text().split() == ["start-begun", "start-cancelled", "end"]


async def test_new_turns_are_refused_while_shutting_down(private_server: ServerProcess) -> None:
    async with chat(private_server, "slow") as ws:
        await ws.send("go")
        await recv_frame(ws)
        private_server.send_signal(signal.SIGTERM)
        private_server.wait_for_log("stopping:")
        await ws.send("one more")
        refused = await recv_frame(ws)
        assert refused["type"] == "error" and refused["code"] == "unavailable"
        assert (await read_turn(ws)).done == {"type": "done", "turn": 1, "reason": "stop"}
    assert private_server.stop() == 0


async def test_second_signal_cancels_running_turns_at_once(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "recorder")
    live = start_server(models, "--grace-period", "60")
    async with chat(live, "recorder") as ws:
        await ws.send("stream 1000")
        await recv_frame(ws)
        live.send_signal(signal.SIGINT)
        live.wait_for_log("stopping:")
        live.send_signal(signal.SIGINT)
        frames = []
        with pytest.raises(ConnectionClosed):
            while True:
                frames.append(await recv_frame(ws, timeout=5))
    assert frames[-1]["reason"] == "cancelled"
    assert live.stop() == 0
