"""Fuzzing a live server with arbitrary frames and request paths (hypothesis).

Whatever a client sends, the server answers as protocol v1 says: an ``error`` frame
(``bad_request``) for a frame that is not valid v1, a normal turn for one that is, nothing
for a cancel with no turn running, or a standard close code (1007 invalid UTF-8, 1009 too
big, 1002 protocol error). It never crashes, never answers 500, never serves a file from
outside ``web_client/``, and a well-behaved session chatting next door never notices.

What the server should answer is worked out here from design.md (``expected_replies``),
not from the server's code. Examples are derandomized, so every run tries the same inputs
and CI never flakes; ``ANYTHING_AGENT_FUZZ_SCALE=10`` tries ten times as many.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import quote, unquote

import pytest
import pytest_asyncio
from conftest import (
    ROOT,
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    chat,
    launch_server,
    recv_frame,
    run_turn,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_FRAME = 1024 * 1024  # the server's default --max-frame-size: bigger frames get 1009
MODELS = ("echo", "slow")
WEB_CLIENT = ROOT / "web_client"
HTTP_LINE_LIMIT = 8192  # websockets refuses longer request lines itself (414, plain text)
SCALE = int(os.environ.get("ANYTHING_AGENT_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int) -> settings:
    """Reproducible (derandomized, no example database) and untimed: the server is a
    real process, so one example may take a few milliseconds more than another."""
    return settings(
        max_examples=examples * SCALE,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,  # the log check is per test, not per example
        ],
    )


# ---------------------------------------------------------------------- the live server
@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared-mode server for the whole file, over a copy of echo and slow."""
    models = tmp_path_factory.mktemp("fuzz-models")
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    # No pause between words: a fuzzed message may hold hundreds of them.
    (models / "echo" / "config.yaml").write_text("version: 1.0.0\nparameters:\n  delay: 0\n")
    shutil.copytree(TEST_MODELS / "slow", models / "slow")
    # "first", then a pause no test outlasts: a turn of slow runs until it is cancelled.
    (models / "slow" / "config.yaml").write_text(
        "parameters:\n  pause: 600\nsettings:\n  timeout: 900\n"
    )
    running = launch_server(models, tmp_path_factory.mktemp("fuzz-events"), "--no-limits")
    yield running
    assert running.stop() == 0, running.log
    LogWatch(running).assert_clean()


class LogWatch:
    """Nothing a client sends makes the server log an error (a handler that died, a
    handshake that failed): those are server bugs, whatever the client saw."""

    checked: ClassVar[dict[int, int]] = {}  # per server: how many log lines were looked at

    def __init__(self, server: ServerProcess) -> None:
        self.server = server

    def errors(self) -> str:
        """The log from the first error line not yet reported (empty if none)."""
        first = self.checked.get(id(self.server), 0)
        new = self.server.log_lines[first:]
        self.checked[id(self.server)] = first + len(new)
        problems = [i for i, line in enumerate(new) if " ERROR " in line]
        return "\n".join(new[problems[0] :][:40]) if problems else ""

    def assert_clean(self) -> None:
        errors = self.errors()
        assert not errors, "the server logged errors:\n" + errors


@pytest.fixture(autouse=True)
def server_logs_no_errors(
    fuzz_server: ServerProcess, request: pytest.FixtureRequest
) -> Iterator[None]:
    """Checked after each test (a line logged late is caught by the next test, or when the
    server stops); a test that failed already gets the log lines in its report instead."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        errors = LogWatch(fuzz_server).errors()
        if errors:
            print("the server logged:\n" + errors)
    else:
        LogWatch(fuzz_server).assert_clean()


class Bystander:
    """A well-behaved session on echo, open for the whole module: after every example
    its next turn must come back whole, numbered in order, with nothing else mixed in."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.turns = 0

    async def chat(self) -> None:
        self.turns += 1
        text = f"still here after {self.turns} examples"
        turn = await run_turn(self.ws, text)
        assert turn.text == text, turn.frames
        assert turn.done == {"type": "done", "turn": self.turns, "reason": "stop"}


