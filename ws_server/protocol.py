"""Wire protocol v1: frames parsed into typed values and encoded, in both directions.

Pure functions, no I/O. The server parses client frames and encodes server frames; the
Python client (``ws_server.client``) does the reverse with the same module, so both ends
agree by construction. See design.md ("The wire protocol, v1") for the contract.
"""

from __future__ import annotations

import json
import json.encoder
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ws_server.exceptions import BadRequest, ProtocolViolation

PROTOCOL_VERSION: Final = "v1"

DoneReason = Literal["stop", "cancelled", "timeout", "error"]
ErrorCode = Literal[
    "bad_request",
    "busy",
    "model_error",
    "timeout",
    "model_crashed",
    "resource_exhausted",
    "rate_limited",
    "overloaded",
    "unavailable",
    "resume_expired",
    "interrupted",
    "internal",
]
ROLES: Final = ("user", "assistant", "system")
# OpenAI-style content parts a message may hold; the model sees the text parts joined.
PART_TYPES: Final = ("text", "image_url", "input_audio", "file", "refusal")
PARAMS_LIMIT: Final = 16 * 1024  # bytes of JSON a frame's params may take
# JSON's \ud800-style escapes can spell lone surrogates, which are not text: they can't be
# encoded as UTF-8, so they can't be sent or counted. Found where strings enter.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
FRAME_TYPES: Final = ("message", "messages", "cancel")
# Subprotocol entries (design.md, *Resuming*): a client that can resume offers
# ``resumable``; to resume it offers ``resume.<token>.<after>``. Beside ``anything-agent.v1``.
RESUMABLE: Final = "resumable"
RESUME_PREFIX: Final = "resume."
TOKEN_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_RESUME_ENTRY: Final = re.compile(r"^resume\.([A-Za-z0-9_-]{1,128})\.(0|[1-9][0-9]{0,17})$")
DONE_REASONS: Final = ("stop", "cancelled", "timeout", "error")


# --------------------------------------------------------------------- client → server
@dataclass(frozen=True, slots=True)
class UserMessage:
    """Append one user message to the history and run a turn. ``parts``: the content as
    sent, when it was a list of parts holding more than text."""

    content: str
    params: dict[str, Any] | None = None
    parts: list[dict[str, Any]] | None = None

    def message(self) -> dict[str, Any]:
        """The history entry this frame adds."""
        if self.parts is None:
            return {"role": "user", "content": self.content}
        return {"role": "user", "content": self.content, "parts": self.parts}


@dataclass(frozen=True, slots=True)
class ReplaceHistory:
    """Replace the whole history (clients that keep their own) and run a turn."""

    messages: list[dict[str, Any]]
    params: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CancelTurn:
    """End the running turn now; ignored when none runs."""


ClientFrame = UserMessage | ReplaceHistory | CancelTurn


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """``resume.<token>.<after>``: carry on the session of ``token`` after frame ``after``."""

    token: str
    after: int


@dataclass(frozen=True, slots=True)
class Offer:
    """What a handshake's subprotocol entries ask about resuming."""

    resumable: bool = False
    resume: ResumeRequest | None = None


def parse_offer(entries: list[str]) -> Offer:
    """The resume entries among a handshake's subprotocols, or ``BadRequest`` for a
    malformed ``resume.`` entry (or two of them)."""
    resume: ResumeRequest | None = None
    resumable = False
    for entry in entries:
        if entry == RESUMABLE:
            resumable = True
        elif entry.startswith(RESUME_PREFIX):
            match = _RESUME_ENTRY.match(entry)
            if match is None:
                raise BadRequest(
                    "malformed resume entry: offer resume.<token>.<after>, the token as "
                    "ready gave it and after the last seq processed (0 if none)"
                )
            if resume is not None:
                raise BadRequest("more than one resume entry offered")
            resume = ResumeRequest(match.group(1), int(match.group(2)))
    return Offer(resumable or resume is not None, resume)


def resume_entry(token: str, after: int) -> str:
    """The subprotocol entry a client offers to resume (the inverse of ``parse_offer``)."""
    return f"{RESUME_PREFIX}{token}.{after:d}"


_CANCEL: Final = CancelTurn()


