"""A chat completions request, read and checked: pure, no I/O.

Only ``model``, ``messages``, ``stream`` and ``stream_options`` are ours; every other field
(``temperature``, ``max_tokens``, ``tools``, ``user``, ones we have never heard of) goes to
the model as ``self.params``, so a client that sends more than we know is never refused
for it. Messages keep OpenAI's roles (``developer`` is ``system``) and any
``name``/``tool_calls``/``tool_call_id``; content may be a string or a list of parts, and
the model sees it as a string, the parts alongside (``protocol.parse_content``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from ws_server import protocol
from ws_server.exceptions import BadRequest, InvalidRequest
from ws_server.sdk import Message

ROLES: Final = ("system", "developer", "user", "assistant", "tool")
OURS: Final = frozenset(("model", "messages", "stream", "stream_options"))
KEPT: Final = ("name", "tool_calls", "tool_call_id")  # message fields passed on as they are


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """What one ``POST /v1/chat/completions`` asks for."""

    model: str
    messages: list[Message]
    stream: bool
    include_usage: bool
    params: dict[str, Any]


def parse_request(body: bytes) -> CompletionRequest:
    """The request in ``body``, or ``InvalidRequest`` naming the field at fault."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included
        raise InvalidRequest(f"the request body is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = fields.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest('"model" must be the name of a model (GET /v1/models)', "model")
    stream = fields.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest('"stream" must be true or false', "stream")
    options = fields.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest('"stream_options" must be an object', "stream_options")
    usage = (options or {}).get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise InvalidRequest(
            '"stream_options.include_usage" must be true or false', "stream_options"
        )
    n = fields.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InvalidRequest('"n" must be a positive integer', "n")
    if n is not None and n > 1:
        raise InvalidRequest(f'"n" is {n}: this server answers one choice per request', "n")
    return CompletionRequest(
        model=model,
        messages=_messages(fields.get("messages")),
        stream=bool(stream),
        include_usage=bool(usage),
        params={k: v for k, v in fields.items() if k not in OURS},
    )


def _messages(value: Any) -> list[Message]:
    if value is None:
        raise InvalidRequest('"messages" is missing: send the conversation so far', "messages")
    if not isinstance(value, list):
        raise InvalidRequest('"messages" must be an array of messages', "messages")
    if not value:
        raise InvalidRequest('"messages" must hold at least one message', "messages")
    return [_message(item, f"messages[{index}]") for index, item in enumerate(value)]


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} must be an object", where)
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of: {', '.join(ROLES)}", f"{where}.role")
    content = item.get("content")
    if content is None and role in ("assistant", "tool"):
        content = ""  # an assistant's tool calls come without content
    try:
        text, parts = protocol.parse_content(content, f"{where}.content")
    except BadRequest as exc:
        raise InvalidRequest(exc.message, f"{where}.content") from None
    message: Message = {"role": "system" if role == "developer" else role, "content": text}
    if parts is not None:
        message["parts"] = parts
    for name in KEPT:
        if item.get(name) is not None:
            message[name] = item[name]
    return message
