"""The browser chat page at /, driven in Debian's Chromium through Playwright.

Each test leaves a screenshot of where it ended in test-output/screenshots/.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from browser_support import Wire, finished_reply, replies, screenshot
from conftest import (
    BROWSER_MODELS,
    SHIPPED_MODELS,
    TEST_MODELS,
    ServerProcess,
    client_models,
    http,
    launch_server,
)
from playwright.sync_api import Locator, Page, expect
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.browser

# Chromium as root in a container, on a machine with no way out: no sandbox (Playwright
# adds --no-sandbox), no GPU, no background calls home.


def open_chat(page: Page, server: ServerProcess, model: str) -> None:
    """Open the page on ``model`` and wait until its session is ready."""
    page.goto(f"{server.http_url}/#{model}")
    expect(page.locator("#model-name")).to_have_text(model)
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")


def say(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


# ---------------------------------------------------------------------- the model picker
def test_page_lists_models_with_version_description_and_status(
    page: Page, clients_server: ServerProcess
) -> None:
    page.goto(clients_server.http_url + "/")
    echo = page.locator('.model[data-model="echo"]')
    expect(echo).to_contain_text("v1.0.0")
    expect(echo).to_contain_text("Streams your last message back to you")
    scripted = page.locator('.model[data-model="scripted"]')
    expect(scripted).to_contain_text("v2.1")
    # The first ready model (by name) is picked and connected.
    expect(page.locator("#model-name")).to_have_text("agent_events")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")


def test_a_model_that_is_not_ready_is_shown_as_such_and_cannot_be_picked(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "echo")
    broken = page.locator('.model[data-model="broken_syntax"]')
    expect(broken).to_have_attribute("aria-disabled", "true")
    expect(broken.locator(".badge")).to_have_text("failed")
    expect(broken.locator(".model-error")).to_contain_text("main.py")
    broken.click(force=True)  # Playwright itself sees it as disabled
    expect(broken).to_have_attribute("aria-selected", "false")
    expect(page.locator("#model-name")).to_have_text("echo")


def test_a_deep_link_to_a_failed_model_picks_a_ready_one(
    page: Page, clients_server: ServerProcess
) -> None:
    page.goto(f"{clients_server.http_url}/#broken_syntax")
    expect(page.locator("#model-name")).to_have_text("agent_events")  # the first ready one
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")


def test_another_model_in_the_address_of_an_open_tab_starts_a_chat_with_it(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "remember me")
    finished_reply(page)
    page.evaluate("window.sameDocument = true")
    page.goto(f"{clients_server.http_url}/#echo")  # typed in the address bar: only the # changes
    expect(page.locator("#model-name")).to_have_text("echo")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator(".message")).to_have_count(0)  # a new chat
    expect(page.locator('.model[data-model="echo"]')).to_have_attribute("aria-selected", "true")
    expect(page.locator('.model[data-model="scripted"]')).to_have_attribute(
        "aria-selected", "false"
    )
    assert page.evaluate("window.sameDocument") is True  # switched in place, not reloaded
    say(page, "hello echo")
    expect(finished_reply(page).locator(".body")).to_have_text("hello echo")
    screenshot(page, "hash_change-switched_to_echo")
    page.go_back()  # back to #scripted: a new chat with it, in a new session
    expect(page.locator("#model-name")).to_have_text("scripted")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator(".message")).to_have_count(0)
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 1 things: recall")


def test_a_model_in_the_address_that_cannot_chat_keeps_the_chat_and_says_why(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "echo")
    page.goto(f"{clients_server.http_url}/#broken_syntax")
    expect(page.locator('.notice[data-code="unavailable"]')).to_contain_text("broken_syntax")
    page.goto(f"{clients_server.http_url}/#nobody")
    expect(page.locator('.notice[data-code="unavailable"]').last).to_contain_text("nobody")
    expect(page.locator("#model-name")).to_have_text("echo")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    assert page.evaluate("location.hash") == "#echo"  # the address names the chat shown


def failing_models(target: Path) -> Path:
    """echo, and two models whose errors run over several lines: an isolated one whose
    requirements cannot be installed (the installer's output, with paths; its package index
    is an empty local directory, so nothing reaches the network), and one whose error holds
    markup."""
    shutil.copytree(SHIPPED_MODELS / "echo", target / "echo")
    for name, config in (
        ("uninstallable", "isolation: true\n"),
        (
            "markup_error",
            "secrets:\n  token:\n    env: "
            '"NOT_SET_<img src=x onerror=\\"window.injected = true\\">\\n'
            '<script>window.injected = true</script> <b>second</b> line"\n',
        ),
    ):
        model = target / name
        model.mkdir()
        (model / "config.yaml").write_text(config)
        (model / "main.py").write_text(
            "from ws_server import AnythingBaseModel\n\n\n"
            "class Model(AnythingBaseModel):\n"
            "    async def on_chat_messages(self, messages):\n"
            '        yield "never"\n'
        )
    index = target / "uninstallable" / "index"
    index.mkdir()
    (target / "uninstallable" / "requirements.txt").write_text(
        f"--index-url {index.as_uri()}\nno-such-package-8c1e\n"
    )
    return target


def model_errors(server: ServerProcess, timeout: float = 60) -> dict[str, str]:
    """Each failed model's error, once none is building any more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = http(server, "/v1/models")
        if all(row["status"] != "building" for row in body["data"]):
            return {row["id"]: row["error"] for row in body["data"] if row["status"] == "failed"}
        time.sleep(0.1)
    raise AssertionError(f"a model is still building after {timeout}s:\n{server.log}")


