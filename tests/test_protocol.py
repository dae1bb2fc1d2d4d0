"""Protocol v1 as pure functions: what each client frame parses to, what each server frame
looks like on the wire."""

from __future__ import annotations

import json

import pytest

from ws_server import protocol
from ws_server.exceptions import BadRequest
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
        ('{"type": "message", "content": 5}', '"content" must be a string, not a number'),
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
            "messages[0].content must be a string, not null",
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
    assert json.loads(protocol.encode_chunk(3, 'quote " and 中文\n')) == {
        "type": "chunk",
        "turn": 3,
        "content": 'quote " and 中文\n',
    }
    assert json.loads(protocol.encode_done(3, "cancelled")) == {
        "type": "done",
        "turn": 3,
        "reason": "cancelled",
    }
    assert json.loads(protocol.encode_error("busy", "wait")) == {
        "type": "error",
        "code": "busy",
        "message": "wait",
    }
    assert json.loads(protocol.encode_error("timeout", "slow", turn=2))["turn"] == 2
    assert json.loads(protocol.encode_http_error("not_found", "no")) == {
        "error": {"code": "not_found", "message": "no"}
    }
