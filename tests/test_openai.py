"""POST /v1/chat/completions: every model usable from the OpenAI SDK, LangChain and the
chat UIs that speak OpenAI's protocol (design.md, *OpenAI-compatible chat*).

Against a real server, with the real ``openai`` SDK, ``langchain-openai`` and raw HTTP
(httpx) where the exact bytes matter: streamed and whole replies from shared and isolated
models, the chunk format field by field, params and content parts reaching the model, a
client leaving mid-stream, keepalive pings, errors in OpenAI's envelope, keys, CORS and
the request rate.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import (
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    copy_models,
    launch_server,
    wait_until_built,
)

ISOLATED_MODELS = Path(__file__).resolve().parent / "isolated_models"
SHIPPED = sorted(p.name for p in SHIPPED_MODELS.iterdir() if (p / "main.py").is_file())
COMPLETIONS = "/v1/chat/completions"


def api_models(target: Path) -> Path:
    """The shipped models, test models for params, cleanup, pauses, timeouts and failures,
    and isolated copies of two of them."""
    for directory in SHIPPED_MODELS.iterdir():
        if (directory / "main.py").is_file():
            shutil.copytree(directory, target / directory.name)
    copy_models(
        target, "params_echo", "recorder", "slow", "sleepy", "faulty", "start_fails",
        "broken_syntax", "eventful",
    )  # fmt: skip
    for name in ("params_echo", "recorder"):
        isolated = target / f"{name}_isolated"
        shutil.copytree(TEST_MODELS / name, isolated)
        config = isolated / "config.yaml"
        text = config.read_text() if config.exists() else ""
        config.write_text(text.replace("name: recorder", "") + "\nisolation: true\n")
    return target


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, env_cache: Path) -> Iterator[ServerProcess]:
    """One server for the endpoint's tests; pings after 0.3 s without output."""
    models = api_models(tmp_path_factory.mktemp("api-models"))
    running = launch_server(
        models,
        tmp_path_factory.mktemp("api-events"),
        "--sse-keepalive",
        "0.3",
        "--max-frame-size",
        "65536",
        "--env-cache-dir",
        str(env_cache),
    )
    wait_until_built(running)
    yield running
    assert running.stop() == 0, running.log


def sdk(server: ServerProcess, key: str = "any-key-is-ignored", **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=key, max_retries=0, **kwargs)


def streamed_text(client: openai.OpenAI, model: str, content: Any, **kwargs: Any) -> str:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], stream=True, **kwargs
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads and comment lines of a streamed answer, in order."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") or line.startswith(":"):
            events.append(line)
    return events


def post(server: ServerProcess, body: Any, **kwargs: Any) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.http_url}{COMPLETIONS}", content=data, timeout=30, **kwargs)


# ---------------------------------------------------------------------- the SDK
@pytest.mark.parametrize("model", SHIPPED)
def test_the_sdk_streams_from_every_shipped_model(api: ServerProcess, model: str) -> None:
    text = streamed_text(sdk(api), model, "hello there")
    assert text.strip()
    if model == "echo":
        assert text == "hello there"
    if model == "test_model":  # the seed's example, unmodified
        assert text == "这是第一部分响应\n这是第二部分响应\n这是最后一部分响应"


@pytest.mark.parametrize("model", ["echo", "test_model", "params_echo_isolated"])
def test_the_sdk_gets_a_whole_reply_when_not_streaming(api: ServerProcess, model: str) -> None:
    reply = sdk(api).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "one two"}]
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == model and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content
    if model == "echo":
        assert choice.message.content == "one two"
    assert reply.usage is not None and reply.usage.total_tokens == (
        reply.usage.prompt_tokens + reply.usage.completion_tokens
    )


def test_an_isolated_model_streams_from_its_own_environment(api: ServerProcess) -> None:
    text = streamed_text(sdk(api), "banner", "Hi")
    assert len(text.splitlines()) >= 4  # ASCII-art letters from pyfiglet, in its virtualenv


