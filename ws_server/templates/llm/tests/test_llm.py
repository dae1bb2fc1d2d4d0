"""This model's tests: `anything-agent test MODEL_DIR` (or pytest) runs them in this
process, without a server and without network: the upstream is a fake OpenAI-compatible
API that the tests start on 127.0.0.1."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ws_server.testing import ModelLoadError, ModelTester

MODEL = Path(__file__).resolve().parent.parent
KEY = "test-key"


class FakeUpstream(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: streams the words "Hello from the fake upstream" as
    Server-Sent Events; with a wrong key, a 401 in OpenAI's error shape."""

    requests: list[dict[str, Any]]  # what the model sent, one body per request

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        if self.headers["Authorization"] != f"Bearer {KEY}":
            error = {"error": {"message": "Incorrect API key provided", "type": "auth"}}
            self.reply(401, "application/json", json.dumps(error).encode())
            return
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        for word in ["Hello", " from", " the", " fake", " upstream"]:
            events.append({"choices": [{"index": 0, "delta": {"content": word}}]})
        stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
        self.reply(200, "text/event-stream", (stream + "data: [DONE]\n\n").encode())

    def reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output quiet


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The fake upstream's base URL and the requests it received."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment stays out
    received: list[dict[str, Any]] = []
    handler = type("Handler", (FakeUpstream,), {"requests": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serve.start()
    yield f"http://127.0.0.1:{server.server_port}/v1", received
    server.shutdown()
    server.server_close()
    serve.join()


def test_it_streams_the_upstreams_reply_and_passes_the_params_on(
    upstream: tuple[str, list[dict[str, Any]]],
) -> None:
    base_url, received = upstream
    overrides = {"parameters": {"base_url": base_url, "model": "fake-model"}}
    with ModelTester(MODEL, config_overrides=overrides, secrets={"OPENAI_API_KEY": KEY}) as model:
        turn = model.send("hi", params={"temperature": 0.2, "max_tokens": 50})
    assert turn.chunks == ["Hello", " from", " the", " fake", " upstream"]
    assert turn.reason == "stop"
    (sent,) = received
    assert sent["model"] == "fake-model" and sent["stream"] is True
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 50
    assert sent["messages"][-1] == {"role": "user", "content": "hi"}


def test_an_upstream_error_says_what_the_upstream_said(
    upstream: tuple[str, list[dict[str, Any]]],
) -> None:
    base_url, _ = upstream
    overrides = {"parameters": {"base_url": base_url}}
    with ModelTester(
        MODEL, config_overrides=overrides, secrets={"OPENAI_API_KEY": "wrong"}
    ) as model:
        turn = model.send("hi")
    assert turn.reason == "error" and turn.errors[0].code == "model_error"
    # The client gets a generic model_error; the server log (and the test) get the reason.
    assert "answered HTTP 401: Incorrect API key provided" in str(turn.exception)


def test_without_the_variable_the_model_does_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ModelLoadError, match="the environment variable OPENAI_API_KEY is not set"):
        with ModelTester(MODEL):
            pass


def test_an_empty_key_says_which_variable_to_set(
    upstream: tuple[str, list[dict[str, Any]]],
) -> None:
    base_url, received = upstream
    overrides = {"parameters": {"base_url": base_url}}
    with ModelTester(MODEL, config_overrides=overrides, secrets={"OPENAI_API_KEY": ""}) as model:
        turn = model.send("hi")
    assert turn.reason == "error"
    assert "set the environment variable OPENAI_API_KEY" in str(turn.exception)
    assert received == []  # nothing was sent without a key
