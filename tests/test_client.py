"""The Python client API (``ws_server.client``) as a bot frontend uses it, against a real
server."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    RESUME_MODELS,
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    client_models,
    launch_server,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from ws_server import protocol
from ws_server.client import ChatClient, ResumeNotice, chat_url, connect
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
        '{"type":"chunk","seq":1,"turn":1,"content":"hi"}',
        '{"type":"done","seq":2,"turn":1,"reason":"stop"}',
    ]


# ---------------------------------------------------------------------- model events
# What the agent_events model reports for a message: (name, step name, status, parent set).
AGENT_EVENTS = [
    ("status", None, None, False),
    ("step", "search", "running", False),
    ("step", "fetch", "running", True),
    ("step", "fetch", "done", True),
    ("step", "search", "done", False),
    ("custom", None, None, False),
]


def event_summary(event: protocol.Event) -> tuple[str, Any, Any, bool]:
    data = event.data
    if event.name != "step":
        return (event.name, None, None, False)
    return (event.name, data["name"], data["status"], data["parent_id"] is not None)


async def test_a_turns_events_are_kept_in_order_while_its_chunks_are_iterated(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "agent_events") as chat:
        turn = await chat.send("hello")
        assert [chunk async for chunk in turn] == ["Answer: ", "hello", "done"]
        assert [event_summary(e) for e in turn.events] == AGENT_EVENTS
        status, search, fetch, fetched, searched, custom = turn.events
        assert status.data == {"text": "thinking"} and custom.data == {"value": 1}
        assert {e.turn for e in turn.events} == {1}
        assert search.data["input"] == {"q": "hello"} and search.data["output"] is None
        assert fetch.data["parent_id"] == search.data["id"] != fetch.data["id"]
        assert fetched.data["id"] == fetch.data["id"]
        assert fetched.data["output"] == "<b>not bold</b>"
        assert (searched.data["id"], searched.data["output"]) == (search.data["id"], "found 2")
        # events are not part of the reply, nor of the history
        assert chat.history[-1] == {"role": "assistant", "content": "Answer: hellodone"}
        second = await chat.send("again")
        assert await second.reply() == "Answer: againdone"
        assert [event_summary(e) for e in second.events] == AGENT_EVENTS
        assert {e.turn for e in second.events} == {2}


async def test_items_yield_chunks_and_events_in_the_order_they_arrived(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "agent_events") as chat:
        turn = await chat.send("hi")
        items = [item async for item in turn.items()]
        assert turn.reason == "stop"
        shown = [item if isinstance(item, str) else event_summary(item) for item in items]
        assert shown == [*AGENT_EVENTS[:5], "Answer: ", "hi", AGENT_EVENTS[5], "done"]
        assert turn.events == [item for item in items if isinstance(item, protocol.Event)]
        assert turn.chunks == ["Answer: ", "hi", "done"]
        seqs = [item.seq for item in turn.events]
        assert seqs == sorted(seqs) and seqs[0] == 1


async def test_events_arrive_exactly_once_across_drops_anywhere_in_the_turn(
    clients_server: ServerProcess,
) -> None:
    """A drop after each item in turn (the connection resumed each time): every event and
    chunk still comes once, in order, whether the caller reads items or only chunks."""
    notices: list[ResumeNotice] = []
    async with connect(clients_server.ws_url, "agent_events", on_resume=notices.append) as chat:
        for drop_after in range(9):
            turn = await chat.send(f"m{drop_after}", params={"pause": 0.05})
            items = []
            async for item in turn.items():
                items.append(item)
                if len(items) == drop_after + 1:
                    assert drop(chat)
            texts = [item for item in items if isinstance(item, str)]
            assert texts == ["Answer: ", f"m{drop_after}", "done"], drop_after
            assert [event_summary(e) for e in turn.events] == AGENT_EVENTS, drop_after
            assert len(items) == 9
        turn = await chat.send("chunks only", params={"pause": 0.5})
        asyncio.get_running_loop().call_later(0.25, drop, chat)  # while "search" runs
        assert await turn.reply() == "Answer: chunks onlydone"
        assert [event_summary(e) for e in turn.events] == AGENT_EVENTS
    assert len(notices) == 10 and {n.outcome for n in notices} == {"resumed"}


async def test_a_turn_waiting_for_a_slot_gets_queued_events_first(
    start_server: Any, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(TEST_MODELS / "agent_events", models / "agent_events")
    (models / "agent_events" / "config.yaml").write_text("concurrency: {max_turns: 1}\n")
    server = start_server(models)
    async with (
        connect(server.ws_url, "agent_events") as first,
        connect(server.ws_url, "agent_events") as second,
    ):
        running = await first.send("first", params={"pause": 0.5})
        async for item in running.items():
            if isinstance(item, protocol.Event) and item.name == "step":
                break  # it holds the one slot
        waiting = await second.send("second")
        assert await waiting.reply() == "Answer: seconddone"
        assert waiting.events[0].name == "queued"
        assert waiting.events[0].data == {"position": 1}
        assert [event_summary(e) for e in waiting.events[1:]] == AGENT_EVENTS
        assert await running.reply() == "Answer: firstdone"


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


# ---------------------------------------------------------------------- params


async def test_params_reach_the_model_for_their_turn_only(clients_server: ServerProcess) -> None:
    async with connect(clients_server.ws_url, "params_echo") as chat:
        turn = await chat.send("hi", params={"temperature": 0.5})
        assert json.loads(await turn.reply()) == {"temperature": 0.5}
        assert json.loads(await chat.ask("again")) == {}
        given = {"stop": ["x", "y"], "options": {"n": 2, "stream": True}, "seed": None}
        assert json.loads(await chat.ask("nested", params=given)) == given
        assert json.loads(await chat.ask("empty", params={})) == {}
        assert [m["content"] for m in chat.history] == [
            "hi",
            '{"temperature": 0.5}',
            "again",
            "{}",
            "nested",
            json.dumps(given, sort_keys=True),
            "empty",
            "{}",
        ]


async def test_replace_history_sends_params_too(clients_server: ServerProcess) -> None:
    async with connect(clients_server.ws_url, "params_echo") as chat:
        given = [{"role": "user", "content": "from scratch"}]
        turn = await chat.replace_history(given, params={"style": "terse"})
        assert json.loads(await turn.reply()) == {"style": "terse"}
        assert chat.history == [*given, {"role": "assistant", "content": '{"style": "terse"}'}]


@pytest.mark.parametrize("params", [["temperature", 0.5], "temperature=0.5", 0.5])
async def test_params_that_are_not_a_dict_raise_type_error_and_nothing_is_sent(
    clients_server: ServerProcess, params: Any
) -> None:
    raw: list[str] = []
    async with connect(clients_server.ws_url, "params_echo", on_frame=raw.append) as chat:
        with pytest.raises(TypeError, match="params must be a dict"):
            await chat.send("hi", params=params)
        with pytest.raises(TypeError, match="params must be a dict"):
            await chat.ask("hi", params=params)
        with pytest.raises(TypeError, match="params must be a dict"):
            await chat.replace_history([{"role": "user", "content": "hi"}], params=params)
        assert (chat.running, chat.history, len(raw)) == (None, [], 1)  # only the ready frame
        turn = await chat.send("then")
        assert (turn.number, json.loads(await turn.reply())) == (1, {})


async def test_params_over_16_kib_are_refused_and_the_session_goes_on(
    clients_server: ServerProcess,
) -> None:
    async with connect(clients_server.ws_url, "params_echo") as chat:
        with pytest.raises(ServerError) as refused:
            await chat.ask("big", params={"text": "x" * (16 * 1024)})
        assert refused.value.code == "bad_request"
        assert (chat.running, chat.history) == (None, [])
        assert json.loads(await chat.ask("small", params={"n": 1})) == {"n": 1}


# ---------------------------------------------------------------------- resuming


def resume_models(target: Path) -> Path:
    """The numbers model (numbered chunks, so a repeat or a gap shows) and echo."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RESUME_MODELS / "numbers", target / "numbers")
    shutil.copytree(SHIPPED_MODELS / "echo", target / "echo")
    return target