# ---------------------------------------------------------------------- the chunk format
def test_streamed_chunks_have_openais_shape_field_by_field(api: ServerProcess) -> None:
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "I feel tired"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", api.http_url + COMPLETIONS, json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        events = sse_events(response)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    *choices, usage = chunks
    assert len(choices) >= 2
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl")
    assert {c["created"] for c in chunks} == {chunks[0]["created"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"echo"}
    for index, chunk in enumerate(choices):
        (choice,) = chunk["choices"]
        assert choice["index"] == 0
        assert ("role" in choice["delta"]) == (index == 0)
        assert "finish_reason" in choice  # always there: null until the last
        last = index == len(choices) - 1
        assert choice["finish_reason"] == ("stop" if last else None)
        assert chunk["usage"] is None  # asked for usage: null on every chunk but the last
    assert choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert choices[-1]["choices"][0]["delta"] == {}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in choices)
    assert text == "I feel tired"  # echo: one chunk a word
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )


def test_without_include_usage_there_is_no_usage_chunk(api: ServerProcess) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", api.http_url + COMPLETIONS, json=body, timeout=30) as response:
        events = sse_events(response)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert events[-1] == "data: [DONE]" and all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "hi"}


def test_one_keep_alive_connection_serves_request_after_request(api: ServerProcess) -> None:
    with httpx.Client(base_url=api.http_url, timeout=30) as client:
        for text in ("one", "two", "three"):
            answer = client.post(
                COMPLETIONS, json={"model": "echo", "messages": [{"role": "user", "content": text}]}
            )
            assert answer.json()["choices"][0]["message"]["content"] == text
    assert api.log.count("POST /v1/chat/completions") >= 3


# ---------------------------------------------------------------------- params and parts
@pytest.mark.parametrize("model", ["params_echo", "params_echo_isolated"])
def test_request_fields_beyond_ours_reach_the_model_as_params(
    api: ServerProcess, model: str
) -> None:
    text = streamed_text(
        sdk(api),
        model,
        "hi",
        temperature=0.25,
        max_tokens=7,
        stream_options={"include_usage": True},
        extra_body={"top_k": 3, "never_heard_of": {"nested": [1, 2]}},
    )
    params = json.loads(text)
    assert params == {
        "temperature": 0.25,
        "max_tokens": 7,
        "top_k": 3,
        "never_heard_of": {"nested": [1, 2]},
    }


def test_params_are_empty_when_the_request_has_none_beyond_ours(api: ServerProcess) -> None:
    assert json.loads(streamed_text(sdk(api), "params_echo", "hi")) == {}


def test_content_parts_reach_the_model_as_joined_text(api: ServerProcess) -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    assert streamed_text(sdk(api), "echo", parts) == "Hello, world"


def test_a_message_with_an_image_keeps_its_parts_beside_the_text(api: ServerProcess) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    parts = [{"type": "text", "text": "state"}, image]
    for model in ("recorder", "recorder_isolated"):
        state = json.loads(streamed_text(sdk(api), model, parts))
        (message,) = state["messages"]
        assert message == {"role": "user", "content": "state", "parts": parts}


def test_openai_roles_are_accepted_and_developer_is_system(api: ServerProcess) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "user", "content": "state"},
    ]  # fmt: skip
    reply = sdk(api).chat.completions.create(model="recorder", messages=messages)  # type: ignore[arg-type]
    seen = json.loads(reply.choices[0].message.content or "")["messages"]
    assert [m["role"] for m in seen] == ["system", "user", "assistant", "tool", "user"]
    assert seen[2]["content"] == "" and seen[2]["tool_calls"][0]["id"] == "call_1"
    assert seen[3]["tool_call_id"] == "call_1"


# ---------------------------------------------------------------------- lifecycle
def finished_generators(server: ServerProcess) -> int:
    logs = server.events_dir.glob("*.log")
    return sum(p.read_text().count("generator-closed") for p in logs)


@pytest.mark.parametrize("model", ["recorder", "recorder_isolated"])
def test_a_client_that_leaves_mid_stream_stops_the_turn_within_a_second(
    api: ServerProcess, model: str
) -> None:
    before = finished_generators(api)
    body = {"model": model, "messages": [{"role": "user", "content": "stream 200"}], "stream": True}
    with httpx.stream("POST", api.http_url + COMPLETIONS, json=body, timeout=30) as response:
        lines = response.iter_lines()
        seen = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert len(seen) >= 2
    left = time.monotonic()  # the connection is closed: the model's finally must run now
    while finished_generators(api) == before:
        assert time.monotonic() - left < 1.0, api.log
        time.sleep(0.02)


