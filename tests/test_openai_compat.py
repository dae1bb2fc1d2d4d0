"""The OpenAI-compatible endpoint's pure parts, with plain calls: reading a request
(``openai_compat/request.py``), OpenAI's objects and events (``wire.py``), and a session's
frames turned into them (``stream.py``, over an in-memory response)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ws_server.exceptions import InvalidRequest
from ws_server.openai_compat import wire
from ws_server.openai_compat.request import parse_request
from ws_server.openai_compat.stream import CompletionStream


def body(**fields: Any) -> bytes:
    return json.dumps(
        {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


# ---------------------------------------------------------------------- the request
def test_our_fields_are_read_and_every_other_one_becomes_params() -> None:
    request = parse_request(
        body(stream=True, stream_options={"include_usage": True}, temperature=0.1, n=1, x={"y": 1})
    )
    assert request.model == "echo" and request.stream and request.include_usage
    assert request.params == {"temperature": 0.1, "n": 1, "x": {"y": 1}}
    assert request.messages == [{"role": "user", "content": "hi"}]


def test_roles_parts_and_tool_fields_are_kept_as_openai_sends_them() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}
    request = parse_request(
        body(
            messages=[
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "look"}, image],
                    "name": "ada",
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ]
        )
    )
    assert request.messages == [
        {"role": "system", "content": "rules"},
        {
            "role": "user",
            "content": "look",
            "parts": [{"type": "text", "text": "look"}, image],
            "name": "ada",
        },
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        (b"\xff\xfe", None, "not JSON"),
        (b'"just a string"', None, "JSON object"),
        (body(model=3), "model", "name of a model"),
        (body(messages=None), "messages", "missing"),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content", "not null"),
        (body(messages=[{"role": "system"}]), "messages[0].content", "not null"),
        (
            body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
            "messages[0].content",
            "text must be a string",
        ),
        (body(stream=1), "stream", "true or false"),
        (body(stream_options=[]), "stream_options", "object"),
        (
            body(stream=True, stream_options={"include_usage": "yes"}),
            "stream_options",
            "include_usage",
        ),
        (body(n=0), "n", "positive"),
        (body(n=2), "n", "one choice"),
        (body(n=True), "n", "positive"),
    ],
)
def test_bad_requests_name_the_field(raw: bytes, param: str | None, says: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(raw)
    assert refused.value.param == param and says in refused.value.message
    assert refused.value.http_status == 400 and refused.value.code == "bad_request"


# ---------------------------------------------------------------------- the wire
def test_usage_is_estimated_at_four_characters_a_token() -> None:
    assert wire.usage("abcdefgh", "abc") == {
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "total_tokens": 3,
    }
    assert wire.estimate_tokens("") == 0


def test_chunk_events_are_json_lines_with_one_id_and_the_role_first() -> None:
    events = wire.ChunkEvents(wire.Reply("m", "rev"), include_usage=False)
    first, later = events.content('say "hi"\n', True), events.content("ünï", False)
    for event in (first, later):
        assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    one, two = json.loads(first[6:]), json.loads(later[6:])
    assert one["id"] == two["id"] and one["system_fingerprint"] == "rev"
    assert one["choices"][0]["delta"] == {"role": "assistant", "content": 'say "hi"\n'}
    assert two["choices"][0]["delta"] == {"content": "ünï"}
    assert json.loads(events.finish("length", False)[6:])["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


# ---------------------------------------------------------------------- the stream
class Recorded:
    """A ``ResponseStream`` in memory: what would go on the wire."""

    def __init__(self) -> None:
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.started = False
        self.status: int | None = None
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started, self.status, self.headers = True, status, headers

    def send(self, data: bytes) -> None:
        self.body += data

    async def drain(self) -> None:
        pass

    def events(self) -> list[str]:
        return [e for e in self.body.decode().split("\n\n") if e]


def completion(out: Recorded, streaming: bool = True, usage: bool = False) -> CompletionStream:
    return CompletionStream(
        wire.Reply("echo", "rev"),
        prompt="hello world",
        stream=out,
        streaming=streaming,
        include_usage=usage,
        headers=[("Vary", "Origin")],
    )


async def test_a_streamed_turn_is_chunks_a_finish_usage_and_done() -> None:
    out = Recorded()
    reply = completion(out, usage=True)
    await reply.write(reply.chunk(1, 1, "hel"))
    await reply.write(reply.chunk(2, 1, "lo"))
    await reply.write_now(reply.done(3, 1, "stop"))
    assert out.status == 200 and ("X-Accel-Buffering", "no") in out.headers
    assert ("Vary", "Origin") in out.headers
    *chunks, done = out.events()
    assert done == "data: [DONE]" and reply.finished.done()
    parsed = [json.loads(c.removeprefix("data: ")) for c in chunks]
    assert [p["choices"][0]["finish_reason"] if p["choices"] else "usage" for p in parsed] == [
        None,
        None,
        "stop",
        "usage",
    ]
    assert parsed[-1]["usage"]["completion_tokens"] == 2
    assert reply.answer() is None  # streamed: nothing more to send


async def test_an_error_before_any_output_is_an_http_error_not_a_stream() -> None:
    out = Recorded()
    reply = completion(out)
    await reply.write_now(reply.error(1, "model_error", "it broke (session s)", 1))
    await reply.write_now(reply.done(2, 1, "error"))
    assert not out.started and out.body == b""
    answer = reply.answer()
    assert answer is not None and answer.status_code == 500
    assert answer.headers["x-should-retry"] == "false"
    assert json.loads(answer.body)["error"]["code"] == "model_error"


async def test_an_error_after_output_is_an_error_event_then_done() -> None:
    out = Recorded()
    reply = completion(out)
    await reply.write(reply.chunk(1, 1, "partial"))
    await reply.write_now(reply.error(2, "model_crashed", "the worker died", 1))
    await reply.write_now(reply.done(3, 1, "error"))
    events = out.events()
    assert json.loads(events[1].removeprefix("data: "))["error"]["code"] == "model_crashed"
    assert events[2:] == ["data: [DONE]"]


async def test_a_timeout_finishes_with_length_and_a_shutdown_with_an_error() -> None:
    out = Recorded()
    reply = completion(out, streaming=False)
    await reply.write(reply.chunk(1, 1, "so far"))
    await reply.write_now(reply.error(2, "timeout", "too slow", 1))
    await reply.write_now(reply.done(3, 1, "timeout"))
    answer = reply.answer()
    assert answer is not None and answer.status_code == 200
    choice = json.loads(answer.body)["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "so far"

    out = Recorded()
    reply = completion(out)
    await reply.write(reply.chunk(1, 1, "half"))
    await reply.write_now(reply.done(2, 1, "cancelled"))  # only a shutdown cancels
    error = json.loads(out.events()[1].removeprefix("data: "))["error"]
    assert error["code"] == "unavailable" and out.events()[-1] == "data: [DONE]"


async def test_a_quiet_stream_is_pinged_and_the_ping_sends_the_head() -> None:
    out = Recorded()
    reply = completion(out)
    reply.keep_alive(0.05)
    await asyncio.sleep(0.18)
    assert out.started and out.status == 200
    assert 2 <= out.body.count(b": ping\n\n") <= 4
    await reply.write_now(reply.done(1, 1, "stop"))
    pings = out.body.count(b": ping")
    await asyncio.sleep(0.12)
    assert out.body.count(b": ping") == pings  # none after the end
    assert out.events()[-1] == "data: [DONE]"