def test_a_failed_models_long_error_shows_its_first_line_and_the_rest_on_demand(
    page: Page, start_server: object, tmp_path: Path
) -> None:
    server = start_server(failing_models(tmp_path / "models"))  # type: ignore[operator]
    errors = model_errors(server)
    assert set(errors) == {"uninstallable", "markup_error"}, errors
    installer = errors["uninstallable"].strip()
    first, rest = installer.split("\n", 1)
    assert "requirements.txt" in first and "no-such-package-8c1e" in rest

    page.goto(server.http_url + "/")
    failed = page.locator('.model[data-model="uninstallable"]')
    expect(failed.locator(".badge")).to_have_text("failed")
    expect(failed.locator(".model-error-first")).to_have_text(first)
    more = failed.locator(".model-error-more")
    expect(more.locator("summary")).to_have_text("more")
    expect(more.locator("pre")).to_be_hidden()
    assert "no-such-package-8c1e" not in failed.inner_text()  # the rest takes no room
    closed = failed.bounding_box()
    screenshot(page, "failed_model_error-first_line")

    more.locator("summary").click()
    expect(more.locator("pre")).to_be_visible()
    expect(more.locator("summary")).to_have_text("less")
    assert more.locator("pre").text_content() == rest.rstrip()
    opened = failed.bounding_box()
    assert closed is not None and opened is not None and opened["height"] > closed["height"]
    expect(page.locator("#model-name")).to_have_text("echo")  # opening it picks nothing

    # Markup in an error is text: shown as written, never turned into elements.
    markup = page.locator('.model[data-model="markup_error"]')
    markup.locator(".model-error-more summary").click()
    expect(markup.locator(".model-error-first")).to_contain_text(
        '<img src=x onerror="window.injected = true">'
    )
    expect(markup.locator(".model-error-more pre")).to_contain_text(
        "<script>window.injected = true</script> <b>second</b> line"
    )
    assert markup.locator("img, script, b").count() == 0
    assert page.evaluate("window.injected") is None
    screenshot(page, "failed_model_error-opened")
    more.locator("summary").click()
    expect(more.locator("pre")).to_be_hidden()


# ---------------------------------------------------------------------- chatting
def test_a_chat_with_echo_streams_the_reply_as_it_arrives(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "echo")
    words = [f"w{n}" for n in range(30)]  # echo waits 50 ms between words: 1.5 s
    say(page, " ".join(words))
    expect(page.locator(".message.user .body")).to_have_text(" ".join(words))
    # Part of the reply is on screen while the rest is still coming.
    page.wait_for_function(
        """() => {
            const reply = document.querySelector(".message.assistant");
            return reply && reply.classList.contains("streaming")
                && reply.querySelector(".body").textContent.startsWith("w0 w1");
        }"""
    )
    assert "w29" not in replies(page).first.inner_text()
    expect(page.locator("#stop")).to_be_visible()
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "stop")
    expect(reply.locator(".body")).to_have_text(" ".join(words))
    expect(page.locator("#send")).to_be_visible()