def test_a_quiet_model_gets_keepalive_pings(api: ServerProcess) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.stream("POST", api.http_url + COMPLETIONS, json=body, timeout=30) as response:
        events = sse_events(response)
    contents = [e for e in events if e.startswith("data: {")]
    first = events.index(contents[0])
    second = events.index(contents[1])
    pings = events[first + 1 : second]
    assert pings and set(pings) == {": ping"}  # 1.5 s of silence, pinged every 0.3 s
    assert 2 <= len(pings) <= 6
    assert events[-1] == "data: [DONE]"


def test_a_turn_past_its_timeout_finishes_with_length(api: ServerProcess) -> None:
    stream = sdk(api).chat.completions.create(
        model="sleepy", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.content == "dozing"
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = sdk(api).chat.completions.create(
        model="sleepy", messages=[{"role": "user", "content": "hi"}]
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.choices[0].message.content == "dozing"


def test_turns_are_counted_with_the_openai_label(api: ServerProcess) -> None:
    streamed_text(sdk(api), "echo", "count me")
    text = httpx.get(api.http_url + "/metrics", timeout=10).text
    assert 'anything_agent_turns_total{api="openai",model="echo",reason="stop"}' in text


def test_model_events_reach_openai_clients_as_reasoning_content(api: ServerProcess) -> None:
    stream = sdk(api).chat.completions.create(
        model="eventful", messages=[{"role": "user", "content": "steps"}], stream=True
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning.splitlines() == [
        "thinking",
        '[plan] {"goal":"answer"}',
        '[tool] "2+2"',
        "[tool] done: 4",
        '[plan] done: "<b>done</b>"',
        'custom: {"value":1,"name":"not the event\'s name"}',
    ]
    assert "".join(d.content or "" for d in deltas) == "ab"
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    whole = sdk(api).chat.completions.create(
        model="eventful", messages=[{"role": "user", "content": "steps"}]
    )
    message = whole.choices[0].message
    assert message.content == "ab"
    assert (getattr(message, "reasoning_content", None) or "").startswith("thinking\n[plan]")


# ---------------------------------------------------------------------- errors
def envelope(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


@pytest.mark.parametrize(
    ("body", "status", "code", "param", "says"),
    [
        (b"{not json", 400, "bad_request", None, "not JSON"),
        (b"[1, 2]", 400, "bad_request", None, "JSON object"),
        ({"model": "echo"}, 400, "bad_request", "messages", "missing"),
        ({"model": "echo", "messages": []}, 400, "bad_request", "messages", "at least one"),
        ({"model": "echo", "messages": "hi"}, 400, "bad_request", "messages", "array"),
        (
            {"model": "echo", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "bad_request",
            "messages[0].role",
            "one of",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": 5}]},
            400,
            "bad_request",
            "messages[0].content",
            "string or an array",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 3},
            400,
            "bad_request",
            "n",
            "one choice",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            400,
            "bad_request",
            "stream",
            "true or false",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "bad_request", "model", "model"),
        (
            {"model": "nobody", "messages": [{"role": "user", "content": "x"}]},
            404,
            "model_not_found",
            "model",
            "does not exist",
        ),
        (
            {"model": "broken_syntax", "messages": [{"role": "user", "content": "x"}]},
            503,
            "unavailable",
            None,
            "failed to load",
        ),
    ],
)
def test_bad_requests_get_openais_envelope_naming_the_problem(
    api: ServerProcess, body: Any, status: int, code: str, param: str | None, says: str
) -> None:
    response = post(api, body)
    assert response.status_code == status
    error = envelope(response)
    assert error["code"] == code and error["param"] == param and says in error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert streamed_text(sdk(api), "echo", "still fine") == "still fine"


def test_a_body_over_the_limit_is_a_clear_413(api: ServerProcess) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = post(api, big)
    assert response.status_code == 413
    assert "65536 bytes" in envelope(response)["message"]
    assert streamed_text(sdk(api), "echo", "after") == "after"


def test_the_sdk_raises_its_own_errors_for_ours(api: ServerProcess) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(api).chat.completions.create(
            model="nobody", messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        sdk(api).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], n=3
        )


def test_a_model_error_before_output_is_a_500_that_is_not_retried(api: ServerProcess) -> None:
    response = post(api, {"model": "start_fails", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 500 and response.headers["x-should-retry"] == "false"
    error = envelope(response)
    assert error["code"] == "model_error" and "SECRET" not in response.text
    assert "chatcmpl-" in error["message"]  # the session id, to find the log line


def test_a_model_error_mid_stream_is_an_error_event_then_done(api: ServerProcess) -> None:
    body = {"model": "faulty", "messages": [{"role": "user", "content": "boom"}], "stream": True}
    with httpx.stream("POST", api.http_url + COMPLETIONS, json=body, timeout=30) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == (
        "partial"
    )
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["code"] == "model_error" and "SECRET" not in events[1]
    assert events[2:] == ["data: [DONE]"]
    with pytest.raises(openai.APIError):  # the SDK raises it where it reads it
        streamed_text(sdk(api), "faulty", "boom")


def test_a_building_model_is_503_with_retry_after(api: ServerProcess) -> None:
    copy_models(api.models_dir, "slow_loader", source=ISOLATED_MODELS)  # loads for 3 s
    reloaded = httpx.post(api.http_url + "/v1/models/reload", timeout=30).json()
    assert reloaded["building"] == ["slow_loader"]
    response = post(api, {"model": "slow_loader", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert envelope(response)["code"] == "unavailable"
    wait_until_built(api)
    assert streamed_text(sdk(api), "slow_loader", "hi") == "loaded"


# ---------------------------------------------------------------------- LangChain
@pytest.mark.parametrize("model", ["echo", "eliza", "banner"])
def test_langchain_chat_openai_streams_a_reply(api: ServerProcess, model: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{api.http_url}/v1", api_key="unused", model=model, max_retries=0, timeout=30
    )
    pieces = [chunk.content for chunk in llm.stream("my name is Ada")]
    assert len([p for p in pieces if p]) >= 1
    text = "".join(str(p) for p in pieces)
    if model == "echo":
        assert text == "my name is Ada"
    assert llm.invoke("hello").content


# ---------------------------------------------------------------------- keys, CORS, rate
APP = "http://app.test:3000"
KEY = "k-openai-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """API keys required, one other origin allowed, three requests a minute per address."""
    models = copy_models(tmp_path_factory.mktemp("guarded-models"), "params_echo")
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    running = launch_server(
        models,
        tmp_path_factory.mktemp("guarded-events"),
        "--allowed-origins",
        APP,
        env={"ANYTHING_AGENT_API_KEYS": KEY},
    )
    yield running
    assert running.stop() == 0, running.log


def test_keys_are_bearer_tokens_as_the_sdk_sends_them(guarded: ServerProcess) -> None:
    assert streamed_text(sdk(guarded, KEY), "echo", "keyed") == "keyed"
    with pytest.raises(openai.AuthenticationError):
        streamed_text(sdk(guarded, "k-wrong"), "echo", "x")
    response = post(guarded, {"model": "echo", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 401 and envelope(response)["code"] == "unauthorized"
    assert envelope(response)["type"] == "authentication_error"


def test_a_browser_preflight_is_answered_without_a_key(guarded: ServerProcess) -> None:
    asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    response = httpx.request(
        "OPTIONS",
        guarded.http_url + COMPLETIONS,
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": asked,
        },
        timeout=10,
    )
    assert response.status_code == 204 and "content-length" not in response.headers
    assert response.headers["access-control-allow-origin"] == APP
    assert "POST" in response.headers["access-control-allow-methods"]
    granted = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
    assert granted == {h.strip() for h in asked.split(",")}


def test_an_allowed_origin_gets_cors_headers_on_the_reply(guarded: ServerProcess) -> None:
    headers = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": "cors"}], "stream": True}
    with httpx.stream(
        "POST", guarded.http_url + COMPLETIONS, json=body, headers=headers, timeout=30
    ) as response:
        assert response.headers["access-control-allow-origin"] == APP
        assert sse_events(response)[-1] == "data: [DONE]"
    refused = post(guarded, body, headers={**headers, "Origin": "http://evil.test"})
    assert refused.status_code == 403 and envelope(refused)["code"] == "forbidden_origin"
    assert "access-control-allow-origin" not in refused.headers
    preflight = httpx.request(
        "OPTIONS", guarded.http_url + COMPLETIONS, headers={"Origin": "http://evil.test"}
    )
    assert preflight.status_code == 403


def test_the_request_rate_per_address_is_limited(tmp_path: Path, start_server: Any) -> None:
    models = copy_models(tmp_path / "models", "params_echo")
    live = start_server(models, "--max-messages-per-minute", "3")
    body = {"model": "params_echo", "messages": [{"role": "user", "content": "x"}]}
    assert [post(live, body).status_code for _ in range(3)] == [200, 200, 200]
    refused = post(live, body)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert envelope(refused)["code"] == "rate_limited"
