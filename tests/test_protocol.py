"""Protocol v1 as pure functions: what each client frame parses to, what each server frame
looks like on the wire."""

from __future__ import annotations

import json

import pytest

from ws_server import protocol
from ws_server.exceptions import BadRequest, ProtocolViolation
from ws_server.protocol import CancelTurn, ReplaceHistory, UserMessage, parse_client_frame


def test_plain_text_is_a_user_message() -> None:
    assert parse_client_frame("hello world") == UserMessage("hello world")


def test_text_starting_with_blank_then_not_brace_is_a_message() -> None:
    assert parse_client_frame("  [1, 2] ") == UserMessage("  [1, 2] ")


def test_message_frame() -> None:
    assert parse_client_frame('{"type":"message","content":"hi"}') == UserMessage("hi")


def test_messages_frame_replaces_history() -> None:
    frame = parse_client_frame(
        json.dumps(
            {
                "type": "messages",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi", "name": "ignored"},
                ],
            }
        )
    )
    assert frame == ReplaceHistory(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]
    )


def test_cancel_frame() -> None:
    assert isinstance(parse_client_frame('  {"type": "cancel"}'), CancelTurn)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("{not json", "invalid JSON"),
        ('{"content": "x"}', 'missing field "type"'),
        ('{"type": "shout"}', 'unknown frame type "shout"'),
        ('{"type": 7}', '"type" must be a string'),
        ('{"type": "message"}', 'missing field "content"'),
        (
            '{"type": "message", "content": 5}',
            '"content" must be a string or an array of content parts, not a number',
        ),
        ('{"type": "message", "content": []}', '"content" must hold at least one content part'),
        (
            '{"type": "message", "content": [{"type": "image_url", "image_url": "u"}]}',
            '"content"[0].image_url must be an object',
        ),
        ('{"type": "message", "content": "x", "params": 5}', '"params" must be an object'),
        ('{"type": "messages"}', 'missing field "messages"'),
        ('{"type": "messages", "messages": {}}', '"messages" must be an array'),
        ('{"type": "messages", "messages": []}', "at least one message"),
        ('{"type": "messages", "messages": ["hi"]}', "messages[0] must be an object"),
        (
            '{"type": "messages", "messages": [{"role": "bot", "content": "x"}]}',
            "messages[0].role must be one of",
        ),
        (
            '{"type": "messages", "messages": [{"role": "user"}]}',
            "messages[0].content must be a string or an array of content parts, not null",
        ),
        ("   ", "empty frame"),
        ("[" * 100000, None),  # not a '{' frame: a (strange) plain message
        ("{" + '"a":' * 1 + "[" * 100000, "invalid JSON"),
    ],
)
def test_invalid_frames_name_the_problem(raw: str, complaint: str | None) -> None:
    if complaint is None:
        assert isinstance(parse_client_frame(raw), UserMessage)
        return
    with pytest.raises(BadRequest) as caught:
        parse_client_frame(raw)
    assert complaint in caught.value.message
    assert caught.value.code == "bad_request"


def test_binary_frames_are_refused() -> None:
    with pytest.raises(BadRequest, match="binary frames"):
        parse_client_frame(b"\x00\x01")


def test_server_frames_are_compact_json() -> None:
    assert json.loads(protocol.encode_ready("s1", "echo", "1.0")) == {
        "type": "ready",
        "session_id": "s1",
        "model": "echo",
        "version": "1.0",
    }
    assert json.loads(protocol.encode_chunk(7, 3, 'quote " and 中文\n')) == {
        "type": "chunk",
        "seq": 7,
        "turn": 3,
        "content": 'quote " and 中文\n',
    }
    assert json.loads(protocol.encode_done(8, 3, "cancelled")) == {
        "type": "done",
        "seq": 8,
        "turn": 3,
        "reason": "cancelled",
    }
    assert json.loads(protocol.encode_error("busy", "wait")) == {
        "type": "error",
        "code": "busy",
        "message": "wait",
    }
    assert json.loads(protocol.encode_error("timeout", "slow", turn=2))["turn"] == 2
    assert list(json.loads(protocol.encode_error("busy", "wait", 2, seq=9))) == [
        "type",
        "seq",
        "code",
        "message",
        "turn",
    ]
    assert json.loads(protocol.encode_http_error("not_found", "no")) == {
        "error": {"code": "not_found", "message": "no"}
    }


