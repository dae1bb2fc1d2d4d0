"""``anything-agent chat``: talk to a model from a terminal, a script or a pipe.

The WebSocket session lives on an event loop in a background thread, so it keeps answering
pings while the main thread waits at the prompt; the main thread owns the terminal (line
editing, Ctrl-C). Ctrl-C during a reply cancels the turn; a second one, or one at the
prompt, quits. ``-m`` sends one message and exits non-zero if the turn failed; ``--json``
prints every frame exactly as received, one per line, for bots (after a resume, frames the
server replayed are printed once: those already printed are skipped). ``--param KEY=VALUE``
goes with every message of the run, as the model's ``self.params``.

What the model reports besides text (``event`` frames: status notes, steps, queueing, its
own events) goes to stderr, one dimmed line each, so stdout stays the reply alone; with
``--json`` the frames are on stdout with the rest.

A dropped connection is resumed (``--no-resume`` turns that off), with a one-line notice on
stderr; a reply being streamed carries on where it stopped. When the server no longer has
the session, it says so, and the next message goes to the new session together with the
conversation so far (``messages``), so the model still sees it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO, TypeVar

from ws_server import protocol
from ws_server.client.chat import ChatClient, ResumeNotice, Turn
from ws_server.exceptions import ClientError, ConnectionLost, TurnFailed

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# What a model sends is shown, not obeyed: on a terminal, control characters (escape
# sequences that move the cursor, retitle the window, set the clipboard…) are dropped,
# as the web client never turns model output into HTML.
CONTROL_CHARACTERS = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]"  # CSI: cursor moves, clearing, colours
    r"|\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: window title, clipboard, links
    r"|[@-Z\\-_])?"  # other two-character escapes, or a lone ESC
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # any other control character but \t and \n
)

# An event's line shows at most this many characters of a value (input, output, data).
EVENT_VALUE_LIMIT = 120
STEP_MARKS = {"running": "▸", "done": "✓", "error": "✗"}

Outcome = Literal["ok", "failed", "stopped"]
EXIT_CODES: dict[Outcome, int] = {"ok": EXIT_OK, "failed": EXIT_FAILED, "stopped": EXIT_INTERRUPTED}


@dataclass(frozen=True)
class ChatOptions:
    """What ``anything-agent chat`` was asked to do."""

    url: str
    model: str
    message: str | None = None  # -m: one message, then exit
    json: bool = False  # --json: raw frames on stdout
    api_key: str | None = None
    resumable: bool = True  # --no-resume: a dropped connection ends the chat
    params: dict[str, Any] = field(default_factory=dict)  # --param: sent with every message


class _Style:
    """ANSI colours on a terminal (and not under NO_COLOR), nothing otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and "NO_COLOR" not in os.environ

    def __call__(self, text: str, code: str, *, for_readline: bool = False) -> str:
        if not self.on:
            return text
        if for_readline:  # invisible to readline's count of the prompt's width
            return f"\001\033[{code}m\002{text}\001\033[0m\002"
        return f"\033[{code}m{text}\033[0m"


class EventLines:
    """One turn's events as the lines the terminal shows for them: ``… text`` for a status,
    a line when a step starts and one when it ends (indented by how deep it nests),
    ``queued (position P)``, and ``name: {json}`` for anything else."""

    def __init__(self) -> None:
        self._depths: dict[str, int] = {}  # step id -> how deep it nests

    def line(self, event: protocol.Event) -> str:
        data = event.data
        if event.name == "status":
            return f"… {_one_line(data.get('text', ''))}"
        if event.name == "queued":
            return f"queued (position {_one_line(data.get('position', '?'))})"
        if event.name == "step" and isinstance(data.get("id"), str):
            return self._step(data)
        return f"{_one_line(event.name)}: {_value(data)}"

    def _step(self, data: dict[str, Any]) -> str:
        step_id, parent = data["id"], data.get("parent_id")
        if step_id not in self._depths:
            self._depths[step_id] = self._depths[parent] + 1 if parent in self._depths else 0
        indent = "  " * self._depths[step_id]
        name, status = _one_line(data.get("name", "step")), data.get("status")
        mark = STEP_MARKS.get(status if isinstance(status, str) else "", "·")
        if status == "running":
            shown = data.get("input")
            return f"{indent}{mark} {name}" + ("" if shown is None else f": {_value(shown)}")
        shown = data.get("output")
        return f"{indent}{mark} {name}" + ("" if shown is None else f" → {_value(shown)}")