class TcpProxy:
    """A TCP proxy on 127.0.0.1, in a thread of its own, between clients and a server: the
    network between them, which a test can fail. ``cut()`` drops every connection through
    it at once (both ends see a reset, no close frame); ``hold()`` makes new connections
    wait, unanswered, until ``release()``; ``refuse()`` drops new connections as they come."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.mode = "open"
        self.accepted = 0
        self._transports: set[asyncio.BaseTransport] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._released = self._call(self._make_event)
        self._server = self._call(self._listen)
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def _call(self, function: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(function(), self.loop).result(10)

    async def _make_event(self) -> asyncio.Event:
        released = asyncio.Event()
        released.set()
        return released

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._transports.add(writer.transport)
        if self.mode == "refuse":
            writer.transport.abort()
            return
        await self._released.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports.add(up_writer.transport)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()

    def cut(self) -> None:
        """Drop every connection through the proxy, as a failing network does."""

        async def cut() -> None:
            for transport in self._transports:
                transport.abort()
            self._transports.clear()

        self._call(cut)

    def hold(self) -> None:
        """New connections wait, unanswered, until ``release``."""

        async def hold() -> None:
            self._released.clear()

        self._call(hold)

    def release(self) -> None:
        """Connections held go through; new ones too."""

        async def release() -> None:
            self.mode = "open"
            self._released.set()

        self._call(release)

    def refuse(self) -> None:
        """New connections are dropped at once (a handshake that never completes)."""
        self.mode = "refuse"

    def close(self) -> None:
        self.cut()

        async def close() -> None:
            self._server.close()

        self._call(close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def proxy_to() -> Iterator[Any]:
    """Make ``TcpProxy``s in front of servers; all closed at the end of the test."""
    proxies: list[TcpProxy] = []

    def make(server: ServerProcess) -> TcpProxy:
        proxies.append(TcpProxy(server.port))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture(scope="module")
def resume_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the resume models and the default resume window (30 s)."""
    models = resume_models(tmp_path_factory.mktemp("resume-models"))
    running = launch_server(models, tmp_path_factory.mktemp("resume-events"))
    yield running
    assert running.stop() == 0, running.log


