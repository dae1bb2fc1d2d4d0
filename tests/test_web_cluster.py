"""The browser chat page through nginx in front of several nodes (design.md, *Resuming*
and *Several nodes*; README, *Several nodes (Redis, nginx)*): the chat survives the loss
of the node streaming its reply, and a rolling restart of every node.

Real processes only: Debian's Chromium (Playwright), redis-server and nginx, and three
``anything-agent serve`` nodes started by ``LocalCluster``. Each test leaves a screenshot
of where it ended (and of moments inside it) in test-output/screenshots/.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from browser_support import Wire, finished_reply, replies, screenshot
from conftest import CLUSTER_PROBLEM, RESUME_MODELS, copy_models
from playwright.sync_api import Locator, Page, WebSocket, expect

from ws_server.deploy.local_cluster import ClusterNode, LocalCluster

pytestmark = [pytest.mark.browser, pytest.mark.cluster, pytest.mark.usefixtures("every_node_up")]

NODE_TTL = 1.0
GRACE = 5  # a drained node's running turn has this long to finish
TURN_MS = 15000  # the longest a reply may take to end in these tests (kill, resume, take over)


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """Three nodes over ``numbers``, nginx round-robin in front, one Redis."""
    problem = pytestconfig.stash.get(CLUSTER_PROBLEM, None)
    if problem is not None:
        pytest.fail(f"these tests need Redis and nginx: {problem}", pytrace=False)
    models = copy_models(
        tmp_path_factory.mktemp("web-cluster-models"), "numbers", source=RESUME_MODELS
    )
    with LocalCluster(
        3,
        models_dir=models,
        node_ttl=NODE_TTL,
        resume_window=10,
        extra_args=["--no-limits", "--grace-period", str(GRACE)],
    ) as running:
        yield running


# ---------------------------------------------------------------------- helpers
def wait_until(page: Page, condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` (Playwright's events are taken in while the page waits)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(50)
    return True


def settle(page: Page, wire: Wire, socket: WebSocket, sessions: int) -> None:
    """After a node has exited: if the page's connection went through it (it was closed
    with 1001 before the node exited), wait until the page is back, on a new connection
    that resumed its session (or failed to), so that the next message is not sent into the
    closing one."""
    if wait_until(page, socket.is_closed, 1.0):
        wait_until(page, lambda: wire.sessions > sessions, TURN_MS / 1000)
    connected(page)


def connected(page: Page, timeout: float = TURN_MS) -> None:
    expect(page.locator("#connection")).to_have_attribute(
        "data-state", "connected", timeout=timeout
    )


def say(page: Page, text: str) -> None:
    """Send a message, as a person would: only once the page is connected."""
    connected(page)
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")
    expect(page.locator(".message.user").last.locator(".body")).to_have_text(text)


def counted(reply: Locator) -> list[int]:
    return [int(word) for word in reply.locator(".body").inner_text().split()]


def streams(cluster: LocalCluster, session_id: str, timeout: float = 5.0) -> ClusterNode:
    """The node holding the session's model instance: the last to log that it opened the
    session or took it over (the node a client reaches while the holder lives only relays).
    A node's log lines reach this process a moment after its frames reach the page."""
    pattern = re.compile(rf"^(\S+ \S+) .*session={re.escape(session_id)} (opened from|taken over)")
    deadline = time.monotonic() + timeout
    while True:
        latest: tuple[str, int, ClusterNode] | None = None
        for node in cluster.nodes:
            for number, line in enumerate(list(node.log_lines)):
                match = pattern.search(line)
                if match and (latest is None or (match.group(1), number) > latest[:2]):
                    latest = (match.group(1), number, node)
        if latest is not None:
            return latest[2]
        assert time.monotonic() < deadline, f"no node logged session {session_id}"
        time.sleep(0.02)


def logs(cluster: LocalCluster, last: int = 40) -> str:
    return "\n".join(
        f"[{node.node_id}] {line}" for node in cluster.nodes for line in node.log_lines[-last:]
    )