def parse_client_frame(data: str | bytes) -> ClientFrame:
    """Turn one received WebSocket message into a typed frame, or raise ``BadRequest``.

    A text frame whose first non-blank character is not ``{`` is a plain user message,
    so ``wscat`` users can just type.
    """
    if not isinstance(data, str):
        raise BadRequest(
            "binary frames are not part of protocol v1; send JSON or plain text as a text frame"
        )
    stripped = data.lstrip()
    if not stripped:
        raise BadRequest('empty frame: send some text, or a JSON object with a "type"')
    if stripped[0] != "{":
        return UserMessage(data)
    try:
        frame = json.loads(data)
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None
    if not isinstance(frame, dict):  # e.g. '{"a":1}' can't be anything else, but be sure
        raise BadRequest("a frame must be a JSON object")
    return _frame_from_object(frame)


def clean_text(text: str) -> str:
    """``text`` with any lone surrogate replaced by U+FFFD, so it can be sent as UTF-8.

    For what a model yields: a chunk is never refused for this, just repaired. ASCII text
    (most chunks) is returned at once."""
    if text.isascii():
        return text
    return _SURROGATE.sub("\ufffd", text)


def _checked_text(value: str, where: str) -> str:
    if not value.isascii() and _SURROGATE.search(value):
        raise BadRequest(f"{where} holds a lone surrogate (an escape like \\ud800): not text")
    return value


def _frame_from_object(frame: dict[str, Any]) -> ClientFrame:
    if "type" not in frame:
        raise BadRequest('missing field "type"; expected one of: message, messages, cancel')
    kind = frame["type"]
    if kind == "message":
        if "content" not in frame:
            raise BadRequest('"message" frame is missing field "content"')
        content, parts = parse_content(frame["content"], '"content"')
        return UserMessage(content, _params(frame), parts)
    if kind == "messages":
        if "messages" not in frame:
            raise BadRequest('"messages" frame is missing field "messages"')
        return ReplaceHistory(_validate_history(frame["messages"]), _params(frame))
    if kind == "cancel":
        return _CANCEL
    if not isinstance(kind, str):
        raise BadRequest(f'"type" must be a string, not {_json_type(kind)}')
    kind = clean_text(kind)  # it is quoted back in the error
    raise BadRequest(
        f'unknown frame type "{kind[:64]}"; expected one of: message, messages, cancel'
    )