def drop(chat: ChatClient) -> bool:
    """Drop the client's connection as a failing network would (no close frame, nothing
    flushed); False if it was already dropped and not resumed yet."""
    transport = chat.connection.transport
    if transport.is_closing():
        return False
    transport.abort()
    return True


def numbers(count: int) -> list[str]:
    return [f"{n} " for n in range(1, count + 1)]


async def test_a_resumable_session_has_a_token_and_a_window_and_counts_frames(
    resume_server: ServerProcess,
) -> None:
    raw: list[str] = []
    async with connect(resume_server.ws_url, "echo", on_frame=raw.append) as chat:
        ready = json.loads(raw[0])
        assert re.fullmatch(r"[A-Za-z0-9_-]{16,128}", ready["resume_token"])
        assert ready["resume_token"] != chat.session_id
        assert (chat.resumable, chat.resume_window) == (True, 30)
        assert await chat.ask("a b") == "a b"
        assert chat.last_seq == 3
    async with connect(resume_server.ws_url, "echo", resumable=False, on_frame=raw.append) as chat:
        assert "resume_token" not in json.loads(raw[-1])
        assert (chat.resumable, chat.resume_window) == (False, 0)


async def test_every_chunk_arrives_exactly_once_across_200_drops(
    resume_server: ServerProcess,
) -> None:
    """Drops before a message is sent (so it is lost with the connection), right after,
    mid-reply and between turns: each turn still yields 1 … N once each, in order, and the
    server saw each message once."""
    notices: list[ResumeNotice] = []
    rng = random.Random(20240601)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 25
    drops = turns = 0
    async with connect(resume_server.ws_url, "numbers", on_resume=notices.append) as chat:
        while drops < 200:
            assert loop.time() < deadline, f"only {drops} drops in time"
            turns += 1
            count = rng.randint(50, 400)
            if rng.random() < 0.15:
                drops += drop(chat)  # the message goes out on a dead connection
            turn = await chat.send(f"count {count}")
            if rng.random() < 0.15:
                drops += drop(chat)  # it may or may not have reached the server
            received = []
            async for chunk in turn:
                received.append(chunk)
                if rng.random() < 0.02:
                    drops += drop(chat)
            assert received == numbers(count), f"turn {turn.number}"
            assert (turn.reason, turn.number) == ("stop", turns)
            if rng.random() < 0.15:  # idle: resumed in the background
                drops += drop(chat)
                await asyncio.sleep(rng.random() * 0.02)
        said = [m["content"] for m in chat.history if m["role"] == "user"]
        assert len(said) == turns
        recall = await chat.ask("recall")
        assert recall == f"You said {turns + 1} things: " + " | ".join([*said, "recall"])
        assert len(chat.history) == 2 * (turns + 1)
    assert [n.outcome for n in notices] == ["resumed"] * drops
    assert sum(n.replayed for n in notices) > 0  # some frames were replayed, none repeated


async def test_a_dropped_cancel_still_stops_the_turn(resume_server: ServerProcess) -> None:
    async with connect(resume_server.ws_url, "numbers") as chat:
        turn = await chat.send("count 400 0.01")
        received = []
        async for chunk in turn:
            received.append(chunk)
            if len(received) == 3:
                drop(chat)
                await turn.cancel()  # on the dead connection: sent again after the resume
        assert turn.reason == "cancelled"
        assert received == numbers(len(received)) and len(received) < 300
        assert await chat.ask("recall") == "You said 2 things: count 400 0.01 | recall"


async def test_closing_ends_the_session_at_once(resume_server: ServerProcess) -> None:
    """A close (1000) is no drop: the token no longer resumes anything."""
    raw: list[str] = []
    async with connect(resume_server.ws_url, "echo", on_frame=raw.append) as chat:
        await chat.ask("hi")
        token, after = json.loads(raw[0])["resume_token"], chat.last_seq
    entry = Subprotocol(f"resume.{token}.{after}")
    offer = [Subprotocol("anything-agent.v1"), entry]
    async with ws_connect(resume_server.chat_url("echo"), subprotocols=offer) as ws:
        expired = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (expired["type"], expired["code"]) == ("error", "resume_expired")
        assert "seq" not in expired
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "ready"


