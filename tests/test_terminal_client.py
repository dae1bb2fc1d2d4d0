"""``anything-agent chat``: one message with -m, raw frames with --json, one message per
line from a pipe, and the interactive prompt on a real pseudo-terminal with Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, launch_server

# The resume tests' helpers: the numbers model and a TCP proxy whose connections a test cuts.
from test_client import TcpProxy, numbers, resume_models

from ws_server import protocol
from ws_server.cli import param_entry
from ws_server.client.terminal import EventLines

CLI = Path(sys.executable).parent / "anything-agent"


def chat_cli(server: ServerProcess, *args: str, stdin: str | None = None) -> Any:
    return subprocess.run(
        [str(CLI), "chat", *args, "--url", server.ws_url],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def test_m_prints_the_reply_and_exits_0(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "echo", "-m", "hello there")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hello there\n", "")


def test_m_exits_1_and_names_the_error_when_the_turn_fails(
    clients_server: ServerProcess,
) -> None:
    result = chat_cli(clients_server, "scripted", "-m", "boom")
    assert result.returncode == 1
    assert result.stdout == "Starting… \n"  # what arrived before the error
    assert "error: model_error: the model raised an error" in result.stderr
    assert "hunter2" not in result.stderr


def test_an_unknown_model_exits_1_with_the_servers_reason(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "nobody", "-m", "hi")
    assert result.returncode == 1
    assert "no model named 'nobody'" in result.stderr and "HTTP 404" in result.stderr


def test_no_server_exits_1_saying_it_cannot_connect(unused_tcp_port: int) -> None:
    result = subprocess.run(
        [str(CLI), "chat", "echo", "-m", "hi", "--url", f"ws://127.0.0.1:{unused_tcp_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"cannot connect to ws://127.0.0.1:{unused_tcp_port}/v1/chat/echo" in result.stderr


def test_json_prints_every_frame_as_received(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "echo", "--json", "-m", "a b")
    assert result.returncode == 0, result.stderr
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["type"] for f in frames] == ["ready", "chunk", "chunk", "done"]
    assert frames[0]["model"] == "echo"
    assert [f["content"] for f in frames[1:3]] == ["a", " b"]
    assert [f["seq"] for f in frames[1:]] == [1, 2, 3]
    assert frames[3] == {"type": "done", "seq": 3, "turn": 1, "reason": "stop"}


def test_a_pipe_sends_one_message_per_line_in_one_session(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "scripted", stdin="first\nsecond\nrecall\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "first",
        "second",
        "You said 3 things: first | second | recall",
    ]


def test_a_pipe_skips_blank_lines_and_takes_crlf_line_ends(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "scripted", "--json", stdin="a\r\n\n  \nrecall\r\n")
    assert result.returncode == 0, result.stderr
    chunks = [f["content"] for f in map(json.loads, result.stdout.splitlines()) if "content" in f]
    assert chunks == ["a", "You said 2 things: a | recall"]


# ---------------------------------------------------------------------- model events
AGENT_EVENT_LINES = [
    "… thinking",
    '▸ search: {"q":"hello"}',
    "  ▸ fetch: https://example.invalid/x",
    "  ✓ fetch → <b>not bold</b>",
    "✓ search → found 2",
    'custom: {"value":1}',
]


def test_events_go_to_stderr_one_line_each_and_stdout_keeps_the_reply(
    clients_server: ServerProcess,
) -> None:
    result = chat_cli(clients_server, "agent_events", "-m", "hello")
    assert (result.returncode, result.stdout) == (0, "Answer: hellodone\n")
    assert result.stderr.splitlines() == AGENT_EVENT_LINES  # not a terminal: no colours


def test_json_prints_event_frames_in_order_with_the_chunks(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "agent_events", "--json", "-m", "hello")
    assert (result.returncode, result.stderr) == (0, "")
    frames = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = ["ready", *["event"] * 5, "chunk", "chunk", "event", "chunk", "done"]
    assert [f["type"] for f in frames] == kinds
    assert [f["seq"] for f in frames[1:]] == list(range(1, 11))
    assert frames[1] == {
        "type": "event",
        "seq": 1,
        "turn": 1,
        "name": "status",
        "data": {"text": "thinking"},
    }
    assert frames[4]["data"]["output"] == "<b>not bold</b>"
    assert (frames[8]["name"], frames[8]["data"]) == ("custom", {"value": 1})


def test_events_are_dimmed_when_stderr_is_a_terminal(clients_server: ServerProcess) -> None:
    """stderr a terminal, stdout a pipe: the event lines are dim, the reply stays plain."""
    controller, terminal = pty.openpty()
    env = {key: value for key, value in os.environ.items() if key != "NO_COLOR"}
    try:
        result = subprocess.run(
            [str(CLI), "chat", "agent_events", "-m", "x" * 300, "--url", clients_server.ws_url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
            timeout=60,
            env=env,
        )
        os.close(terminal)
        shown = b""
        while select.select([controller], [], [], 0.5)[0]:
            try:
                shown += os.read(controller, 65536)
            except OSError:
                break
    finally:
        os.close(controller)
    assert (result.returncode, result.stdout) == (0, f"Answer: {'x' * 300}done\n")
    lines = shown.decode().splitlines()
    assert lines[0] == "\x1b[2m… thinking\x1b[0m"
    assert all(line.startswith("\x1b[2m") and line.endswith("\x1b[0m") for line in lines), lines
    # a long input is cut to about 120 characters
    assert lines[1] == "\x1b[2m▸ search: " + '{"q":"' + "x" * 113 + "…\x1b[0m"


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("status", {"text": "reading\nthe \x1b[2Jdocs"}, "… reading the docs"),
        ("queued", {"position": 3}, "queued (position 3)"),
        ("usage", {"tokens": 12, "cost": None}, 'usage: {"tokens":12,"cost":null}'),
        ("note", {"text": "é" * 200}, 'note: {"text":"' + "é" * 110 + "…"),
    ],
    ids=["status_escapes", "queued", "custom", "long_custom"],
)
def test_an_event_is_one_safe_line(name: str, data: dict[str, Any], line: str) -> None:
    assert EventLines().line(protocol.Event(1, name, data)) == line


def test_steps_are_indented_by_depth_and_say_how_they_ended() -> None:
    lines = EventLines()

    def step(step_id: str, parent: str | None, status: str, output: Any = None) -> str:
        data = {"id": step_id, "parent_id": parent, "name": step_id, "status": status}
        return lines.line(protocol.Event(1, "step", {**data, "input": None, "output": output}))

    assert step("plan", None, "running") == "▸ plan"
    assert step("tool", "plan", "running") == "  ▸ tool"
    assert step("deeper", "tool", "running") == "    ▸ deeper"
    assert step("deeper", "tool", "error") == "    ✗ deeper"
    assert step("tool", "plan", "done", {"rows": 2}) == '  ✓ tool → {"rows":2}'
    assert step("plan", None, "error", "gave up") == "✗ plan → gave up"


# ---------------------------------------------------------------------- --param


def test_param_values_reach_the_model_parsed_as_json(clients_server: ServerProcess) -> None:
    result = chat_cli(
        clients_server,
        "params_echo",
        "--param",
        "temperature=0.5",
        "--param",
        "style=terse",
        "-m",
        "hi",
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == '{"style": "terse", "temperature": 0.5}\n'


def test_params_go_with_every_message_of_the_run(clients_server: ServerProcess) -> None:
    result = chat_cli(
        clients_server,
        "params_echo",
        "--param",
        'stop=["x", "y"]',
        "--param",
        "n=1",
        "--param",
        "n=2",  # the last one given wins
        stdin="first\nsecond\n",
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"n": 2, "stop": ["x", "y"]},
        {"n": 2, "stop": ["x", "y"]},
    ]


def test_without_param_the_model_sees_empty_params(clients_server: ServerProcess) -> None:
    result = chat_cli(clients_server, "params_echo", "-m", "hi")
    assert (result.returncode, result.stdout) == (0, "{}\n")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("temperature=0.2", ("temperature", 0.2)),
        ('stop=["x"]', ("stop", ["x"])),
        ("style=terse", ("style", "terse")),
        ("greeting=hello world", ("greeting", "hello world")),
        ('quoted="0.2"', ("quoted", "0.2")),
        ("on=true", ("on", True)),
        ("none=null", ("none", None)),
        ('options={"n": 2}', ("options", {"n": 2})),
        ("empty=", ("empty", "")),
        ("formula=a=b", ("formula", "a=b")),
        ("nan=NaN", ("nan", "NaN")),  # not JSON: a string, never a float NaN
    ],
)
def test_a_param_value_is_json_when_it_parses_and_a_string_otherwise(
    entry: str, expected: tuple[str, Any]
) -> None:
    assert param_entry(entry) == expected


@pytest.mark.parametrize("entry", ["style", "=0.5", ""])
def test_a_malformed_param_is_a_usage_error_naming_it(
    clients_server: ServerProcess, entry: str
) -> None:
    result = chat_cli(
        clients_server, "params_echo", "--param", "ok=1", "--param", entry, "-m", "hi"
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: anything-agent chat" in result.stderr
    assert "argument --param: " in result.stderr and repr(entry) in result.stderr


def ignore_sigint() -> None:
    """In a child before it runs the CLI: start it with SIGINT ignored, as ``cmd &`` in a
    script, nohup-style launchers and some CI runners do (SIG_IGN survives ``exec``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sigint", ["inherited", "ignored"])
def test_ctrl_c_during_m_stops_the_reply_and_exits_130(
    clients_server: ServerProcess, sigint: str
) -> None:
    process = subprocess.Popen(
        [str(CLI), "chat", "scripted", "-m", "long", "--url", clients_server.ws_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ignore_sigint if sigint == "ignored" else None,
    )
    assert process.stdout is not None
    try:
        assert process.stdout.read(6) == "word1 "  # the reply is streaming
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:  # Ctrl-C did not stop it: the test fails, nothing stays
            process.kill()
            process.communicate()
    assert process.returncode == 130
    assert "word399" not in out
    assert "[stopped]" in err


# ---------------------------------------------------------------------- interactive
class Terminal:
    """``anything-agent chat`` on a pseudo-terminal, as a person at a keyboard runs it."""

    def __init__(self, *argv: str, sigint: str = "inherited") -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the terminal is its controlling tty
            if sigint == "ignored":
                ignore_sigint()
            env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
            os.execve(str(CLI), [str(CLI), *argv], env)
        self.pid, self.fd = pid, fd
        self.screen = ""
        self.cursor = 0  # where the last awaited text ended

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def interrupt_at_prompt(self) -> None:
        """Ctrl-C once the prompt is really reading: CPython's readline misses a signal
        that lands between printing the prompt and waiting for input (a person is never
        that fast)."""
        time.sleep(0.3)
        self.type("\x03")

    def wait_for(self, text: str, timeout: float = 10) -> None:
        """Read the screen until ``text`` appears after the previously awaited text."""
        deadline = time.monotonic() + timeout
        while text not in self.screen[self.cursor :]:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(remaining, 0))
            if not ready:
                raise AssertionError(f"{text!r} never appeared on the terminal:\n{self.screen}")
            try:
                self.screen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the program exited
                raise AssertionError(f"exited before {text!r}:\n{self.screen}") from None
        self.cursor = self.screen.index(text, self.cursor) + len(text)

    def exit_code(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:
                if select.select([self.fd], [], [], 0.05)[0]:
                    self.screen += os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # the terminal closed with the program
                time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running:\n{self.screen}")


@pytest.mark.parametrize("sigint", ["inherited", "ignored"])
def test_the_prompt_streams_replies_keeps_history_and_ctrl_c_stops_then_quits(
    clients_server: ServerProcess, sigint: str
) -> None:
    """``ignored``: started with SIGINT ignored, Ctrl-C works all the same."""
    term = Terminal("chat", "scripted", "--url", clients_server.ws_url, sigint=sigint)
    term.wait_for("Ctrl-C stops a reply")
    term.wait_for("> ")
    term.type("long\r")
    term.wait_for("word3 ")
    term.type("\x03")  # Ctrl-C: stops the reply, the session goes on
    term.wait_for("[stopped]")
    term.wait_for("> ")
    term.type("recall\r")
    term.wait_for("You said 2 things: long | recall")
    term.wait_for("> ")
    term.interrupt_at_prompt()  # Ctrl-C at the prompt quits
    assert term.exit_code() == 130
    assert "word399" not in term.screen


def test_a_second_ctrl_c_quits_while_the_model_is_still_cleaning_up(
    clients_server: ServerProcess,
) -> None:
    term = Terminal("chat", "scripted", "--url", clients_server.ws_url)
    term.wait_for("> ")
    term.type("stubborn\r")
    term.wait_for("holding on")
    term.type("\x03")  # the model's cleanup takes 5 s after this
    term.wait_for("stopping…")
    started = time.monotonic()
    term.type("\x03")
    assert term.exit_code() == 130
    assert time.monotonic() - started < 3
    assert "[stopped]" not in term.screen


def test_model_output_cannot_drive_the_terminal(clients_server: ServerProcess) -> None:
    term = Terminal("chat", "scripted", "--url", clients_server.ws_url)
    term.wait_for("> ")
    term.type("escapes\r")
    term.wait_for("title cleared bell done")  # the text, without its escape sequences
    assert "\x1b]0;" not in term.screen and "\x1b[2J" not in term.screen
    assert "\x07" not in term.screen
    term.wait_for("> ")  # keys typed before the prompt is up may be read differently
    term.type("\x04")
    assert term.exit_code() == 0


def test_at_the_prompt_events_show_on_their_own_lines_around_the_reply(
    clients_server: ServerProcess,
) -> None:
    term = Terminal("chat", "agent_events", "--url", clients_server.ws_url)
    term.wait_for("> ")
    term.type("hello\r")
    term.wait_for("… thinking\r\n")
    term.wait_for("  ✓ fetch → <b>not bold</b>\r\n✓ search → found 2\r\n")
    # the custom event comes mid-line: it goes below the reply's line, which then goes on
    term.wait_for('Answer: hello\r\ncustom: {"value":1}\r\ndone\r\n')
    term.wait_for("> ")
    term.type("\x04")
    assert term.exit_code() == 0


def test_ctrl_d_at_the_prompt_quits_with_0(clients_server: ServerProcess) -> None:
    term = Terminal("chat", "scripted", "--url", clients_server.ws_url)
    term.wait_for("> ")
    term.type("recall\r")
    term.wait_for("You said 1 things: recall")
    term.wait_for("> ")
    term.type("\x04")
    assert term.exit_code() == 0


# ---------------------------------------------------------------------- resuming
@pytest.fixture(scope="module")
def resume_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The numbers model, with a resume window of 1 s: a resume that cannot happen is
    given up on quickly."""
    models = resume_models(tmp_path_factory.mktemp("terminal-resume-models"))
    events = tmp_path_factory.mktemp("terminal-resume-events")
    running = launch_server(models, events, "--resume-window", "1")
    yield running
    assert running.stop() == 0, running.log


@pytest.fixture
def proxy(resume_server: ServerProcess) -> Iterator[TcpProxy]:
    """The network between the terminal client and the server, to be cut."""
    running = TcpProxy(resume_server.port)
    yield running
    running.close()


def chat_through(proxy: TcpProxy, *args: str, piped: bool = False) -> Any:
    """``anything-agent chat numbers`` through ``proxy``, its output piped (and its input,
    if ``piped``)."""
    return subprocess.Popen(
        [str(CLI), "chat", "numbers", *args, "--url", proxy.ws_url],
        stdin=subprocess.PIPE if piped else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: Any, timeout: float = 20) -> tuple[str, str]:
    """Wait for the chat to exit (killed if it does not): the rest of its output. Read
    through the same text streams as the test's earlier reads (``communicate`` would
    skip what they had buffered)."""
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        if process.stdin is not None:
            process.stdin.close()
        out, err = process.stdout.read(), process.stderr.read()
        process.wait()
    finally:
        watchdog.cancel()
    return out, err


def test_a_dropped_connection_is_resumed_mid_reply_with_a_notice(proxy: TcpProxy) -> None:
    process = chat_through(proxy, "-m", "count 60 0.02")
    try:
        start = process.stdout.read(4)
        assert start == "1 2 "  # the reply is streaming
        proxy.cut()
        middle = process.stdout.read(40)  # it goes on...
        proxy.cut()  # ...and is cut again
    finally:
        out, err = finish(process)
    assert process.returncode == 0, err
    assert start + middle + out == "".join(numbers(60)) + "\n"  # each number once
    notices = [line for line in err.splitlines() if line.startswith("connection lost")]
    assert len(notices) == 2, err
    assert all(
        re.fullmatch(r"connection lost; resumed \(\d+ frames?\ replayed\)", n) for n in notices
    )


def test_json_prints_each_frame_once_across_a_resume(proxy: TcpProxy) -> None:
    process = chat_through(proxy, "--json", "-m", "count 40 0.02")
    try:
        lines = [process.stdout.readline() for _ in range(6)]  # ready and 5 chunks
        proxy.cut()
    finally:
        out, err = finish(process)
    assert process.returncode == 0, err
    frames = [json.loads(line) for line in [*lines, *out.splitlines()]]
    assert [f["type"] for f in frames].count("resumed") == 1
    numbered = [f for f in frames if "seq" in f]
    assert [f["seq"] for f in numbered] == list(range(1, 42))  # 40 chunks and done, once each
    assert "".join(f.get("content", "") for f in numbered) == "".join(numbers(40))
    assert "connection lost; resumed" in err


def test_a_resume_that_fails_is_noticed_and_exits_1(proxy: TcpProxy) -> None:
    process = chat_through(proxy, "-m", "count 100 0.02")
    try:
        assert process.stdout.read(4) == "1 2 "
        proxy.refuse()
        proxy.cut()
    finally:
        out, err = finish(process)
    assert process.returncode == 1
    assert "100 " not in out
    assert re.search(r"connection lost; could not resume \(gave up after \d+ tries\)", err), err
    assert "error: the connection to the server was lost and could not be resumed within 1 s" in err


def test_no_resume_ends_the_chat_when_the_connection_drops(proxy: TcpProxy) -> None:
    process = chat_through(proxy, "--no-resume", "-m", "count 100 0.02")
    try:
        assert process.stdout.read(4) == "1 2 "
        proxy.cut()
    finally:
        out, err = finish(process)
    assert process.returncode == 1
    assert "100 " not in out
    assert "error: the connection to the server was lost" in err
    assert "resume" not in err


def test_an_expired_session_goes_on_anew_with_the_conversation(proxy: TcpProxy) -> None:
    """The network is down longer than the resume window, mid-reply and then between
    messages: the terminal says so each time, the reply in progress fails, and the next
    line goes to a new session with the conversation so far, so the model still sees it."""

    def outage() -> None:
        proxy.hold()  # the resume's handshake waits past the window
        proxy.cut()
        time.sleep(1.6)
        proxy.release()

    process = chat_through(proxy, piped=True)
    try:
        process.stdin.write("count 2\ncount 100 0.02\n")
        process.stdin.flush()
        assert process.stdout.read(9) == "1 2 \n1 2 "
        outage()
        notice = process.stderr.readline()
        assert notice.startswith("connection lost; could not resume (resume_expired: ")
        assert notice.endswith("a new session goes on with the conversation so far\n")
        assert "could not be resumed" in process.stderr.readline()  # the reply failed
        assert "100 " not in process.stdout.readline()  # the rest of the cut reply
        process.stdin.write("recall\n")
        process.stdin.flush()
        assert process.stdout.readline() == "You said 2 things: count 2 | recall\n"
        outage()  # idle this time
        assert "could not resume (resume_expired: " in process.stderr.readline()
        process.stdin.write("recall\n")
    finally:
        out, err = finish(process)
    assert process.returncode == 1, err  # one of the turns failed
    assert out == "You said 3 things: count 2 | recall | recall\n"