class Live:
    """The server under fuzz and its bystander (short to print in a failing example)."""

    def __init__(self, server: ServerProcess, bystander: Bystander) -> None:
        self.server = server
        self.bystander = bystander

    def __repr__(self) -> str:
        return f"<server on port {self.server.port}>"

    async def assert_still_serving(self) -> None:
        """The server process is alive, answers /healthz, and the bystander still chats."""
        assert self.server.process.poll() is None, f"the server died:\n{self.server.log}"
        response = await raw_request(self.server, "/healthz")
        assert response is not None and response.status == 200, response
        await self.bystander.chat()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(fuzz_server: ServerProcess) -> AsyncIterator[Live]:
    async with chat(fuzz_server, "echo") as ws:
        yield Live(fuzz_server, Bystander(ws))


@asynccontextmanager
async def fuzz_chat(server: ServerProcess, model: str = "echo") -> AsyncIterator[ClientConnection]:
    """A fresh session that takes replies of any size and sends frames as they are."""
    async with chat(server, model, max_size=None, compression=None) as ws:
        yield ws


# ---------------------------------------------------------------------- what v1 promises
# A reply to one client message: ("turn", text) a turn echo streamed back in full,
# ("error", code) an error frame, ("nothing",) no frame at all, ("close", code).
Reply = tuple[Any, ...]
BAD_REQUEST: Reply = ("error", "bad_request")
NOTHING: Reply = ("nothing",)
ROLES = ("user", "assistant", "system")


def echoed(text: str) -> Reply:
    return ("turn", text)


def closed(code: int) -> Reply:
    return ("close", code)


def has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode."""
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return any(has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    return False


def expected_replies(payload: bytes, *, binary: bool) -> set[Reply]:
    """Every answer design.md allows to one message of ``payload`` sent to echo (which
    streams the last message's content back) on a fresh session."""
    if len(payload) > MAX_FRAME:
        return {closed(1009)}
    if binary:
        return {BAD_REQUEST}  # binary frames are not part of v1; the connection stays
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return {closed(1007)}
    return expected_replies_to_text(text)


def expected_replies_to_text(text: str) -> set[Reply]:
    stripped = text.lstrip()
    if not stripped:
        return {BAD_REQUEST, echoed(text)}  # design.md is silent on blank messages
    if stripped[0] != "{":
        return {echoed(text)}  # plain text is a user message
    allowed = set()
    if text.lstrip(" \t\r\n")[:1] != "{":  # "blank" that JSON doesn't call whitespace
        allowed.add(echoed(text))
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return allowed | {BAD_REQUEST}
    if not isinstance(frame, dict):
        return allowed | {BAD_REQUEST}
    # A string that is not valid Unicode may be refused, or passed through escaped.
    lenient = {BAD_REQUEST} if has_lone_surrogate(frame) else set()
    kind = frame.get("type")
    if kind == "message" and isinstance(frame.get("content"), str):
        return allowed | lenient | {echoed(frame["content"])}
    if kind == "messages" and valid_history(frame.get("messages")):
        return allowed | lenient | {echoed(frame["messages"][-1]["content"])}
    if kind == "cancel":
        return allowed | lenient | {NOTHING}  # no turn runs on a fresh session
    return allowed | {BAD_REQUEST}


def valid_history(messages: Any) -> bool:
    return (
        isinstance(messages, list)
        and len(messages) > 0
        and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in messages
        )
    )


# ---------------------------------------------------------------------- sending, observing
PROBE = "probe after a frame that should get no reply"