def test_api_errors_take_openais_envelope() -> None:
    assert json.loads(protocol.encode_api_error("model_not_found", "no", 404, "model")) == {
        "error": {
            "message": "no",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert json.loads(protocol.encode_api_error("unauthorized", "key?", 401))["error"]["type"] == (
        "authentication_error"
    )
    assert json.loads(protocol.encode_api_error("internal", "oops", 500))["error"]["type"] == (
        "server_error"
    )


# --------------------------------------------------------------------- the client side
def test_client_frames_encode_to_what_the_server_parses() -> None:
    assert parse_client_frame(protocol.encode_message("{not json")) == UserMessage("{not json")
    history = [{"role": "user", "content": "hi"}]
    assert parse_client_frame(protocol.encode_messages(history)) == ReplaceHistory(history)
    assert parse_client_frame(protocol.encode_cancel()) == CancelTurn()


def test_server_frames_parse_back_to_what_was_encoded() -> None:
    parse = protocol.parse_server_frame
    assert parse(protocol.encode_ready("s1", "echo", "1.0")) == protocol.Ready("s1", "echo", "1.0")
    assert parse(protocol.encode_chunk(5, 3, 'a "quoted"\n')) == protocol.Chunk(
        3, 'a "quoted"\n', 5
    )
    assert parse(protocol.encode_done(6, 3, "timeout")) == protocol.Done(3, "timeout", 6)
    assert parse(protocol.encode_error("busy", "wait")) == protocol.ErrorReport("busy", "wait")
    assert parse(protocol.encode_error("timeout", "slow", 2)) == protocol.ErrorReport(
        "timeout", "slow", 2
    )


def test_server_frames_may_carry_extra_fields() -> None:
    frame = '{"type":"chunk","seq":4,"turn":1,"content":"x","model_extra":true}'
    assert protocol.parse_server_frame(frame) == protocol.Chunk(1, "x", 4)


def test_resume_entries_are_parsed_and_malformed_ones_refused() -> None:
    assert protocol.parse_offer(["anything-agent.v1"]) == protocol.Offer()
    assert protocol.parse_offer(["anything-agent.v1", "resumable"]) == protocol.Offer(True)
    entry = protocol.resume_entry("Ab-_9", 12)
    assert entry == "resume.Ab-_9.12"
    assert protocol.parse_offer([entry]) == protocol.Offer(
        True, protocol.ResumeRequest("Ab-_9", 12)
    )
    for bad in (
        "resume.",
        "resume.tok",
        "resume.tok.",
        "resume.tok.-1",
        "resume.tok.01",
        "resume.to$k.3",
        "resume.tok.3.4",
        f"resume.{'a' * 129}.1",
        "resume.tok.99999999999999999999",  # a huge after
    ):
        with pytest.raises(BadRequest, match="malformed resume entry"):
            protocol.parse_offer([bad])
    with pytest.raises(BadRequest, match="more than one"):
        protocol.parse_offer(["resume.a.1", "resume.b.2"])


def test_resumed_and_resumable_ready_frames_parse_back() -> None:
    parse = protocol.parse_server_frame
    ready = protocol.encode_ready("s", "echo", "1", "tok", 30.0)
    assert parse(ready) == protocol.Ready("s", "echo", "1", "tok", 30.0)
    resumed = protocol.encode_resumed("s", "echo", "1", after=4, replayed=2, turn=1, running=True)
    assert json.loads(resumed) == {
        "type": "resumed",
        "session_id": "s",
        "model": "echo",
        "version": "1",
        "after": 4,
        "replayed": 2,
        "turn": 1,
        "running": True,
    }
    assert parse(resumed) == protocol.Resumed("s", "echo", "1", 4, 2, 1, True)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"{}", "binary frame"),
        ("hello", "not JSON"),
        ("[1]", "not an object"),
        ('{"type":"chunk","turn":"1","content":"x"}', 'field "turn"'),
        ('{"type":"chunk","turn":true,"content":"x"}', 'field "turn"'),
        ('{"type":"chunk","turn":1}', 'field "content"'),
        ('{"type":"done","turn":1,"reason":"bored"}', "unknown done reason"),
        ('{"type":"error","code":"x","message":"y","turn":"2"}', '"turn" of an error frame'),
        ('{"type":"ready","session_id":"s","model":"m"}', 'field "version"'),
        ('{"type":"welcome"}', "unknown frame type"),
    ],
)
def test_a_server_frame_that_is_not_v1_is_a_protocol_violation(
    data: str | bytes, complaint: str
) -> None:
    with pytest.raises(ProtocolViolation, match=complaint):
        protocol.parse_server_frame(data)


def test_lone_surrogates_in_client_text_are_bad_requests() -> None:
    for frame in (
        '{"type":"message","content":"a\\ud800"}',
        '{"type":"messages","messages":[{"role":"user","content":"\\udfff"}]}',
    ):
        with pytest.raises(BadRequest, match="lone surrogate"):
            parse_client_frame(frame)
    with pytest.raises(BadRequest, match="unknown frame type") as refused:
        parse_client_frame('{"type":"\\ud800x"}')
    refused.value.message.encode()  # quoting it back is always valid UTF-8


def test_a_chunk_with_a_lone_surrogate_is_repaired_not_refused() -> None:
    assert protocol.clean_text("ok \ud800!") == "ok \ufffd!"
    assert protocol.clean_text("plain") == "plain"
    protocol.encode_chunk(1, 1, protocol.clean_text("\udfff")).encode()