def test_stop_mid_stream_ends_the_turn_and_the_chat_goes_on(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "long")
    expect(replies(page).first.locator(".body")).to_contain_text("word3 ")
    screenshot(page, "stop_mid_stream-while_streaming")
    page.locator("#stop").click()
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "cancelled")
    expect(reply.locator(".tag")).to_have_text("Stopped")
    stopped_at = reply.locator(".body").inner_text()
    assert "word399" not in stopped_at
    page.wait_for_timeout(300)  # nothing more arrives for a stopped turn
    assert reply.locator(".body").inner_text() == stopped_at
    # The session is still usable and remembers the conversation.
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 2 things: long | recall")


def test_enter_sends_and_shift_enter_makes_a_new_line(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    box = page.locator("#input")
    box.press_sequentially("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    expect(page.locator(".message")).to_have_count(0)
    box.press("Enter")
    expect(page.locator(".message.user .text")).to_have_text("first line\nsecond line")
    expect(finished_reply(page).locator(".text")).to_have_text("first line\nsecond line")
    expect(box).to_have_value("")


def test_a_model_error_is_shown_inline_without_its_secrets(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "boom")
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "error")
    expect(reply.locator(".body")).to_have_text("Starting…")
    error = reply.locator('.inline-error[data-code="model_error"]')
    expect(error).to_contain_text("the model raised an error")
    assert "hunter2" not in page.content()
    say(page, "still here?")
    expect(finished_reply(page).locator(".body")).to_have_text("still here?")


def test_model_output_can_never_inject_html(page: Page, clients_server: ServerProcess) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "html")  # markup in plain text, bold, inline code, links and a code fence
    body = finished_reply(page).locator(".body")
    expect(body).to_contain_text('<img src=x onerror="window.injected = true">')
    expect(body).to_contain_text("<script>window.injected = true</script>")
    assert body.locator("img, script, b, [onerror]").count() == 0
    assert page.evaluate("window.injected") is None
    hrefs = [
        body.locator("a").nth(i).get_attribute("href") for i in range(body.locator("a").count())
    ]
    assert hrefs == ["https://x.test/"]  # javascript: and user@host links stay text
    expect(body).to_contain_text("http://trusted.test@evil.test/login")


def test_links_keep_balanced_parentheses_and_leave_trailing_punctuation(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "see https://en.wikipedia.org/wiki/Eliza_(program). (or https://example.test/a),")
    link = finished_reply(page).locator(".body a")
    expect(link).to_have_count(2)
    assert link.nth(0).get_attribute("href") == "https://en.wikipedia.org/wiki/Eliza_(program)"
    assert link.nth(1).get_attribute("href") == "https://example.test/a"
    assert link.nth(0).get_attribute("rel") == "noopener noreferrer nofollow"


def test_a_message_over_the_frame_limit_is_refused_and_the_chat_goes_on(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "x" * (1024 * 1024 + 10))  # the server's default --max-frame-size is 1 MiB
    error = page.locator('.inline-error[data-code="too_large"]')
    expect(error).to_contain_text("too large")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "recall")  # the refused message is not part of the conversation
    expect(finished_reply(page).locator(".body")).to_have_text("You said 1 things: recall")


def test_code_blocks_in_replies_are_shown_as_code(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "code")
    reply = finished_reply(page)
    block = reply.locator("figure.code-block")
    expect(block.locator("figcaption")).to_contain_text("python")
    expect(block.locator("pre code")).to_have_text('def greet(name):\n    return f"Hello, {name}!"')
    expect(reply.locator(".text code")).to_have_text('greet("Ada")')


def test_new_chat_starts_a_fresh_session(page: Page, clients_server: ServerProcess) -> None:
    open_chat(page, clients_server, "scripted")
    say(page, "remember me")
    finished_reply(page)
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 1 things: recall")


# ---------------------------------------------------------------------- parameters


def set_params(page: Page, text: str) -> None:
    """Type ``text`` in the Parameters box (opened if it is closed)."""
    box = page.locator("#params-input")
    if not box.is_visible():
        page.locator("#params summary").click()
    box.fill(text)