@contextmanager
def diagnosed(wire: Wire, cluster: LocalCluster) -> Iterator[None]:
    """A failure inside says what the page got on the wire and what the nodes logged."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n\npage frames:\n{wire}\n\nnode logs:\n{logs(cluster)}"
        ) from exc


# ---------------------------------------------------------------------- the tests
def test_killing_the_node_streaming_a_reply_shows_interrupted_and_the_chat_goes_on(
    page: Page, cluster: LocalCluster
) -> None:
    wire = Wire(page)
    with diagnosed(wire, cluster):
        page.goto(f"{cluster.url}/#numbers")
        expect(page.locator("#model-name")).to_have_text("numbers")
        say(page, "before")
        expect(finished_reply(page).locator(".body")).to_have_text("before")
        holder = streams(cluster, wire.session_id)

        say(page, "count 1000 0.02")  # 20 s: it is still streaming when its node dies
        reply = replies(page).last
        expect(reply.locator(".body")).to_contain_text("1 2 3 4 5 6")
        screenshot(page, "cluster_kill-streaming")
        holder.kill()
        killed = time.monotonic()

        # The page resumes through nginx on another node, which takes the session over:
        # the reply ends with a clear "interrupted" (not resent, not left spinning) ...
        finished_reply(page)
        took = time.monotonic() - killed
        expect(reply).to_have_attribute("data-reason", "error")
        notice = reply.locator(".inline-error")
        expect(notice).to_have_count(1)
        expect(notice).to_have_attribute("data-code", "interrupted")
        expect(notice).to_contain_text("reply is incomplete")
        expect(reply.locator(".tag")).to_have_count(0)  # not "the connection was lost"
        screenshot(page, "cluster_kill-interrupted")
        numbers = counted(reply)  # as far as it got, none lost, none twice
        assert 6 <= len(numbers) < 1000 and numbers == list(range(1, len(numbers) + 1))
        assert [e["code"] for e in wire.received("error")] == ["interrupted"]
        done = wire.received("done")[-1]
        assert (done["turn"], done["reason"]) == (2, "error")
        assert len(wire.received("resumed")) >= 1
        assert len(wire.received("ready")) == 1  # the same session all along
        assert took < NODE_TTL + 5, f"interrupted {took:.1f} s after the kill"

        # ... and the chat goes on, on another node, with the whole conversation: the page
        # did not have to send it again (no "messages" frame), the session had it.
        say(page, "recall")
        last = finished_reply(page)
        expect(last).to_have_attribute("data-reason", "stop")
        expect(last.locator(".body")).to_have_text(
            "You said 3 things: before | count 1000 0.02 | recall"
        )
        assert wire.sent("messages") == []
        assert wait_until(page, lambda: streams(cluster, wire.session_id) is not holder, 5)
        expect(page.locator(".inline-error")).to_have_count(1)  # the interrupted reply's


def test_a_rolling_restart_of_every_node_keeps_the_page_chatting(
    page: Page, cluster: LocalCluster
) -> None:
    wire = Wire(page)
    with diagnosed(wire, cluster):
        page.goto(f"{cluster.url}/#numbers")
        expect(page.locator("#model-name")).to_have_text("numbers")
        say(page, "hello")
        expect(finished_reply(page).locator(".body")).to_have_text("hello")
        said = ["hello"]
        # Every node in turn, the one holding the session first: its reply is running when
        # its SIGTERM comes, and finishes within the grace period.
        first = streams(cluster, wire.session_id)
        order = [first, *(node for node in cluster.nodes if node is not first)]
        for step, node in enumerate(order):
            say(page, "count 20 0.05")  # 1 s
            said.append("count 20 0.05")
            reply = replies(page).last
            expect(reply.locator(".body")).to_contain_text("1 2 3")
            socket, sessions = wire.sockets[-1][0], wire.sessions
            node.terminate()  # SIGTERM, and wait until it has exited
            assert node.process.returncode == 0, f"step {step}: {node.node_id} stopped"
            reply = finished_reply(page)
            expect(reply).to_have_attribute("data-reason", "stop")
            assert counted(reply) == list(range(1, 21))
            # While the node is down, the chat goes on through the others.
            settle(page, wire, socket, sessions)
            if step == 0:  # the session moved off the node that held it
                assert wait_until(page, lambda: streams(cluster, wire.session_id) is not first, 5)
                screenshot(page, "cluster_rolling-first_node_stopped")
            message = f"while {node.node_id} is down"
            say(page, message)
            said.append(message)
            expect(finished_reply(page).locator(".body")).to_have_text(message)
            node.restart()

        # After the rolling restart, the conversation is whole, and still the same session.
        say(page, "recall")
        said.append("recall")
        last = finished_reply(page)
        expect(last.locator(".body")).to_have_text(
            f"You said {len(said)} things: " + " | ".join(said)
        )
        expect(last).to_have_attribute("data-reason", "stop")
        expect(page.locator(".inline-error, .notice, .tag")).to_have_count(0)
        expect(replies(page)).to_have_count(len(said))
        assert wire.received("error") == []
        assert len(wire.received("ready")) == 1  # never a new session
        assert len(wire.received("resumed")) >= 1  # the first node's drain moved it
        assert wire.sent("messages") == []  # never resent the history
        assert all(node.running for node in cluster.nodes)