def fragments(payload: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``payload`` split at ``cuts`` (positions, any order); always at least one piece."""
    points = sorted({c % (len(payload) + 1) for c in cuts} | {0, len(payload)})
    pieces = [payload[a:b] for a, b in itertools.pairwise(points)]
    return pieces or [payload]


async def send_and_observe(
    ws: ClientConnection, payload: bytes, *, binary: bool, cuts: Sequence[int] = ()
) -> Reply:
    """Send one message (fragmented at ``cuts``) and classify what comes back."""
    probe = NOTHING in expected_replies(payload, binary=binary)
    try:
        pieces = fragments(payload, cuts)
        await ws.send(pieces if len(pieces) > 1 else payload, text=not binary)
        if probe:  # frames are handled in order: a reply to the first comes before this
            await ws.send(PROBE)
        reply = await read_reply(ws)
    except ConnectionClosed:
        reply = await close_reply(ws)
    return NOTHING if probe and reply == echoed(PROBE) else reply


async def close_reply(ws: ClientConnection) -> Reply:
    await asyncio.wait_for(ws.wait_closed(), 10)
    return closed(ws.close_code)  # what the server sent (1006: no close frame at all)


async def read_reply(ws: ClientConnection) -> Reply:
    """The reply to the one message just sent on a fresh session: an error frame, or a
    whole turn (numbered 1, ended with ``stop``), or the close that ended the session."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frame = await recv_frame(ws)
            frames.append(frame)
            if frame["type"] == "error" and len(frames) == 1 and "turn" not in frame:
                return ("error", frame["code"])
            if frame["type"] == "done":
                break
    except ConnectionClosed:
        if not frames:
            return await close_reply(ws)
        return (*await close_reply(ws), "after", tuple(json.dumps(f) for f in frames))
    chunks = [f for f in frames[:-1] if f["type"] == "chunk"]
    if len(chunks) != len(frames) - 1 or any(f["turn"] != 1 for f in frames):
        return ("odd turn", tuple(json.dumps(f) for f in frames))
    if frames[-1]["reason"] != "stop":
        return ("turn ended", frames[-1]["reason"])
    return echoed("".join(f["content"] for f in chunks))


# ---------------------------------------------------------------------- strategies
any_char = st.characters() | st.characters(categories=["Cs"])  # lone surrogates too
unpaired_surrogates = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text(max_size=8),
    st.characters(categories=["Cs"]),
    st.text(max_size=8),
)
# Strings of every kind, including ones JSON can escape but UTF-8 cannot encode.
any_text = (
    st.text(max_size=30)
    | unpaired_surrogates
    | st.sampled_from(["", " ", "message", "cancel", "user", "{", "\x00", "\u2028", "é" * 50])
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=12,
)
frame_types = (
    st.sampled_from(["message", "messages", "cancel", "Message", " message", ""])
    | st.sampled_from(["ready", "chunk", "done", "error", "message\x00", "cancel "])
    | json_values
)
history_items = (
    st.fixed_dictionaries(
        {
            "role": st.sampled_from([*ROLES, "tool", "User", ""]) | json_values,
            "content": any_text | json_values,
        },
        optional={"name": json_values},
    )
    | json_values
)
# Objects shaped like v1 frames, every field possibly missing or of the wrong type.
frame_objects = st.builds(
    lambda extra, fields: {**extra, **fields},
    st.dictionaries(any_text, json_values, max_size=2),
    st.fixed_dictionaries(
        {},
        optional={
            "type": frame_types,
            "content": any_text | json_values,
            "messages": st.lists(history_items, max_size=3) | json_values,
        },
    ),
)
valid_frames = (
    st.builds(lambda c: {"type": "message", "content": c}, any_text)
    | st.builds(
        lambda m: {"type": "messages", "messages": m},
        st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": any_text}),
            min_size=1,
            max_size=3,
        ),
    )
    | st.just({"type": "cancel"})
)


@st.composite
def serialized(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """A JSON value as a client might write it; non-ASCII strings raw or escaped."""
    value = draw(values)
    ascii_only = draw(st.booleans())
    indent = draw(st.sampled_from([None, None, 0, 2]))
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent)
    text = draw(st.sampled_from(["", "", " ", "\n\t", "\u00a0", "\ufeff"])) + text
    return text.encode("utf-8", "surrogatepass")  # a raw lone surrogate is invalid UTF-8


@st.composite
def mangled(draw: st.DrawFn, payloads: st.SearchStrategy[bytes]) -> bytes:
    """A payload cut short, or with a byte changed, inserted or dropped."""
    payload = draw(payloads)
    at = draw(st.integers(0, len(payload)))
    how = draw(st.sampled_from(["cut", "change", "insert", "drop"]))
    byte = bytes([draw(st.integers(0, 255))])
    if how == "cut":
        return payload[:at]
    if how == "insert":
        return payload[:at] + byte + payload[at:]
    return payload[:at] + (byte if how == "change" else b"") + payload[at + 1 :]


json_frames = serialized(frame_objects) | serialized(valid_frames) | serialized(json_values)