def _value(value: Any) -> str:
    """A value on one line: a string as it is, anything else as compact JSON; shortened."""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = _one_line(value)
    if len(text) > EVENT_VALUE_LIMIT:
        text = text[: EVENT_VALUE_LIMIT - 1] + "…"
    return text


def _one_line(value: object) -> str:
    """Text a model sent, safe on one terminal line: no escapes, no line breaks."""
    return " ".join(CONTROL_CHARACTERS.sub("", str(value)).split())


class _IoThread:
    """An event loop in a daemon thread; ``run`` waits for a coroutine from the main thread,
    where Ctrl-C arrives as ``KeyboardInterrupt``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(
        self, coroutine: Coroutine[Any, Any, T], on_interrupt: Callable[[], bool] | None = None
    ) -> T:
        """The coroutine's result. Ctrl-C calls ``on_interrupt``; when there is none or it
        returns False, the coroutine is cancelled and ``KeyboardInterrupt`` propagates."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        while True:
            try:
                return future.result()
            except KeyboardInterrupt:
                if on_interrupt is None or not on_interrupt():
                    future.cancel()
                    raise

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Start a coroutine without waiting for it."""
        asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class TerminalChat:
    """One ``anything-agent chat`` run."""

    def __init__(self, options: ChatOptions, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
        self.options = options
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty() and options.message is None and not options.json
        self.style = _Style(stderr)
        self.raw_output = not stdout.isatty()
        self.io = _IoThread()
        self.client: ChatClient | None = None
        # The server started a new session after a failed resume: the next message carries
        # the conversation so far. Set on the I/O thread, read on the main one.
        self._carry_history = False
        self._mid_line = False  # the reply's last line shown is unfinished

    def run(self) -> int:
        try:
            return self._run()
        except KeyboardInterrupt:
            self._note("interrupted")
            return EXIT_INTERRUPTED
        except ClientError as exc:
            self._fail(exc.message)
            return EXIT_FAILED
        finally:
            if self.client is not None:
                try:
                    self.io.run(self.client.close())
                except (KeyboardInterrupt, ClientError):
                    pass
            self.io.close()

    def _run(self) -> int:
        on_frame = self._print_frame if self.options.json else None
        self.client = self.io.run(
            ChatClient.open(
                self.options.url,
                self.options.model,
                api_key=self.options.api_key,
                on_frame=on_frame,
                resumable=self.options.resumable,
                on_resume=self._on_resume,
            )
        )
        if self.options.message is not None:
            return EXIT_CODES[self._turn(self.options.message)]
        if self.interactive:
            return self._prompt_loop()
        worst: Outcome = "ok"
        for line in self.stdin:  # a pipe or a file: one message per non-blank line
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            outcome = self._turn(text)
            if outcome == "stopped":
                return EXIT_INTERRUPTED
            if outcome == "failed":
                worst = outcome
        return EXIT_CODES[worst]

    def _prompt_loop(self) -> int:
        import readline  # noqa: F401  (line editing and ↑ history for input())

        client = self.client
        assert client is not None
        self._note(
            f"{client.model} {client.version} · session {client.session_id} · "
            "Enter sends · Ctrl-C stops a reply · Ctrl-D quits"
        )
        prompt = self.style("> ", "1;36", for_readline=True)
        while True:
            try:
                line = input(prompt)
            except EOFError:  # Ctrl-D
                self.stderr.write("\n")
                return EXIT_OK
            except KeyboardInterrupt:  # Ctrl-C at the prompt
                self.stderr.write("\n")
                return EXIT_INTERRUPTED
            if line.strip():
                self._turn(line)
                self.stdout.write("\n")

    def _turn(self, text: str) -> Outcome:
        """Send one message and stream its reply."""
        client = self.client
        assert client is not None
        try:
            turn = self._send(client, text)
        except ConnectionLost:
            if not client.is_open:
                raise
            turn = self._send(client, text)  # the session expired while idle: the new one
        cancelling = False

        def interrupt() -> bool:
            nonlocal cancelling
            if cancelling:
                return False  # the second Ctrl-C quits
            cancelling = True
            self.io.submit(turn.cancel())
            self._note(" stopping… (Ctrl-C again quits)")
            return True

        try:
            self.io.run(self._stream(turn), on_interrupt=interrupt)
        except TurnFailed as exc:
            self._end_line()
            self._fail(f"{exc.code}: {exc.message}")
            return "failed"
        except ConnectionLost as exc:
            if not client.is_open:
                raise  # lost for good: the chat ends
            self._end_line()  # the session expired mid-reply: a new one goes on
            self._fail(exc.message)
            return "failed"
        self._end_line()
        if turn.reason == "cancelled":
            self._note("[stopped]")
            return "stopped"
        return "ok"

    def _send(self, client: ChatClient, text: str) -> Turn:
        """Start a turn; the first one in a session that replaced an expired one sends the
        conversation so far with it (the model's history went with the old session)."""
        if self._carry_history:
            messages = [*client.previous_history, {"role": "user", "content": text}]
            params = self.options.params
            turn: Turn = self.io.run(client.replace_history(messages, params=params))
            self._carry_history = False  # only once sent: a refusal keeps it for the retry
            return turn
        return self.io.run(client.send(text, params=self.options.params))

    def _on_resume(self, notice: ResumeNotice) -> None:
        """A dropped connection was resumed, or could not be: one line on stderr."""
        if notice.outcome == "resumed":
            plural = "" if notice.replayed == 1 else "s"
            self._note(f"connection lost; resumed ({notice.replayed} frame{plural} replayed)")
        elif notice.outcome == "new_session":
            self._carry_history = True
            self._note(
                f"connection lost; could not resume ({notice.message}); a new session "
                "goes on with the conversation so far"
            )
        else:
            self._note(f"connection lost; could not resume (gave up after {notice.attempts} tries)")

    async def _stream(self, turn: Turn) -> None:
        if self.options.json:  # every frame is printed as it comes (on_frame)
            async for _ in turn:
                pass
            return
        events = EventLines()
        async for item in turn.items():
            if isinstance(item, str):
                text = item if self.raw_output else CONTROL_CHARACTERS.sub("", item)
                self.stdout.write(text)
                self.stdout.flush()
                if text:
                    self._mid_line = not text.endswith("\n")
            else:
                self._event_note(events.line(item))

    def _event_note(self, text: str) -> None:
        """An event's line on stderr; on a terminal, below the reply's unfinished line."""
        if self._mid_line and self.stdout.isatty() and self.stderr.isatty():
            self.stderr.write("\n")
            self._mid_line = False
        self._note(text)

    def _end_line(self) -> None:
        if not self.options.json and self._mid_line:
            self.stdout.write("\n")
            self.stdout.flush()
        self._mid_line = False

    def _print_frame(self, raw: str) -> None:
        self.stdout.write(raw + "\n")
        self.stdout.flush()

    def _note(self, text: str) -> None:
        self.stderr.write(self.style(text, "2") + "\n")
        self.stderr.flush()

    def _fail(self, text: str) -> None:
        self.stderr.write(self.style(f"error: {text}", "31") + "\n")
        self.stderr.flush()


def restore_ctrl_c() -> None:
    """Make Ctrl-C raise ``KeyboardInterrupt`` again, whatever this process inherited.

    A process started with SIGINT ignored (``cmd &`` in a script, some CI runners and
    supervisors) keeps it ignored across ``exec``, and Python then installs no handler of
    its own, so Ctrl-C (and ``kill -INT``) would do nothing. Call it from the main thread,
    first thing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def run_chat(options: ChatOptions) -> int:
    """Run ``anything-agent chat``; the process exit code."""
    return TerminalChat(options, sys.stdin, sys.stdout, sys.stderr).run()
