"""Resuming a session after its connection drops (design.md, *Resuming*): the missed
frames byte for byte, exactly once, then the live stream; the window; the refusals."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RESUME_MODELS,
    SHIPPED_MODELS,
    ServerProcess,
    copy_models,
    http,
    launch_server,
    recv_frame,
    wait_until_built,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

V1 = "anything-agent.v1"


@pytest.fixture(scope="module", params=["shared", "isolated", "redis"])
def resuming(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, env_cache: Path
) -> Iterator[ServerProcess]:
    """One server over the counter model and echo: shared, then isolated (sessions in
    process memory), then shared with its sessions in Redis (``--redis-url``)."""
    models = copy_models(tmp_path_factory.mktemp("resume-models"), "counter", source=RESUME_MODELS)
    copy_models(models, "echo", source=SHIPPED_MODELS)
    if request.param == "isolated":
        config = models / "counter" / "config.yaml"
        config.write_text(config.read_text() + "isolation: true\n")
    env = None
    if request.param == "redis":
        env = {"ANYTHING_AGENT_REDIS_URL": request.getfixturevalue("redis_url")}
    live = launch_server(
        models,
        tmp_path_factory.mktemp("resume-events"),
        *("--resume-window", "5", "--env-cache-dir", str(env_cache)),
        env=env,
    )
    live.mode = request.param
    wait_until_built(live)
    yield live
    assert live.stop() == 0, live.log


async def open_resumable(server: ServerProcess, model: str = "counter") -> ClientConnection:
    ws = await connect(server.chat_url(model), subprotocols=[V1, "resumable"])  # type: ignore[list-item]
    ready = await recv_frame(ws)
    assert ready["type"] == "ready" and ready["resume_window"] > 0, ready
    ws.token = ready["resume_token"]  # type: ignore[attr-defined]
    ws.session_id = ready["session_id"]  # type: ignore[attr-defined]
    return ws


async def resume(
    server: ServerProcess, token: str, after: int, model: str = "counter"
) -> tuple[ClientConnection, dict[str, Any]]:
    """Reconnect offering ``resume.<token>.<after>``; the connection and its first frame."""
    entry = f"resume.{token}.{after}"
    ws = await connect(server.chat_url(model), subprotocols=[V1, entry])  # type: ignore[list-item]
    ws.token = token  # type: ignore[attr-defined]
    ws.last_seq = after  # type: ignore[attr-defined]
    first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    return ws, first


async def drop(ws: ClientConnection) -> None:
    """Lose the connection the way a network does: no close frame. (asyncio closes the
    socket on the loop's next turn, so give it one.)"""
    ws.transport.abort()
    await asyncio.sleep(0)


async def read_chunks(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    return [await recv_frame(ws) for _ in range(count)]


def numbers(frames: list[dict[str, Any]]) -> list[int]:
    return [int(f["content"]) for f in frames if f["type"] == "chunk"]


async def test_a_turn_resumed_mid_stream_delivers_every_chunk_exactly_once(
    resuming: ServerProcess,
) -> None:
    ws = await open_resumable(resuming)
    await ws.send("count 60 0.01")
    seen = await read_chunks(ws, random.randint(3, 30))
    await drop(ws)
    await asyncio.sleep(0.1)  # the turn runs on into the buffer meanwhile
    last = ws.last_seq  # type: ignore[attr-defined]
    again, resumed = await resume(resuming, ws.token, last)  # type: ignore[attr-defined]
    assert resumed["type"] == "resumed" and resumed["after"] == last
    assert resumed["session_id"] == ws.session_id and resumed["turn"] == 1  # type: ignore[attr-defined]
    while True:
        frame = await recv_frame(again)  # seq checked to be contiguous from `after`
        seen.append(frame)
        if frame["type"] == "done":
            break
    assert numbers(seen) == list(range(60))
    await again.close()


async def test_a_resume_that_missed_nothing_replays_nothing(resuming: ServerProcess) -> None:
    ws = await open_resumable(resuming)
    await ws.send("count 3")
    frames = [await recv_frame(ws) for _ in range(4)]
    assert frames[-1]["type"] == "done"
    await drop(ws)
    again, resumed = await resume(resuming, ws.token, 4)  # type: ignore[attr-defined]
    assert (resumed["replayed"], resumed["running"]) == (0, False)
    await again.send("count 2")
    assert numbers([await recv_frame(again) for _ in range(2)]) == [0, 1]  # seq 5, 6
    await again.close()


async def test_resume_for_another_models_endpoint_is_refused_and_a_new_session_follows(
    resuming: ServerProcess,
) -> None:
    ws = await open_resumable(resuming)
    await drop(ws)
    other, first = await resume(resuming, ws.token, 0, model="echo")  # type: ignore[attr-defined]
    assert first["type"] == "error" and first["code"] == "resume_expired" and "seq" not in first
    assert "another model" in first["message"]
    assert (await recv_frame(other))["type"] == "ready"  # a fresh echo session
    await other.close()
    # The old session ended: its token resumes nothing any more.
    again, first = await resume(resuming, ws.token, 0)  # type: ignore[attr-defined]
    assert first["code"] == "resume_expired"
    await again.close()


async def test_a_token_reused_after_its_session_ended_is_expired(resuming: ServerProcess) -> None:
    ws = await open_resumable(resuming)
    await ws.close()  # 1000: the session ends at once
    again, first = await resume(resuming, ws.token, 0)  # type: ignore[attr-defined]
    assert first["code"] == "resume_expired" and "unknown or expired" in first["message"]
    assert (await recv_frame(again))["type"] == "ready"
    await again.close()


async def test_an_after_beyond_the_last_frame_is_expired(resuming: ServerProcess) -> None:
    ws = await open_resumable(resuming)
    await drop(ws)
    again, first = await resume(resuming, ws.token, 10**15)  # type: ignore[attr-defined]
    assert first["code"] == "resume_expired"
    await again.close()


async def test_a_malformed_resume_entry_is_refused_at_the_handshake(
    resuming: ServerProcess,
) -> None:
    for entry in ("resume.abc", "resume.a$b.1", "resume.abc.-2", "resume.abc.1x"):
        with pytest.raises(InvalidStatus) as refused:
            await connect(resuming.chat_url("counter"), subprotocols=[V1, entry])  # type: ignore[list-item]
        assert refused.value.response.status_code == 400
        body = json.loads(refused.value.response.body)
        assert body["error"]["code"] == "bad_request" and "resume" in body["error"]["message"]


async def test_the_old_connection_is_closed_with_4001_when_another_resumes(
    resuming: ServerProcess,
) -> None:
    ws = await open_resumable(resuming)
    await ws.send("count 3")
    await recv_frame(ws)
    newer, resumed = await resume(resuming, ws.token, 1)  # type: ignore[attr-defined]
    assert resumed["type"] == "resumed"
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await recv_frame(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    frames = [await recv_frame(newer) for _ in range(3)]
    assert numbers(frames) == [1, 2] and frames[-1]["type"] == "done"
    await newer.close()


async def test_two_racing_resumes_leave_one_connection_with_every_frame(
    resuming: ServerProcess,
) -> None:
    ws = await open_resumable(resuming)
    await ws.send("count 40 0.01")
    await read_chunks(ws, 5)
    await drop(ws)
    results = await asyncio.gather(
        resume(resuming, ws.token, 5),  # type: ignore[attr-defined]
        resume(resuming, ws.token, 5),  # type: ignore[attr-defined]
    )
    assert [first["type"] for _, first in results] == ["resumed", "resumed"]
    survivors = []
    for connection, _ in results:
        try:
            frames = []
            while True:
                frame = await recv_frame(connection)
                frames.append(frame)
                if frame["type"] == "done":
                    survivors.append(frames)
                    break
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 4001
    assert len(survivors) == 1 and numbers(survivors[0]) == list(range(5, 40))
    for connection, _ in results:
        await connection.close()


async def test_a_cancel_just_before_the_drop_still_ends_the_turn_once(
    resuming: ServerProcess,
) -> None:
    ws = await open_resumable(resuming)
    await ws.send("count 1000 0.01")
    await read_chunks(ws, 2)
    await ws.send('{"type":"cancel"}')
    await drop(ws)
    await asyncio.sleep(0.2)
    again, resumed = await resume(resuming, ws.token, ws.last_seq)  # type: ignore[attr-defined]
    assert resumed["type"] == "resumed" and resumed["running"] is False
    frames = []
    while not frames or frames[-1]["type"] != "done":
        frames.append(await recv_frame(again))
    assert frames[-1]["reason"] == "cancelled"
    await again.send("count 1")
    assert (await recv_frame(again))["content"] == "0 "  # the session goes on
    await again.close()


async def test_a_thousand_drops_lose_and_repeat_nothing(resuming: ServerProcess) -> None:
    """A stream paced like a fast model's (a chunk a millisecond): what is in flight when a
    connection drops stays within the replay buffer, so every resume succeeds."""
    ws = await open_resumable(resuming)
    token = ws.token  # type: ignore[attr-defined]
    total = 8_000
    await ws.send(f"count {total} 0.001")
    seen: list[int] = []
    rng = random.Random(7)
    started = time.monotonic()
    for _ in range(1000):
        for _ in range(rng.randint(0, 10)):
            frame = await recv_frame(ws)
            assert frame["type"] == "chunk", frame
            seen.append(int(frame["content"]))
        await drop(ws)
        ws, resumed = await resume(resuming, token, ws.last_seq)  # type: ignore[attr-defined]
        assert resumed["type"] == "resumed", resumed
    while True:
        frame = await recv_frame(ws)
        if frame["type"] == "done":
            break
        seen.append(int(frame["content"]))
    assert seen == list(range(total))  # zero lost, zero repeated, in order
    assert time.monotonic() - started < 60
    await ws.close()


async def test_v1_clients_see_no_resume_and_their_session_ends_with_the_connection(
    resuming: ServerProcess,
) -> None:
    ws = await connect(resuming.chat_url("counter"))
    ready = await recv_frame(ws)
    assert "resume_token" not in ready and "resume_window" not in ready
    await ws.send("count 2")
    await recv_frame(ws)
    session = ready["session_id"]
    await drop(ws)
    resuming.wait_for_log(f"session={session} closed after 1 turns")  # at once, no window


# ------------------------------------------------------------------ the window and bounds
def hook_events(server: ServerProcess) -> dict[str, list[str]]:
    """The counter model's recorded hook calls, by instance."""
    found = {}
    for log in server.events_dir.glob("counter-*.log"):
        found[log.stem.removeprefix("counter-")] = log.read_text().split("\n")[:-1]
    return found


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


@pytest.fixture(params=["memory", "redis"])
def short_window(
    request: pytest.FixtureRequest, tmp_path: Path, start_server: Any
) -> ServerProcess:
    """A server whose sessions wait 1 s for a resume and keep 4 KiB of frames, in
    process memory, then in Redis."""
    models = copy_models(tmp_path / "models", "counter", source=RESUME_MODELS)
    env = None
    if request.param == "redis":
        env = {"ANYTHING_AGENT_REDIS_URL": request.getfixturevalue("redis_url")}
    live: ServerProcess = start_server(
        models, "--resume-window", "1", "--replay-buffer-bytes", "4096", env=env
    )
    return live


async def test_on_chat_end_waits_for_the_window_then_runs_once(
    short_window: ServerProcess,
) -> None:
    ws = await open_resumable(short_window)
    await ws.send("count 1")
    await recv_frame(ws)
    await recv_frame(ws)
    await drop(ws)
    await asyncio.sleep(0.5)
    (events,) = hook_events(short_window).values()
    assert "end" not in events  # deferred: the client may still come back
    await wait_for(lambda: "end" in next(iter(hook_events(short_window).values())), 5)
    await asyncio.sleep(0.3)
    (events,) = hook_events(short_window).values()
    assert events.count("end") == 1
    again, first = await resume(short_window, ws.token, 2)  # type: ignore[attr-defined]
    assert first["code"] == "resume_expired"
    await again.close()


async def test_a_normal_close_ends_a_resumable_session_at_once(
    short_window: ServerProcess,
) -> None:
    ws = await open_resumable(short_window)
    await ws.close()
    await wait_for(lambda: any("end" in e for e in hook_events(short_window).values()), 0.8)


async def test_missed_frames_beyond_the_buffer_fail_the_resume_whole(
    short_window: ServerProcess,
) -> None:
    """4 KiB holds about 40 frames; a client that missed 500 gets resume_expired, never
    a replay with a hole in it."""
    ws = await open_resumable(short_window)
    # 2 ms a chunk: the ~40 frames the buffer holds take 80 ms to stream, time enough for
    # the server to see the drop before frames the client never read are evicted (at
    # 0.5 ms, a loaded machine sometimes took longer and the resume rightly failed).
    await ws.send("count 500 0.002")
    await recv_frame(ws)
    await drop(ws)
    await asyncio.sleep(0.3)  # detached: the model pauses once the buffer is full
    again, first = await resume(short_window, ws.token, 1)  # type: ignore[attr-defined]
    assert first["type"] == "resumed", first  # paused, so nothing was dropped: it resumes
    frames = []
    while not frames or frames[-1]["type"] != "done":
        frames.append(await recv_frame(again))
    assert numbers(frames) == list(range(1, 500))
    # Attached, the buffer keeps only its bound: a resume from far back fails whole.
    await again.send("count 300")
    for _ in range(301):
        await recv_frame(again)
    await drop(again)
    late, first = await resume(short_window, ws.token, 600)  # type: ignore[attr-defined]
    assert first["code"] == "resume_expired" and "no longer buffered" in first["message"]
    await late.close()


async def test_a_detached_model_that_never_stops_is_paused_within_the_buffer(
    short_window: ServerProcess,
) -> None:
    ws = await open_resumable(short_window)
    await ws.send("forever 0.2")  # its flood starts once the connection is gone
    await recv_frame(ws)
    await drop(ws)
    await asyncio.sleep(0.6)
    again, first = await resume(short_window, ws.token, 1)  # type: ignore[attr-defined]
    assert first["type"] == "resumed" and first["running"] is True
    replayed = [await recv_frame(again) for _ in range(first["replayed"])]
    size = sum(len(json.dumps(f)) + 20 for f in replayed)  # seq taken off: add it back
    assert size <= 4096 * 1.3, size  # the model waited instead of filling memory
    await again.send('{"type":"cancel"}')
    while (await recv_frame(again))["type"] != "done":
        pass
    await again.close()


async def test_a_server_stopping_ends_a_turn_paused_on_a_full_buffer_at_once(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "counter", source=RESUME_MODELS)
    live: ServerProcess = start_server(
        models, "--replay-buffer-bytes", "4096", "--grace-period", "0.5"
    )
    ws = await open_resumable(live)
    await ws.send("forever 0.2")
    await recv_frame(ws)
    await drop(ws)
    await asyncio.sleep(0.6)  # its client away, the model is paused on the full buffer
    started = time.monotonic()
    assert live.stop() == 0
    assert time.monotonic() - started < 4, live.log  # the grace period, not the 10 s cleanup
    assert "cleanup still running" not in live.log


async def test_a_token_presented_with_another_api_key_is_expired(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "counter", source=RESUME_MODELS)
    live = start_server(models, env={"ANYTHING_AGENT_API_KEYS": "key-one,key-two"})
    one = {"Authorization": "Bearer key-one"}
    ws = await connect(
        live.chat_url("counter"),
        subprotocols=[V1, "resumable"],
        additional_headers=one,  # type: ignore[list-item]
    )
    token = (await recv_frame(ws))["resume_token"]
    await drop(ws)
    entry = f"resume.{token}.0"
    other = await connect(
        live.chat_url("counter"),
        subprotocols=[V1, entry],  # type: ignore[list-item]
        additional_headers={"Authorization": "Bearer key-two"},
    )
    first = json.loads(await other.recv())
    assert first["code"] == "resume_expired" and "another API key" in first["message"]
    await other.close()


@pytest.mark.parametrize("leaving", ["close", "drop"])
@pytest.mark.parametrize("resumable", [False, True])
async def test_a_client_leaving_a_model_that_never_awaits_stalls_nothing(
    resuming: ServerProcess, leaving: str, resumable: bool
) -> None:
    """The model yields without ever awaiting: once its client is gone, its turn must
    wait (for a resume, or to be stopped), not spin the server's event loop."""
    offers = [V1, "resumable"] if resumable else [V1]
    # The close handshake can't finish while megabytes queue ahead of it: don't wait it out.
    url = resuming.chat_url("counter")
    ws = await connect(url, subprotocols=offers, close_timeout=0.5)  # type: ignore[list-item]
    session = (await recv_frame(ws))["session_id"]
    await ws.send("flood 100000000")
    await recv_frame(ws)
    if leaving == "close":
        await ws.close()
    else:
        await drop(ws)
    started = time.monotonic()
    status, _, body = await asyncio.to_thread(http, resuming, "/healthz")
    assert status == 200 and time.monotonic() - started < 2, body
    if not resumable or leaving == "close":  # ended at once; else it waits for a resume
        await asyncio.to_thread(resuming.wait_for_log, f"session={session} closed after 1")


def metric(server: ServerProcess, name: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = http(server, "/metrics")[2]
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_detached_sessions_resumes_and_replayed_frames(
    short_window: ServerProcess,
) -> None:
    ws = await open_resumable(short_window)
    await ws.send("count 5")
    await recv_frame(ws)
    await drop(ws)
    await wait_for(lambda: metric(short_window, "anything_agent_sessions_detached") == 1)
    assert metric(short_window, "anything_agent_replay_buffer_bytes") > 0
    again, resumed = await resume(short_window, ws.token, 1)  # type: ignore[attr-defined]
    assert resumed["replayed"] == 5  # four chunks and the done
    assert metric(short_window, "anything_agent_sessions_detached") == 0
    resumes = 'anything_agent_resumes_total{outcome="resumed"}'
    assert metric(short_window, resumes) == 1
    assert metric(short_window, "anything_agent_replayed_frames_total") == 5
    await again.close()
    bogus, _ = await resume(short_window, ws.token, 0)  # type: ignore[attr-defined]
    assert metric(short_window, 'anything_agent_resumes_total{outcome="expired"}') == 1
    await bogus.close()