def as_text(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[tuple[bytes, bool]]:
    return st.tuples(payloads, st.just(False))


client_messages = st.one_of(
    st.tuples(st.binary(max_size=300), st.booleans()),  # random bytes, as text or binary
    as_text(st.text(any_char, max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    as_text(serialized(valid_frames)),
    as_text(serialized(frame_objects)),
    as_text(serialized(json_values)),
    as_text(mangled(json_frames)),
    st.tuples(json_frames, st.just(True)),  # a valid frame, but as a binary frame
)


# ---------------------------------------------------------------------- frames: properties
@fuzz_settings(examples=200)
@given(message=client_messages, cuts=st.lists(st.integers(0, 400), max_size=3))
async def test_any_message_gets_bad_request_a_turn_or_a_standard_close(
    live: Live, message: tuple[bytes, bool], cuts: list[int]
) -> None:
    payload, binary = message
    async with fuzz_chat(live.server) as ws:
        reply = await send_and_observe(ws, payload, binary=binary, cuts=cuts)
    assert reply in expected_replies(payload, binary=binary), (payload[:300], reply)
    await live.assert_still_serving()


@fuzz_settings(examples=80)
@given(payload=serialized(valid_frames), cuts=st.lists(st.integers(0, 200), max_size=2))
async def test_every_valid_frame_starts_a_turn_that_streams_its_content_back(
    live: Live, payload: bytes, cuts: list[int]
) -> None:
    async with fuzz_chat(live.server) as ws:
        reply = await send_and_observe(ws, payload, binary=False, cuts=cuts)
    assert reply in expected_replies(payload, binary=False), (payload[:300], reply)
    await live.assert_still_serving()


@pytest.mark.parametrize(
    "frame",
    [
        r'{"type":"message","content":"a\ud800b"}',
        r'{"type":"messages","messages":[{"role":"user","content":"\udfff"}]}',
        r'{"type":"\ud800"}',
        r'{"type":"message","content":"ok","note":"\udc00"}',
    ],
)
async def test_escaped_lone_surrogates_get_bad_request_or_an_echo_never_a_crash(
    live: Live, frame: str
) -> None:
    # Valid JSON (the escapes are ASCII) whose strings are not valid Unicode: the server
    # may refuse it or pass it through escaped, but must neither die nor blame the model.
    async with fuzz_chat(live.server) as ws:
        reply = await send_and_observe(ws, frame.encode(), binary=False)
    assert reply in expected_replies(frame.encode(), binary=False), reply
    await live.assert_still_serving()


@pytest.mark.parametrize("depth", [1, 10, 300, 5_000, 100_000])
@pytest.mark.parametrize("shape", ["array text", "open objects", "deep content", "deep field"])
async def test_deep_nesting_gets_bad_request_or_a_turn(live: Live, depth: int, shape: str) -> None:
    nested = "[" * depth + "]" * depth
    text = {
        "array text": "[" * depth,  # not an object: a plain message
        "open objects": '{"a":' * depth,
        "deep content": '{"type":"message","content":' + nested + "}",
        "deep field": '{"type":"message","content":"x","more":' + nested + "}",
    }[shape]
    allowed = expected_replies(text.encode(), binary=False)
    if shape == "deep field" and depth > 300:  # valid JSON, but too deep for some parsers
        allowed = {echoed("x"), BAD_REQUEST}
    async with fuzz_chat(live.server) as ws:
        reply = await send_and_observe(ws, text.encode(), binary=False)
    assert reply in allowed, reply
    await live.assert_still_serving()


def sized_payload(shape: str, size: int) -> bytes:
    """A message of exactly ``size`` bytes."""
    if shape in ("plain text", "binary"):
        return b"x" * size
    if shape == "two-byte characters":  # as many bytes, half as many characters
        return ("é" * (size // 2) + "x" * (size % 2)).encode()
    head, tail = b'{"type":"message","content":"', b'"}'
    return head + b"y" * (size - len(head) - len(tail)) + tail


@fuzz_settings(examples=30)
@given(
    size=st.integers(MAX_FRAME - 64, MAX_FRAME + 64)
    | st.sampled_from([MAX_FRAME, MAX_FRAME + 1, 3 * MAX_FRAME]),
    shape=st.sampled_from(["plain text", "message frame", "two-byte characters", "binary"]),
    cuts=st.sampled_from([[], [1000], [MAX_FRAME // 2, MAX_FRAME - 10]]),
)
async def test_messages_up_to_the_limit_are_served_and_beyond_it_closed_with_1009(
    live: Live, size: int, shape: str, cuts: list[int]
) -> None:
    payload = sized_payload(shape, size)
    assert len(payload) == size
    binary = shape == "binary"
    async with fuzz_chat(live.server) as ws:
        reply = await send_and_observe(ws, payload, binary=binary, cuts=cuts)
    assert reply in expected_replies(payload, binary=binary), (shape, size, reply[:2])
    await live.assert_still_serving()


async def test_invalid_utf8_in_a_text_frame_is_closed_with_1007(live: Live) -> None:
    for payload in [b"\xff", b"hello \xc3", b'{"type":"message","content":"\xed\xa0\x80"}']:
        async with fuzz_chat(live.server) as ws:
            assert await send_and_observe(ws, payload, binary=False) == closed(1007)
    await live.assert_still_serving()


# ---------------------------------------------------------------------- broken framing
def raw_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = b"\x37\xfa\x21\x3d",
    length: int | None = None,
) -> bytes:
    """One WebSocket frame exactly as given, valid or not (RFC 6455, section 5.2);
    ``length`` claims another payload length than the payload's."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    masked = 0x80 if mask is not None else 0
    if size < 126:
        head += bytes([masked | size])
    elif size < 2**16:
        head += bytes([masked | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([masked | 127]) + size.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@st.composite
def framing_violations(draw: st.DrawFn) -> tuple[str, bytes, set[int]]:
    """Bytes that break RFC 6455 framing, with the close codes the server may answer."""
    data = draw(st.binary(max_size=40))
    kind = draw(
        st.sampled_from(
            [
                "reserved opcode",
                "reserved bits",
                "unmasked",
                "long control frame",
                "fragmented control frame",
                "continuation out of nowhere",
                "new message inside a fragmented one",
                "one-byte close",
                "bad close code",
                "invalid UTF-8 close reason",
                "claims more than the limit",
            ]
        )
    )
    opcode = draw(st.sampled_from([TEXT, BINARY]))
    if kind == "reserved opcode":
        reserved = draw(st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]))
        return kind, raw_frame(reserved, data), {1002}
    if kind == "reserved bits":
        return kind, raw_frame(opcode, data, rsv=draw(st.integers(1, 7))), {1002}
    if kind == "unmasked":
        return kind, raw_frame(opcode, data, mask=None), {1002}
    if kind == "long control frame":
        control = draw(st.sampled_from([PING, PONG, CLOSE]))
        body = b"\x03\xe8" + b"r" * draw(st.integers(124, 300))
        return kind, raw_frame(control, body), {1002}
    if kind == "fragmented control frame":
        return kind, raw_frame(draw(st.sampled_from([PING, PONG])), data, fin=False), {1002}
    if kind == "continuation out of nowhere":
        return kind, raw_frame(CONTINUATION, data, fin=draw(st.booleans())), {1002}
    if kind == "new message inside a fragmented one":
        return kind, raw_frame(TEXT, b"part", fin=False) + raw_frame(opcode, data), {1002}
    if kind == "one-byte close":
        return kind, raw_frame(CLOSE, b"\x03"), {1002}
    if kind == "bad close code":
        code = draw(st.sampled_from([0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]))
        return kind, raw_frame(CLOSE, code.to_bytes(2, "big") + b"bye"), {1002}
    if kind == "invalid UTF-8 close reason":
        return kind, raw_frame(CLOSE, b"\x03\xe8bye \xff\xfe"), {1007}
    # A header announcing a payload over the limit, up to 2**64 - 1 bytes (a set top bit
    # breaks RFC 6455 as well); nothing more is sent, so the server must judge the header.
    claimed = draw(st.sampled_from([MAX_FRAME + 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]))
    codes = {1009, 1002} if claimed >= 2**63 else {1009}
    return kind, raw_frame(opcode, b"", length=claimed), codes


@fuzz_settings(examples=60)
@given(violation=framing_violations(), valid_before=st.booleans())
async def test_broken_framing_is_closed_with_a_protocol_close_code(
    live: Live, violation: tuple[str, bytes, set[int]], valid_before: bool
) -> None:
    kind, wire, codes = violation
    async with fuzz_chat(live.server) as ws:
        if valid_before:  # a session in the middle of a conversation fails the same way
            assert (await run_turn(ws, "hello there")).text == "hello there"
        ws.transport.write(wire)
        with pytest.raises(ConnectionClosed):
            await recv_frame(ws)
        await asyncio.wait_for(ws.wait_closed(), 10)
        assert ws.close_code in codes, (kind, wire[:20], ws.close_code, ws.close_reason)
    await live.assert_still_serving()


@fuzz_settings(examples=40)
@given(noise=st.binary(min_size=1, max_size=200))
async def test_random_bytes_on_the_wire_never_crash_the_session(live: Live, noise: bytes) -> None:
    # Whatever frames the bytes happen to spell, the server answers them as v1 frames,
    # closes, or waits for the rest of a frame; it never fails with 1011.
    async with fuzz_chat(live.server) as ws:
        ws.transport.write(noise)
        try:
            while True:
                frame = await recv_frame(ws, timeout=0.1)
                assert frame["type"] in ("chunk", "done", "error"), frame
                if frame["type"] == "error":
                    assert frame["code"] in ("bad_request", "busy"), frame
        except ConnectionClosed:
            assert ws.close_code != 1011, (noise, ws.close_reason)
        except TimeoutError:  # waiting for the rest of a frame: hang up
            ws.transport.abort()
    await live.assert_still_serving()


# ---------------------------------------------------------------------- cancel, interleaved
def single_reply(payload: bytes, binary: bool) -> Reply | None:
    """The one reply v1 prescribes for a message on a fresh session, if it is one."""
    replies = expected_replies(payload, binary=binary)
    if len(replies) != 1:
        return None
    (reply,) = replies
    return reply if reply[0] in ("turn", "error", "nothing") else None


interleaved_frames = st.one_of(
    st.just((b'{"type":"cancel"}', False)),
    st.tuples(serialized(valid_frames), st.just(False)),
    st.tuples(st.binary(max_size=20), st.just(True)),
    st.tuples(serialized(frame_objects), st.just(False)),
    st.tuples(st.text(max_size=20).map(str.encode), st.just(False)),
).filter(lambda f: single_reply(*f) is not None)


@fuzz_settings(examples=40)
@given(frames=st.lists(interleaved_frames, min_size=1, max_size=12), one_write=st.booleans())
async def test_frames_interleaved_with_cancel_end_every_turn_exactly_once(
    live: Live, frames: list[tuple[bytes, bool]], one_write: bool
) -> None:
    # slow yields "first" and then pauses far longer than the test: a turn runs until a
    # cancel ends it. Frames are handled in order, so what must come back is known exactly
    # but for the "first" chunks, which may or may not make it out before the cancel.
    frames = [*frames, (b'{"type":"cancel"}', False), (b"end of the burst", True)]
    expected: list[dict[str, Any]] = []
    turn, running = 0, False
    for payload, binary in frames:
        reply = single_reply(payload, binary)
        if reply == NOTHING:  # a cancel
            if running:
                expected.append({"type": "done", "turn": turn, "reason": "cancelled"})
            running = False
        elif reply is not None and reply[0] == "turn":
            if running:
                expected.append({"type": "error", "code": "busy"})
            else:
                turn, running = turn + 1, True
        else:
            expected.append({"type": "error", "code": "bad_request"})
    async with fuzz_chat(live.server, "slow") as ws:
        for payload, binary in frames:
            if one_write:  # all in one TCP write: the server reads them as one burst
                (ws.protocol.send_binary if binary else ws.protocol.send_text)(payload)
            else:
                await ws.send(payload, text=not binary)
        ws.send_data()
        seen: list[dict[str, Any]] = []
        chunked: set[int] = set()
        while len(seen) < len(expected):
            frame = await recv_frame(ws)
            if frame["type"] == "chunk":  # "first", once, from a turn that has not ended
                ended = {f["turn"] for f in seen if f["type"] == "done"}
                assert frame["content"] == "first", frame
                assert 1 <= frame["turn"] <= turn and frame["turn"] not in ended | chunked
                chunked.add(frame["turn"])
                continue
            if frame["type"] == "error":
                frame = {"type": "error", "code": frame["code"]}
            seen.append(frame)
        assert seen == expected
    await live.assert_still_serving()


# ---------------------------------------------------------------------- HTTP paths
@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:
        return f"<{self.status} {self.headers.get('content-type')} {self.body[:200]!r}>"

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self
        return json.loads(self.body)


async def raw_request(
    server: ServerProcess, target: str | bytes, *, upgrade: bool = False
) -> RawResponse | None:
    """GET ``target`` exactly as given (no client normalises it), optionally as a
    WebSocket handshake; ``None`` if the server closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    raw_target = target if isinstance(target, bytes) else target.encode()
    lines = [b"GET " + raw_target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if upgrade:
        lines += [
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ]
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                raise
            return None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return RawResponse(int(status_line.split()[1]), headers, body)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def served_files() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in WEB_CLIENT.iterdir() if p.is_file()}


def check_http_answer(target: str, response: RawResponse | None, *, upgrade: bool) -> None:
    """What design.md allows for GET ``target``: the route's answer, a JSON error (404,
    405, 426), or a file of web_client/ (the one the path names); never 5xx."""
    assert response is not None, f"no answer to {target!r}"
    assert response.status < 500, (target, response)
    if response.status == 414:  # websockets' own refusal, before any route sees it
        assert len(target) > HTTP_LINE_LIMIT - 50, (target, response)
        return
    path = target.split("?", 1)[0].split("#", 1)[0]
    if response.status == 101:  # the handshake of a chat with a model that serves
        assert upgrade and "/v1/chat/" in path, (target, response)
        assert unquote(path.rsplit("/", 1)[1]) in MODELS, (target, response)
        return
    if response.status != 200:
        assert response.status in (400, 404, 405, 426), (target, response)
        error = response.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)
        if path.startswith(("/v1/chat/", "/v1/models/")) and path.count("/") == 3:
            name = unquote(path.rsplit("/", 1)[1])
            if name in MODELS:  # a model that serves is never "not found"
                assert response.status == 426 and not upgrade, (target, response)
        return
    if response.headers.get("content-type") == "application/json":
        body = response.json()
        if "/v1/models/" in path:
            assert body["id"] == unquote(path.rsplit("/", 1)[1]), (target, body)
        else:
            assert path.endswith(("/v1/models", "/healthz")), (target, body)
        return
    # A static file: one of web_client/, and the very one the path's last segment names
    # (percent-decoded once, as RFC 3986 says: "%2561" names "%61", not "a").
    files = served_files()
    name = unquote(path).rsplit("/", 1)[-1] or "index.html"
    assert response.body in files.values(), f"{target!r} served a file from elsewhere"
    assert files.get(name) == response.body, f"{target!r} served another file than {name!r}"


def expect_named_file(target: str, response: RawResponse | None) -> None:
    """``target`` names a file of web_client/ plainly: that file must come back."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    name = unquote(path.removeprefix("/")) or "index.html"
    files = served_files()
    if name in files and "/" not in name:
        assert response is not None and response.status == 200, (target, response)
        assert response.body == files[name]


TRAVERSALS = [
    "..%2fpyproject.toml",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e/pyproject.toml",
    "%2e%2e%2fpyproject.toml",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    ".%2e/README.md",
    "%252e%252e%252fpyproject.toml",
    "%c0%ae%c0%ae/pyproject.toml",
    "../ws_server/server.py",
    "web_client/../pyproject.toml",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "//etc/passwd",
    "/[",  # after "/": "//[", which URL parsers read as a broken IPv6 host
    "/x]",
    "%00",
    "index.html%00.png",
    "app.js%00",
    "..\\..\\pyproject.toml",
    "..%5c..%5cpyproject.toml",
    "%5cetc%5cpasswd",
    ".hidden",
    ".git/config",
    "%2egit/HEAD",
    ".env",
    "%E2%9C%93",
    quote("模型/../é", safe="/"),
    "%ff%fe",
    "%",
    "%zz",
    "a" * 300,
    "a" * 8000,
    "a" * 10_000,
    quote("é" * 3000),
    "echo?x=../../etc/passwd",
    "app.js?../../pyproject.toml",
    "index.html#../../pyproject.toml",
    "%65cho",
    "echo%2f..",
    "echo/",
    "",
]


@pytest.mark.parametrize("route", ["/", "/v1/models/", "/v1/chat/"])
async def test_traversal_and_odd_names_get_json_errors_or_the_named_file(
    live: Live, route: str
) -> None:
    wrong = []
    for name in TRAVERSALS:
        for upgrade in (False, True):
            response = await raw_request(live.server, route + name, upgrade=upgrade)
            try:
                check_http_answer(route + name, response, upgrade=upgrade)
            except AssertionError as exc:  # report them all, not just the first
                wrong.append(f"GET {(route + name)[:80]} (upgrade: {upgrade}): {exc}"[:400])
    assert not wrong, "\n".join(wrong)
    await live.assert_still_serving()


async def test_a_percent_encoded_percent_is_decoded_once(live: Live) -> None:
    # "%2561pp.js" names the file "%61pp.js", which does not exist; decoding twice would
    # also let "%252e%252e" through as "..", were it not for the check on dot segments.
    response = await raw_request(live.server, "/%2561pp.js")
    assert response is not None and response.status == 404, f"/%2561pp.js: {response}"
    assert response.json()["error"]["code"] == "not_found"


async def test_web_client_files_are_served_by_name(live: Live) -> None:
    targets = ["/", "/?x=../../etc/passwd", "/index.html#top", "/%61pp.js"]
    for target in [*targets, *(f"/{name}" for name in served_files())]:
        response = await raw_request(live.server, target)
        check_http_answer(target, response, upgrade=False)
        expect_named_file(target, response)


async def test_raw_non_ascii_request_lines_get_no_server_error(live: Live) -> None:
    # Not valid HTTP (a request target must be ASCII): a 400, or no answer at all.
    for target in ["/é".encode(), b"/v1/models/\xff", "/v1/chat/模型".encode()]:
        response = await raw_request(live.server, target, upgrade=True)
        assert response is None or response.status == 400, (target, response)
    await live.assert_still_serving()


ODD_SEGMENTS = """.. . %2e%2e %2E%2E .%2e %2e. %252e%252e %c0%ae ~ %7e etc passwd pyproject.toml
    ws_server server.py web_client index.html app.js style.css favicon.svg .hidden .git %2egit
    %00 %2561pp.js echo slow %65cho reload models v1 chat healthz % %f %ff * : ; @ $ ' " [ ]"""
path_segments = (
    st.sampled_from([*ODD_SEGMENTS.split(), "\x00"])
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
    | st.text(max_size=6).map(lambda s: quote(s, safe=""))  # any Unicode, %-encoded
    | st.integers(1, 400).map(lambda n: "a" * n)
)
path_separators = st.sampled_from(["/", "/", "/", "%2f", "%2F", "\\", "%5c", "//"])


@st.composite
def request_targets(draw: st.DrawFn) -> str:
    target = draw(st.sampled_from(["/", "/", "/v1/models/", "/v1/chat/", "//", "/v1/", "/./"]))
    for index, segment in enumerate(draw(st.lists(path_segments, max_size=5))):
        target += (draw(path_separators) if index else "") + segment
    return target + draw(st.sampled_from(["", "", "?", "?x=../../etc/passwd", "?%00", "#top"]))


@fuzz_settings(examples=200)
@given(target=request_targets(), upgrade=st.booleans())
@example(target="/%2e%2e/pyproject.toml", upgrade=False)
@example(target="/v1/models/..%2f..%2fpyproject.toml", upgrade=False)
@example(target="/v1/chat/..%2fecho", upgrade=True)
async def test_any_request_path_gets_a_json_error_or_the_named_file_never_a_500(
    live: Live, target: str, upgrade: bool
) -> None:
    response = await raw_request(live.server, target, upgrade=upgrade)
    check_http_answer(target, response, upgrade=upgrade)
    expect_named_file(target, response)


async def test_the_server_is_still_serving_after_all_that(live: Live) -> None:
    await live.assert_still_serving()
    response = await raw_request(live.server, "/v1/models")
    assert response is not None and response.status == 200
    assert {row["id"] for row in response.json()["data"]} == set(MODELS)