def test_parameters_typed_as_json_go_with_each_message(
    page: Page, clients_server: ServerProcess
) -> None:
    wire = Wire(page)
    open_chat(page, clients_server, "params_echo")
    expect(page.locator("#params-input")).to_be_hidden()  # out of the way until asked for
    set_params(page, '{"temperature": 0.2}')
    expect(page.locator("#params-state")).to_have_text("(temperature)")
    say(page, "hi")
    expect(finished_reply(page).locator(".body")).to_contain_text('"temperature": 0.2')
    say(page, "again")
    expect(finished_reply(page).locator(".body")).to_have_text('{"temperature": 0.2}')
    screenshot(page, "parameters-sent")
    sent = wire.sent("message")
    assert [frame.get("params") for frame in sent] == [{"temperature": 0.2}] * 2, str(wire)
    page.locator("#params summary").click()  # closed, they still go: the summary says so
    expect(page.locator("#params-input")).to_be_hidden()
    expect(page.locator("#params-state")).to_be_visible()
    set_params(page, "  ")
    expect(page.locator("#params-state")).to_have_text("")
    say(page, "without")
    expect(finished_reply(page).locator(".body")).to_have_text("{}")
    assert "params" not in wire.sent("message")[-1], str(wire)


@pytest.mark.parametrize(
    ("typed", "named"),
    [
        ("{temperature: 0.2}", "Parameters are not valid JSON: "),
        ('{"a": <b>bold</b>}', "Parameters are not valid JSON: "),
        ("[0.2]", 'must be a JSON object, like {"temperature": 0.2}, not an array'),
        ("0.2", "not a number"),
    ],
    ids=["unquoted_key", "markup", "array", "number"],
)
def test_invalid_parameters_are_named_inline_and_nothing_is_sent(
    page: Page, clients_server: ServerProcess, typed: str, named: str
) -> None:
    wire = Wire(page)
    open_chat(page, clients_server, "params_echo")
    set_params(page, typed)
    expect(page.locator("#params-state")).to_have_text("(invalid)")
    say(page, "hi")
    error = page.locator("#params-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(named)
    expect(error.locator("*")).to_have_count(0)  # the error is text, never markup
    screenshot(page, "parameters-invalid")
    expect(page.locator("#input")).to_have_value("hi")  # kept, to send once fixed
    expect(page.locator(".message")).to_have_count(0)
    assert wire.sent("message") == [] and wire.sent("messages") == [], str(wire)
    set_params(page, '{"temperature": 0.2}')  # fixing it clears the error
    expect(error).to_be_hidden()
    page.locator("#input").press("Enter")
    expect(finished_reply(page).locator(".body")).to_have_text('{"temperature": 0.2}')


# ---------------------------------------------------------------------- model events
def steps(reply: Locator) -> Locator:
    return reply.locator("details.step")


def step(reply: Locator, name: str) -> Locator:
    return steps(reply).filter(has=reply.page.locator(f'> summary:has-text("{name}")'))


def test_model_events_show_a_status_line_and_nested_collapsible_steps(
    page: Page, clients_server: ServerProcess
) -> None:
    open_chat(page, clients_server, "agent_events")
    set_params(page, '{"pause": 1.5}')  # the model waits in its "search" step
    say(page, "hello")
    reply = replies(page).first
    # While the turn runs: the status under the reply, the steps above it, "search" running.
    expect(reply.locator(".status-line")).to_have_text("thinking")
    search, fetch = step(reply, "search"), step(reply, "fetch")
    expect(search).to_have_attribute("data-status", "running")
    expect(fetch).to_have_attribute("data-status", "done")
    expect(reply).to_have_class(re.compile("streaming"))
    screenshot(page, "model_events-running")
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "stop")
    expect(reply.locator(".body")).to_have_text("Answer: hellodone")
    expect(reply.locator(".status-line")).to_have_text("thinking")  # kept after the turn
    expect(search).to_have_attribute("data-status", "done")
    expect(steps(reply)).to_have_count(2)
    # Nested by parent: "fetch" inside "search"; both collapsed until opened.
    expect(reply.locator(".activity > details.step")).to_have_count(1)
    expect(search.locator("details.step")).to_have_count(1)
    expect(search.locator("> summary")).to_have_text("✓search")
    expect(search.locator(".step-input pre").first).to_be_hidden()
    search.locator("> summary").click()
    expect(search.locator("> .step-detail > .step-input pre")).to_have_text('{\n  "q": "hello"\n}')
    expect(search.locator("> .step-detail > .step-output pre")).to_have_text("found 2")
    output = fetch.locator("> .step-detail > .step-output pre")
    expect(output).to_be_hidden()
    fetch.locator("> summary").click()
    expect(fetch.locator("> .step-detail > .step-input pre")).to_have_text(
        "https://example.invalid/x"
    )
    # What a model sends is text: its markup is shown, never made into elements.
    expect(output).to_have_text("<b>not bold</b>")
    assert reply.locator("b").count() == 0
    expect(reply.locator(".event-note")).to_have_text('custom {"value":1}')
    screenshot(page, "model_events-opened")
    search.locator("> summary").click()  # collapses it, and what is inside it
    expect(output).to_be_hidden()
    # A second turn gets its own steps.
    say(page, "again")
    second = finished_reply(page)
    expect(steps(second)).to_have_count(2)
    expect(steps(replies(page).first)).to_have_count(2)


