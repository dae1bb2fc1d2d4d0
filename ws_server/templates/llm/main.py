"""LLM template: chats through an OpenAI-compatible Chat Completions API, streaming.

It sends the conversation upstream with ``"stream": true`` and yields each piece of text
as it arrives (Server-Sent Events), so the client sees the reply as the upstream writes
it. The upstream, its model and the system prompt are config.yaml ``parameters``; the API
key is a config.yaml secret. Whatever the client sends as params (temperature,
max_tokens, top_p, stop, seed, ...) goes upstream as it is. Standard library only.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from ws_server import AnythingBaseModel

KEY = "OPENAI_API_KEY"  # the name of the secret in config.yaml, and of its variable
# Request fields this model sets itself: a client's params cannot change them.
OWN_FIELDS = frozenset({"model", "messages", "stream", "stream_options"})
MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id")  # passed upstream when present


class MissingKey(RuntimeError):
    """The API key is not set."""


class UpstreamError(RuntimeError):
    """The upstream API refused the request, could not be reached, or broke off."""


class LlmModel(AnythingBaseModel):
    """Chats through an OpenAI-compatible API, streaming its reply as it comes."""

    # A plain generator, not async: the server runs it in a thread of its own, so the
    # blocking urllib calls stall nobody else.
    def on_chat_messages(self, messages: list[dict[str, Any]]) -> Iterator[str]:
        parameters = self.config.get("parameters", {})
        key = self.config.get("secrets", {}).get(KEY)
        if not key:
            raise MissingKey(
                f"no API key: set the environment variable {KEY} where the server runs "
                f"(config.yaml reads it with secrets: {{{KEY}: {{env: {KEY}}}}})"
            )
        url = parameters.get("base_url", "https://api.openai.com/v1").rstrip("/")
        url += "/chat/completions"
        body = {field: value for field, value in self.params.items() if field not in OWN_FIELDS}
        body.update(
            model=parameters.get("model", "gpt-4o-mini"),
            messages=upstream_messages(messages, parameters.get("system_prompt")),
            stream=True,
        )
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/json",
                "Accept": "text/event-stream",
            },
            method="POST",
        )
        try:
            response = urllib.request.urlopen(
                request, timeout=parameters.get("request_timeout", 60)
            )
        except urllib.error.HTTPError as exc:
            raise UpstreamError(
                f"{url} answered HTTP {exc.code}: {error_message(exc.read())}"
            ) from None
        except OSError as exc:  # refused, unknown host, timed out
            raise UpstreamError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
        with response:  # closed early too, when the client cancels the turn
            yield from stream_text(response)


def upstream_messages(messages: list[dict[str, Any]], system_prompt: Any) -> list[Any]:
    """The conversation as the upstream takes it: images and files as the client sent them
    (``parts``), the system prompt first unless the client sent its own."""
    sent = []
    if system_prompt and not any(message["role"] == "system" for message in messages):
        sent.append({"role": "system", "content": system_prompt})
    for message in messages:
        one = {"role": message["role"], "content": message.get("parts") or message["content"]}
        one.update({field: message[field] for field in MESSAGE_FIELDS if field in message})
        sent.append(one)
    return sent


def stream_text(response: Any) -> Iterator[str]:
    """The text of each ``data:`` event of a Chat Completions stream, up to ``[DONE]``."""
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue  # blank lines between events, comments (": ping"), event names
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:  # an upstream that fails after the stream began
            raise UpstreamError(f"the upstream stopped: {error_message(data.encode())}")
        for choice in chunk.get("choices", []):
            text = (choice.get("delta") or {}).get("content")
            if text:
                yield text


def error_message(body: bytes) -> str:
    """What the upstream said went wrong: OpenAI's ``{"error": {"message": ...}}``, else
    the start of the body."""
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500] or "(no message)"
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error or text)[:500]