def _params(frame: dict[str, Any]) -> dict[str, Any] | None:
    """A frame's ``params``: a JSON object of at most ``PARAMS_LIMIT`` bytes, or None."""
    params = frame.get("params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise BadRequest(f'"params" must be an object, not {_json_type(params)}')
    size = len(_encoded(params, '"params"'))
    if size > PARAMS_LIMIT:
        raise BadRequest(f'"params" takes {size} bytes of JSON, over the limit of {PARAMS_LIMIT}')
    return params or None


def parse_content(value: Any, where: str) -> tuple[str, list[dict[str, Any]] | None]:
    """A message's ``content``: a string, or a list of OpenAI-style content parts. Returns
    the text the model sees (the text parts joined) and the parts themselves when they
    held anything but text (None otherwise)."""
    if isinstance(value, str):
        return _checked_text(value, where), None
    if not isinstance(value, list):
        raise BadRequest(
            f"{where} must be a string or an array of content parts, not {_json_type(value)}"
        )
    if not value:
        raise BadRequest(f"{where} must hold at least one content part")
    texts: list[str] = []
    rich = False
    for index, part in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise BadRequest(f"{at} must be an object, not {_json_type(part)}")
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise BadRequest(f"{at}.type must be one of: {', '.join(PART_TYPES)}")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise BadRequest(f"{at}.{kind} must be a string, not {_json_type(text)}")
            texts.append(_checked_text(text, f"{at}.{kind}"))
        else:
            if not isinstance(part.get(kind), dict):
                raise BadRequest(f"{at}.{kind} must be an object, not {_json_type(part.get(kind))}")
            _encoded(part, at)
            rich = True
    return "".join(texts), (value if rich else None)


def _encoded(value: Any, where: str) -> bytes:
    """``value`` as UTF-8 JSON; a lone surrogate anywhere in it is refused."""
    try:
        return _dumps(value).encode()
    except UnicodeEncodeError:
        raise BadRequest(
            f"{where} holds a lone surrogate (an escape like \\ud800): not text"
        ) from None


def _validate_history(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise BadRequest(f'"messages" must be an array, not {_json_type(messages)}')
    if not messages:
        raise BadRequest('"messages" must hold at least one message')
    history: list[dict[str, Any]] = []
    for index, item in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object, not {_json_type(item)}")
        role = item.get("role")
        if role not in ROLES:
            raise BadRequest(f'{where}.role must be one of "user", "assistant", "system"')
        content, parts = parse_content(item.get("content"), f"{where}.content")
        message: dict[str, Any] = {"role": role, "content": content}
        if parts is not None:
            message["parts"] = parts
        history.append(message)
    return history


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# --------------------------------------------------------------------- server → client
# Made once: json.dumps with options builds a new encoder per call (per chunk, in a profile).
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# What ``_dumps`` does with a str, without its dispatch: a JSON string literal (C code).
_string: Final[Callable[[str], str]] = json.encoder.encode_basestring


def encode_ready(
    session_id: str,
    model: str,
    version: str,
    resume_token: str | None = None,
    resume_window: float | None = None,
) -> str:
    """Sent once ``on_chat_start`` has returned; a resumable session's carries its token."""
    frame: dict[str, Any] = {
        "type": "ready",
        "session_id": session_id,
        "model": model,
        "version": version,
    }
    if resume_token is not None:
        frame["resume_token"] = resume_token
        frame["resume_window"] = resume_window
    return _dumps(frame)


def encode_resumed(
    session_id: str,
    model: str,
    version: str,
    after: int,
    replayed: int,
    turn: int,
    running: bool,
) -> str:
    """A resume succeeded: the ``replayed`` frames after ``after`` follow, then live ones."""
    return _dumps(
        {
            "type": "resumed",
            "session_id": session_id,
            "model": model,
            "version": version,
            "after": after,
            "replayed": replayed,
            "turn": turn,
            "running": running,
        }
    )


def encode_chunk(seq: int, turn: int, content: str) -> str:
    """One piece the model yielded; the hot path, so a template rather than a dict."""
    return f'{{"type":"chunk","seq":{seq:d},"turn":{turn:d},"content":{_string(content)}}}'


def encode_event(seq: int, turn: int, name: str, data: dict[str, Any]) -> str:
    """Something the model (or the server: ``queued``) reports besides text."""
    return (
        f'{{"type":"event","seq":{seq:d},"turn":{turn:d},"name":{_dumps(name)},'
        f'"data":{_dumps(data)}}}'
    )


def encode_done(seq: int, turn: int, reason: DoneReason) -> str:
    """The turn is over."""
    return f'{{"type":"done","seq":{seq:d},"turn":{turn:d},"reason":"{reason}"}}'


def encode_error(
    code: ErrorCode,
    message: str,
    turn: int | None = None,
    seq: int | None = None,
    retry_after: int | None = None,
) -> str:
    """Something the client should know; the connection stays usable unless a close follows.
    ``seq`` is None only before ``ready`` and for ``resume_expired``; ``retry_after``
    (seconds) comes with ``overloaded``."""
    frame: dict[str, Any] = {"type": "error"}
    if seq is not None:
        frame["seq"] = seq
    frame.update(code=code, message=message)
    if turn is not None:
        frame["turn"] = turn
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return _dumps(frame)


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP ``status``."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_envelope(
    code: str, message: str, status: int, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope, for ``POST /v1/chat/completions`` (its SDK and the chat UIs
    read it): ``{"error": {"message", "type", "param", "code"}}``, our code in ``code``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def encode_http_error(code: str, message: str) -> bytes:
    """The JSON body of a refused handshake or failed HTTP request."""
    return _dumps({"error": {"code": code, "message": message}}).encode()


def encode_api_error(code: str, message: str, status: int, param: str | None = None) -> bytes:
    """The body of a failed OpenAI-compatible request (``error_envelope``)."""
    return _dumps(error_envelope(code, message, status, param)).encode()


# --------------------------------------------------------------------- client side
def encode_message(
    content: str | list[dict[str, Any]], params: dict[str, Any] | None = None
) -> str:
    """Append a user message to the session's history and run a turn (``params``: what
    the model sees as ``self.params`` for that turn)."""
    frame: dict[str, Any] = {"type": "message", "content": content}
    if params:
        frame["params"] = params
    return _dumps(frame)


def encode_messages(messages: list[dict[str, Any]], params: dict[str, Any] | None = None) -> str:
    """Replace the session's history and run a turn."""
    frame: dict[str, Any] = {"type": "messages", "messages": messages}
    if params:
        frame["params"] = params
    return _dumps(frame)


def encode_cancel() -> str:
    """End the running turn."""
    return '{"type":"cancel"}'


@dataclass(frozen=True, slots=True)
class Ready:
    """The session is open: ``on_chat_start`` has returned. A resumable session's carries
    the token to resume it with and the seconds it waits for a resume."""

    session_id: str
    model: str
    version: str
    resume_token: str | None = None
    resume_window: float | None = None


@dataclass(frozen=True, slots=True)
class Resumed:
    """A resume succeeded: ``replayed`` frames after ``after`` follow, then the live ones."""

    session_id: str
    model: str
    version: str
    after: int
    replayed: int
    turn: int
    running: bool


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece the model yielded in turn ``turn``; ``seq`` numbers the session's frames."""

    turn: int
    content: str
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """Something the model reported besides text in turn ``turn`` (``status``, ``step``,
    ...), or the server did (``queued``): ``name`` and its ``data``."""

    turn: int
    name: str
    data: dict[str, Any]
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Done:
    """Turn ``turn`` is over, for ``reason``."""

    turn: int
    reason: DoneReason
    seq: int = 0


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """An ``error`` frame; ``turn`` is set when it belongs to a turn, ``seq`` unless it came
    before ``ready`` or is ``resume_expired``; ``retry_after`` (seconds) with
    ``overloaded``."""

    code: str
    message: str
    turn: int | None = None
    seq: int | None = None
    retry_after: int | None = None


ServerFrame = Ready | Resumed | Chunk | Event | Done | ErrorReport


def parse_server_frame(data: str | bytes) -> ServerFrame:
    """Turn one frame a server sent into a typed value, or raise ``ProtocolViolation``.

    Unknown extra fields are ignored, so servers may add some without breaking clients.
    """
    if not isinstance(data, str):
        raise ProtocolViolation("the server sent a binary frame; protocol v1 has none")
    try:
        frame = json.loads(data)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolViolation(
            f"the server sent a frame that is not JSON: {data[:80]!r}"
        ) from None
    if not isinstance(frame, dict):
        raise ProtocolViolation(f"the server sent a frame that is not an object: {data[:80]!r}")
    kind = frame.get("type")
    try:
        if kind == "chunk":
            return Chunk(
                _field(frame, "turn", int), _field(frame, "content", str), _field(frame, "seq", int)
            )
        if kind == "event":
            return Event(
                _field(frame, "turn", int),
                _field(frame, "name", str),
                _field(frame, "data", dict),
                _field(frame, "seq", int),
            )
        if kind == "done":
            reason = _field(frame, "reason", str)
            if reason not in DONE_REASONS:
                raise ProtocolViolation(f'unknown done reason "{reason[:40]}"')
            return Done(_field(frame, "turn", int), reason, _field(frame, "seq", int))
        if kind == "error":
            turn, seq = _optional_int(frame, "turn"), _optional_int(frame, "seq")
            return ErrorReport(
                _field(frame, "code", str),
                _field(frame, "message", str),
                turn,
                seq,
                _optional_int(frame, "retry_after"),
            )
        if kind == "ready":
            token = frame.get("resume_token")
            window = frame.get("resume_window")
            if token is not None and not isinstance(token, str):
                raise ProtocolViolation('"resume_token" must be a string')
            if window is not None and (not isinstance(window, (int, float)) or window is True):
                raise ProtocolViolation('"resume_window" must be a number')
            return Ready(
                _field(frame, "session_id", str),
                _field(frame, "model", str),
                _field(frame, "version", str),
                token,
                window,
            )
        if kind == "resumed":
            running = frame.get("running")
            if not isinstance(running, bool):
                raise ProtocolViolation('"running" must be true or false')
            return Resumed(
                _field(frame, "session_id", str),
                _field(frame, "model", str),
                _field(frame, "version", str),
                _field(frame, "after", int),
                _field(frame, "replayed", int),
                _field(frame, "turn", int),
                running,
            )
    except ProtocolViolation as exc:
        raise ProtocolViolation(f"bad {kind} frame from the server: {exc}") from None
    raise ProtocolViolation(f"the server sent an unknown frame type: {str(kind)[:40]!r}")


def _optional_int(frame: dict[str, Any], name: str) -> int | None:
    value = frame.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolViolation(f'"{name}" of an error frame must be an integer')
    return value


def _field(frame: dict[str, Any], name: str, kind: type) -> Any:
    value = frame.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolViolation(f'field "{name}" is missing or not {kind.__name__}')
    return value