def test_a_reload_mid_turn_shows_each_step_once_even_when_its_events_come_again(
    page: Page, clients_server: ServerProcess
) -> None:
    """The page is reloaded while "search" runs, and told to resume from seq 0, so that the
    server replays the events it already showed (and saved): each is shown once, and the
    step's end, arriving live, updates the item the page restored."""
    wire = Wire(page)
    open_chat(page, clients_server, "agent_events")
    set_params(page, '{"pause": 3}')
    say(page, "hello")
    reply = replies(page).first
    expect(step(reply, "fetch")).to_have_attribute("data-status", "done")
    expect(step(reply, "search")).to_have_attribute("data-status", "running")
    page.evaluate(
        """() => {
            const set = Storage.prototype.setItem;
            Storage.prototype.setItem = function (key, value) {
                if (key === "anything-agent.chat.agent_events") {
                    const state = JSON.parse(value);
                    state.resume.after = 0;
                    value = JSON.stringify(state);
                }
                return set.call(this, key, value);
            };
        }"""
    )
    page.reload()
    reply = finished_reply(page)
    [resumed] = wire.received("resumed")
    assert resumed["after"] == 0 and resumed["replayed"] >= 4, str(wire)
    expect(reply.locator(".body")).to_have_text("Answer: hellodone")
    expect(steps(reply)).to_have_count(2)
    expect(step(reply, "search")).to_have_attribute("data-status", "done")
    expect(step(reply, "search").locator("details.step")).to_have_count(1)
    expect(reply.locator(".status-line")).to_have_count(1)
    expect(reply.locator(".status-line")).to_have_text("thinking")
    expect(reply.locator(".event-note")).to_have_count(1)
    saved = json.loads(page.evaluate("sessionStorage.getItem('anything-agent.chat.agent_events')"))
    kept = [(item["type"], item["name"]) for item in saved["log"][1]["activity"]]
    assert kept == [("step", "search"), ("step", "fetch"), ("note", "custom")]
    # After the turn, a plain reload shows the same again, from what the page saved.
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    reply = finished_reply(page)
    expect(steps(reply)).to_have_count(2)
    expect(step(reply, "fetch")).to_have_attribute("data-status", "done")
    expect(reply.locator(".event-note")).to_have_count(1)
    expect(reply.locator(".status-line")).to_have_text("thinking")
    step(reply, "search").locator("> summary").click()
    step(reply, "fetch").locator("> summary").click()
    expect(step(reply, "fetch").locator(".step-output pre")).to_have_text("<b>not bold</b>")
    assert reply.locator("b").count() == 0


def test_a_turn_waiting_for_a_slot_says_so_until_it_runs(
    page: Page, start_server: Any, tmp_path: Path
) -> None:
    """agent_events with one turn at a time: a second tab's turn waits, "Queued" under its
    reply, until the first one's is over; then its own status replaces it."""
    models = tmp_path / "models"
    shutil.copytree(TEST_MODELS / "agent_events", models / "agent_events")
    (models / "agent_events" / "config.yaml").write_text("concurrency: {max_turns: 1}\n")
    server = start_server(models)
    other = page.context.new_page()
    open_chat(other, server, "agent_events")
    set_params(other, '{"pause": 2}')
    say(other, "first")
    expect(step(replies(other).first, "search")).to_have_attribute("data-status", "running")
    open_chat(page, server, "agent_events")
    say(page, "second")
    waiting = replies(page).first
    expect(waiting.locator(".status-line")).to_have_text("Queued (position 1)")
    expect(steps(waiting)).to_have_count(0)
    screenshot(page, "queued-waiting")
    reply = finished_reply(page)
    expect(reply.locator(".status-line")).to_have_text("thinking")
    expect(reply.locator(".body")).to_have_text("Answer: seconddone")
    expect(finished_reply(other).locator(".body")).to_have_text("Answer: firstdone")
    other.close()