async def test_without_resuming_a_drop_raises_connection_lost(
    resume_server: ServerProcess,
) -> None:
    async with connect(resume_server.ws_url, "numbers", resumable=False) as chat:
        turn = await chat.send("count 100 0.01")
        with pytest.raises(ConnectionLost) as lost:
            async for _ in turn:
                drop(chat)
        assert lost.value.close_code is None
        assert chat.running is None


async def test_an_expired_session_raises_connection_lost_and_a_new_one_goes_on(
    start_server: Any, tmp_path: Path, proxy_to: Any
) -> None:
    """Mid-reply, then idle: the network fails for longer than the resume window (1 s).
    The resume then gets resume_expired: the pending turn (then the next call) raises
    ConnectionLost, and the client holds the new session the server started."""
    server = start_server(resume_models(tmp_path / "models"), "--resume-window", "1")
    proxy = proxy_to(server)
    notices: list[ResumeNotice] = []
    async with connect(proxy.ws_url, "numbers", on_resume=notices.append) as chat:
        assert await chat.ask("count 2") == "1 2 "
        first_session = chat.session_id
        turn = await chat.send("count 100 0.02")
        with pytest.raises(ConnectionLost, match="resume_expired") as lost:
            async for _ in turn:
                if len(turn.chunks) == 3:
                    proxy.hold()  # the resume's handshake waits...
                    proxy.cut()
                    await asyncio.sleep(1.6)  # ...past the window
                    proxy.release()
        assert "could not be resumed" in lost.value.message
        assert turn.chunks == numbers(3) and chat.running is None
        assert chat.session_id != first_session
        assert [n.outcome for n in notices] == ["new_session"]
        assert chat.history == []
        assert chat.previous_history == [
            {"role": "user", "content": "count 2"},
            {"role": "assistant", "content": "1 2 "},
        ]
        turn = await chat.replace_history([*chat.previous_history, _user("recall")])
        assert await turn.reply() == "You said 2 things: count 2 | recall"
        assert turn.number == 1  # the new session's first turn

        # Idle: the failure waits for the next call, which raises it; the one after works.
        proxy.hold()
        proxy.cut()
        await asyncio.sleep(1.6)
        proxy.release()
        for _ in range(100):
            if len(notices) == 2:
                break
            await asyncio.sleep(0.05)
        assert [n.outcome for n in notices] == ["new_session", "new_session"]
        with pytest.raises(ConnectionLost, match="resume_expired"):
            await chat.send("anyone?")
        assert await chat.ask("recall") == "You said 1 things: recall"
    assert "not resumed within 1 s; ending" in server.log


async def test_no_server_within_the_window_raises_connection_lost(
    start_server: Any, tmp_path: Path, proxy_to: Any
) -> None:
    server = start_server(resume_models(tmp_path / "models"), "--resume-window", "1")
    proxy = proxy_to(server)
    notices: list[ResumeNotice] = []
    loop = asyncio.get_running_loop()
    async with connect(proxy.ws_url, "numbers", on_resume=notices.append) as chat:
        turn = await chat.send("count 100 0.02")
        with pytest.raises(ConnectionLost, match=r"could not be resumed within 1 s") as lost:
            async for _ in turn:
                if len(turn.chunks) == 2:
                    proxy.refuse()
                    proxy.cut()
                    cut_at, accepted = loop.time(), proxy.accepted
        assert lost.value.close_code is None
        assert 0.7 < loop.time() - cut_at < 3
        assert proxy.accepted - accepted >= 4  # it tried again, with backoff
        assert [n.outcome for n in notices] == ["failed"]
        assert (chat.is_open, chat.resumable, chat.running) == (False, False, None)
        with pytest.raises(ConnectionLost):
            await chat.send("still there?")


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


async def test_a_turn_that_ended_while_away_lets_the_next_message_through(
    start_server: Any, tmp_path: Path, proxy_to: Any
) -> None:
    """The reply's ``done`` is sent while the client is away, into a full replay buffer;
    once resumed, the turn is over for the client, so it must be for the server too: the
    next message starts a turn (never ``busy``)."""
    models = resume_models(tmp_path / "models")
    server = start_server(models, "--replay-buffer-bytes", "4096")
    proxy = proxy_to(server)
    async with connect(proxy.ws_url, "numbers") as chat:
        assert await chat.ask("count 100") == "".join(numbers(100))  # the buffer is full
        for _ in range(3):
            turn = await chat.send("count 1 0.3")  # 1, then done 0.3 s later
            async for _ in turn:
                proxy.hold()
                proxy.cut()
                await asyncio.sleep(0.5)  # done is sent while the client is away
                proxy.release()
            assert turn.reason == "stop"
            assert await chat.ask("next") == "next"
