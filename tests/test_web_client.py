"""The browser chat page at /, driven in Debian's Chromium through Playwright.

Each test leaves a screenshot of where it ended in test-output/screenshots/.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import (
    CHROMIUM_PROBLEM,
    OUTPUT_DIR,
    SHIPPED_MODELS,
    ServerProcess,
    client_models,
    http,
)
from playwright.sync_api import Browser, Page, expect, sync_playwright
from system_packages import CHROMIUM

pytestmark = pytest.mark.browser

# Chromium as root in a container, on a machine with no way out: no sandbox (Playwright
# adds --no-sandbox), no GPU, no background calls home.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = OUTPUT_DIR / "screenshots"


@pytest.fixture(scope="module")
def browser(pytestconfig: pytest.Config) -> Iterator[Browser]:
    problem = pytestconfig.stash.get(CHROMIUM_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"the browser tests need Chromium: {problem}", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser profile per test; fails the test on any JavaScript error or any
    request that leaves this machine (the page must work with no internet), and saves a
    screenshot of how the test left the page."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on(
        "request",
        lambda sent: urlsplit(sent.url).hostname == "127.0.0.1" or elsewhere.append(sent.url),
    )
    yield opened
    SHOTS.mkdir(parents=True, exist_ok=True)
    opened.screenshot(path=str(SHOTS / f"{request.node.name}.png"))
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not elsewhere, f"the page reached beyond this machine: {elsewhere}"


def screenshot(page: Page, name: str) -> None:
    """Keep a picture of a moment inside a scenario (the end is kept by the fixture)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def open_chat(page: Page, server: ServerProcess, model: str) -> None:
    """Open the page on ``model`` and wait until its session is ready."""
    page.goto(f"{server.http_url}/#{model}")
    expect(page.locator("#model-name")).to_have_text(model)
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected")


def say(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def replies(page: Page):  # type: ignore[no-untyped-def]
    return page.locator(".message.assistant")


def finished_reply(page: Page, index: int = -1):  # type: ignore[no-untyped-def]
    """The reply at ``index`` once its turn is over."""
    reply = replies(page).nth(index)
    expect(reply).to_have_attribute("data-reason", re.compile(".+"), timeout=15000)
    return reply


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
    # The first ready model is picked and connected.
    expect(page.locator("#model-name")).to_have_text("echo")
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
    expect(page.locator("#model-name")).to_have_text("echo")
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
