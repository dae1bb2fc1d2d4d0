"""OpenAI's chat completion objects and Server-Sent Events, as bytes: pure, no I/O.

A streamed reply is ``chat.completion.chunk`` events sharing one ``id`` and ``created``:
``role`` in the first delta only, ``finish_reason`` null until the last chunk, a usage
chunk with ``"choices": []`` when asked for, then ``data: [DONE]``. The chunk events are
the hot path, so they are built from a per-reply prefix rather than a dict per chunk.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Final

from ws_server import protocol

DONE_EVENT: Final = b"data: [DONE]\n\n"
PING: Final = b": ping\n\n"  # an SSE comment: keeps proxies from cutting a quiet stream
CHARS_PER_TOKEN: Final = 4  # OpenAI's rule of thumb; we have no tokenizer for the model


# Made once: json.dumps with options builds an encoder per call, which showed per chunk.
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def estimate_tokens(text: str) -> int:
    """Usage figures are estimates: about four characters a token."""
    return -(-len(text) // CHARS_PER_TOKEN)


def usage(prompt: str, reply: str) -> dict[str, int]:
    prompt_tokens, completion_tokens = estimate_tokens(prompt), estimate_tokens(reply)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class Reply:
    """What every object of one reply shares."""

    model: str
    fingerprint: str  # the model's revision: which code answered
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }


class ChunkEvents:
    """The SSE events of one streamed reply."""

    __slots__ = ("_delta", "_tail", "reply")

    def __init__(self, reply: Reply, include_usage: bool) -> None:
        self.reply = reply
        head = _dumps(reply.head("chat.completion.chunk"))[:-1]
        self._delta = f'data: {head},"choices":[{{"index":0,"delta":{{'
        # OpenAI gives every chunk "usage": null when usage is asked for.
        self._tail = ',"usage":null}\n\n' if include_usage else "}\n\n"

    def content(self, text: str, first: bool) -> bytes:
        """A piece of the reply (the first one carries the role)."""
        return self._piece("content", text, first)

    def reasoning(self, text: str, first: bool) -> bytes:
        """What the model reports besides its reply, as ``delta.reasoning_content``."""
        return self._piece("reasoning_content", text, first)

    def _piece(self, field: str, text: str, first: bool) -> bytes:
        role = '"role":"assistant",' if first else ""
        return (
            f'{self._delta}{role}"{field}":{_dumps(text)}}},"logprobs":null,'
            f'"finish_reason":null}}]{self._tail}'
        ).encode()

    def finish(self, reason: str, first: bool) -> bytes:
        """The last chunk: an empty delta and why the reply ended (``stop``, ``length``)."""
        delta = '"role":"assistant"' if first else ""
        return (
            f'{self._delta}{delta}}},"logprobs":null,"finish_reason":"{reason}"}}]{self._tail}'
        ).encode()

    def usage(self, figures: dict[str, int]) -> bytes:
        """The usage chunk, after the last one: no choices."""
        body = {**self.reply.head("chat.completion.chunk"), "choices": [], "usage": figures}
        return f"data: {_dumps(body)}\n\n".encode()


def event_text(name: str, data: dict[str, Any]) -> str:
    """A model event as a line of reasoning text (what OpenAI clients show of it)."""
    if name == "status":
        return f"{data.get('text', '')}\n"
    if name == "step":
        label = data.get("name", "step")
        if data.get("status") == "running":
            shown = data.get("input")
            return f"[{label}] {_dumps(shown) if shown is not None else ''}".rstrip() + "\n"
        if data.get("status") == "error":
            return f"[{label}] failed\n"
        shown = data.get("output")
        return f"[{label}] done{': ' + _dumps(shown) if shown is not None else ''}\n"
    if name == "queued":
        return f"queued (position {data.get('position')})\n"
    return f"{name}: {_dumps(data)}\n"


def error_event(code: str, message: str, status: int) -> bytes:
    """An error after the stream began: OpenAI's envelope as an event (the SDK raises it)."""
    return f"data: {_dumps(protocol.error_envelope(code, message, status))}\n\n".encode()


def completion(
    reply: Reply, content: str, finish_reason: str, figures: dict[str, int], reasoning: str = ""
) -> bytes:
    """A whole (non-streamed) reply: one ``chat.completion`` object (what the model
    reported besides text, if anything, as ``message.reasoning_content``)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if reasoning:
        message["reasoning_content"] = reasoning
    body = {
        **reply.head("chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": figures,
    }
    return _dumps(body).encode()


# The HTTP status of a turn that failed with an error code, before any output.
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "rate_limited": 429,
    "overloaded": 503,
    "unavailable": 503,
    "interrupted": 503,
    "timeout": 504,
    "model_error": 500,
    "model_crashed": 500,
    "resource_exhausted": 500,
    "internal": 500,
}


def status_of(code: str) -> int:
    return STATUS.get(code, 500)