# ---------------------------------------------------------------------- the connection
def test_the_page_recovers_after_a_server_restart_and_the_conversation_goes_on(
    page: Page, start_server: object, tmp_path: Path
) -> None:
    models = client_models(tmp_path / "models")
    first = start_server(models)  # type: ignore[operator]
    open_chat(page, first, "scripted")
    say(page, "before the restart")
    finished_reply(page)

    assert first.stop() == 0
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#connection-label")).to_contain_text("Reconnecting")
    expect(page.locator("#send")).to_be_disabled()
    screenshot(page, "server_restart-reconnecting")

    second = start_server(models, "--port", str(first.port))  # type: ignore[operator]
    assert second.port == first.port
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=20000)
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text(
        "You said 2 things: before the restart | recall"
    )
    assert second.stop() == 0


# ---------------------------------------------------------------------- resuming
COUNTED = "".join(f"<{number}>" for number in range(1, 41))  # the counter model's reply
SAVED_CHAT = "anything-agent.chat.counter"  # where the page keeps its chat, in sessionStorage
T = TypeVar("T")


def counter_models(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(BROWSER_MODELS / "counter", target / "counter")
    return target


@pytest.fixture(scope="module")
def resume_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the counter model (40 numbered chunks in 2 s) and the default resume
    window (30 s)."""
    models = counter_models(tmp_path_factory.mktemp("resume-models"))
    running = launch_server(models, tmp_path_factory.mktemp("resume-events"))
    yield running
    assert running.stop() == 0, running.log


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 for the page to reach a server through, in a thread of its
    own (asyncio streams): ``cut()`` drops every connection through it at once, as a network
    failure would (no close frame either way); while ``refusing``, it drops new ones as they
    come; while ``swallowing``, what the page sends is lost on the way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.swallowing = False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._links: set[tuple[asyncio.WriteTransport, asyncio.WriteTransport]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CuttableProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            self._cut()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> int:
        """Drop every connection now; how many there were."""

        async def cut() -> int:
            return self._cut()

        return self._call(cut())

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def _cut(self) -> int:
        links = list(self._links)
        self._links.clear()
        for near, far in links:
            near.abort()
            far.abort()
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            far_reader, far_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        link = (writer.transport, far_writer.transport)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pipe(reader, far_writer, upstream=True),
                self._pipe(far_reader, writer, upstream=False),
            )
        finally:
            self._links.discard(link)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and self.swallowing:
                    continue
                writer.write(data)
                await writer.drain()
            writer.close()
        except OSError:
            writer.transport.abort()


def assert_session_ended(server: ServerProcess, saved: dict[str, Any]) -> None:
    """The session a page saved can no longer be resumed."""
    token, after = saved["resume"]["token"], saved["resume"]["after"]
    time.sleep(0.2)  # the page's close reaches the server
    with ws_connect(
        server.chat_url("counter"),
        subprotocols=[Subprotocol("anything-agent.v1"), Subprotocol(f"resume.{token}.{after}")],
        open_timeout=10,
    ) as old:
        first = json.loads(old.recv(timeout=10))
    assert first["type"] == "error" and first["code"] == "resume_expired", first


def reply_text(page: Page, index: int = 0) -> str:
    return str(replies(page).nth(index).locator(".body").inner_text())


@pytest.fixture
def proxy_to() -> Iterator[Any]:
    """``proxy_to(server)``: a CuttableProxy in front of it, for this test. Ask for this
    (and ``start_server``) before ``page``, so that both still run when ``page`` takes its
    last screenshot."""
    opened: list[CuttableProxy] = []

    def start(server: ServerProcess) -> CuttableProxy:
        proxy = CuttableProxy(server.port).__enter__()
        opened.append(proxy)
        return proxy

    yield start
    for proxy in opened:
        proxy.__exit__()


def test_a_reload_mid_reply_resumes_it_with_nothing_repeated_or_missing(
    page: Page, resume_server: ServerProcess
) -> None:
    wire = Wire(page)
    open_chat(page, resume_server, "counter")
    say(page, "count")
    expect(replies(page).first.locator(".body")).to_contain_text("<8>")
    page.reload()
    # The conversation is back, and the reply goes on where it was: the resumed session
    # sends the frames the reload missed, then the rest as it comes.
    expect(page.locator(".message.user .body")).to_have_text("count")
    screenshot(page, "reload_mid_reply-reloaded")
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "stop")
    assert reply_text(page) == COUNTED
    expect(replies(page)).to_have_count(1)
    [resumed] = wire.received("resumed")
    # The page had shown chunks up to at least <8>, never the end (seq 41 is the done).
    assert resumed["turn"] == 1 and 8 <= resumed["after"] < 41, resumed
    assert wire.sent("messages") == []  # the session had the history: nothing resent

    # The session goes on; a reload after the reply shows the whole conversation again.
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 2 things: count | recall")
    page.reload()
    expect(page.locator(".message")).to_have_count(4)
    expect(replies(page).first.locator(".body")).to_have_text(COUNTED)
    expect(replies(page).last).to_have_attribute("data-reason", "stop")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")

    # New chat ends the session on the server (a close with 1000) and forgets it here.
    saved = json.loads(page.evaluate(f"sessionStorage.getItem('{SAVED_CHAT}')"))
    page.locator("#new-chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    fresh = json.loads(page.evaluate(f"sessionStorage.getItem('{SAVED_CHAT}')"))
    assert fresh["log"] == [] and fresh["history"] == []
    assert fresh["resume"]["token"] != saved["resume"]["token"]
    assert_session_ended(resume_server, saved)
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator(".message")).to_have_count(0)


def test_a_connection_cut_mid_reply_resumes_it_with_nothing_repeated_or_missing(
    proxy_to: Any, page: Page, resume_server: ServerProcess
) -> None:
    proxy = proxy_to(resume_server)
    wire = Wire(page)
    page.goto(f"{proxy.url}/#counter")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "count")
    expect(replies(page).first.locator(".body")).to_contain_text("<8>")
    assert proxy.cut() >= 1
    assert "<40>" not in reply_text(page)
    screenshot(page, "connection_cut-mid_reply")
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "stop")
    assert reply_text(page) == COUNTED
    [resumed] = wire.received("resumed")
    assert 8 <= resumed["after"] < 41, resumed
    seqs = [f["seq"] for f in wire.received("chunk")]
    assert len(set(seqs)) == 40  # each chunk reached the page, and the page kept each once

    # Stop pressed while the connection is down reaches the server once it is back.
    say(page, "count 400")  # 20 s
    expect(replies(page).last.locator(".body")).to_contain_text("<3>")
    proxy.refusing = True
    assert proxy.cut() >= 1
    page.locator("#stop").click()
    expect(page.locator("#stop-label")).to_have_text("Stopping…")
    proxy.refusing = False
    stopped = finished_reply(page)
    expect(stopped).to_have_attribute("data-reason", "cancelled")
    expect(stopped.locator(".tag")).to_have_text("Stopped")
    partial = reply_text(page, 1)
    assert partial.startswith("<1><2><3>") and "<400>" not in partial, partial
    assert partial == "".join(f"<{n}>" for n in range(1, partial.count("<") + 1))

    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text(
        "You said 3 things: count | count 400 | recall"
    )
    assert wire.sent("messages") == []

    # New chat while the connection is down still ends the session on the server.
    saved = json.loads(page.evaluate(f"sessionStorage.getItem('{SAVED_CHAT}')"))
    assert proxy.cut() >= 1
    page.locator("#new-chat").click()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(page.locator(".message")).to_have_count(0)
    assert_session_ended(resume_server, saved)


def test_a_message_lost_with_the_connection_is_given_back_to_send_again(
    proxy_to: Any, page: Page, resume_server: ServerProcess
) -> None:
    proxy = proxy_to(resume_server)
    wire = Wire(page)
    page.goto(f"{proxy.url}/#counter")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "first")
    finished_reply(page)
    proxy.swallowing = True  # the next message never reaches the server
    say(page, "second")
    expect(replies(page).last).to_have_class(re.compile("streaming"))
    proxy.swallowing = False
    assert proxy.cut() >= 1
    # The resumed session ran no turn after the first: the message is given back.
    lost = finished_reply(page)
    expect(lost).to_have_attribute("data-reason", "refused")
    expect(lost.locator('.inline-error[data-code="not_delivered"]')).to_contain_text("Send it")
    expect(page.locator("#input")).to_have_value("second")
    [resumed] = wire.received("resumed")
    assert resumed["turn"] == 1 and resumed["running"] is False, resumed
    screenshot(page, "message_lost-given_back")
    page.locator("#input").press("Enter")
    expect(finished_reply(page).locator(".body")).to_have_text("second")
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text(
        "You said 3 things: first | second | recall"
    )


def test_after_the_resume_window_the_chat_goes_on_in_a_new_session(
    start_server: Any, proxy_to: Any, page: Page, tmp_path: Path
) -> None:
    server = start_server(counter_models(tmp_path / "models"), "--resume-window", "1")
    proxy = proxy_to(server)
    wire = Wire(page)
    page.goto(f"{proxy.url}/#counter")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "count")
    expect(replies(page).first.locator(".body")).to_contain_text("<5>")
    proxy.refusing = True  # no way back until the session's window is over
    assert proxy.cut() >= 1
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    page.wait_for_timeout(2500)
    proxy.refusing = False
    # The resume fails (resume_expired), a new session starts: the reply stays as far as it
    # came, and the next message sends the whole conversation to the new session.
    reply = finished_reply(page)
    expect(reply).to_have_attribute("data-reason", "lost")
    expect(reply.locator(".tag")).to_have_text("Interrupted: the connection was lost")
    partial = reply_text(page)
    assert partial and COUNTED.startswith(partial) and partial != COUNTED
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    assert [f["code"] for f in wire.received("error")] == ["resume_expired"]
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 2 things: count | recall")
    [resent] = wire.sent("messages")
    assert resent["messages"] == [
        {"role": "user", "content": "count"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "recall"},
    ]


def test_a_tab_opened_from_this_one_takes_its_session_over_and_both_chats_go_on(
    page: Page, resume_server: ServerProcess
) -> None:
    wire = Wire(page)
    open_chat(page, resume_server, "counter")
    say(page, "first")
    finished_reply(page)
    opened_wire: list[Wire] = []
    page.context.on("page", lambda opened: opened_wire.append(Wire(opened)))
    # A tab opened from this one starts with a copy of its sessionStorage: the same chat,
    # and the same resume token. It resumes the session, which closes this tab's connection
    # (4001); this tab goes on in a new session rather than take the session back.
    with page.context.expect_page() as opening:
        page.evaluate("window.open(location.href)")
    other = opening.value
    errors: list[str] = []
    other.on("pageerror", lambda error: errors.append(str(error)))
    expect(other.locator(".message")).to_have_count(2)
    expect(other.locator("#connection")).to_have_attribute("data-state", "connected")
    say(other, "recall")
    expect(finished_reply(other).locator(".body")).to_have_text("You said 2 things: first | recall")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "recall")
    expect(finished_reply(page).locator(".body")).to_have_text("You said 2 things: first | recall")
    assert len(opened_wire[0].received("resumed")) == 1
    assert opened_wire[0].sent("messages") == []
    assert len(wire.received("ready")) == 2  # this tab's first session, then its new one
    assert len(wire.sent("messages")) == 1  # which got the conversation with the next message
    page.wait_for_timeout(1000)  # and neither takes the other's session (back) meanwhile
    assert len(wire.sockets) == 2 and len(opened_wire[0].sockets) == 1
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    expect(other.locator("#connection")).to_have_attribute("data-state", "connected")
    screenshot(other, "opened_tab-took_the_session_over")
    other.close()
    assert not errors, errors


# ---------------------------------------------------------------------- API keys
def test_the_page_asks_for_the_key_a_server_requires_and_then_chats(
    page: Page, start_server: object, tmp_path: Path
) -> None:
    models = client_models(tmp_path / "models")
    guarded = start_server(models, env={"ANYTHING_AGENT_API_KEYS": "page-key-5d2f"})  # type: ignore[operator]
    page.goto(f"{guarded.http_url}/#echo")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-error")).to_be_hidden()
    page.locator("#key-input").fill("not-the-key")
    page.locator("#key-input").press("Enter")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-error")).to_be_visible()  # that key was refused
    screenshot(page, "api_key-refused")
    page.locator("#key-input").fill("page-key-5d2f")
    page.locator("#key-input").press("Enter")
    expect(dialog).to_be_hidden()
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")
    say(page, "hello with a key")
    expect(finished_reply(page).locator(".body")).to_have_text("hello with a key")
    assert "page-key-5d2f" not in guarded.log
    assert page.evaluate("location.href").find("page-key") == -1  # never in a URL
