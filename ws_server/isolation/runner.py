"""Isolated mode: the model runs in a long-lived worker process started from its own
virtualenv, with resource limits; sessions are multiplexed over one framed channel.

The runner spawns the worker (``ws_server.isolation.worker``), routes channel messages to sessions,
replaces a worker that dies (with backoff) and gives up after repeated crashes. Each
session re-runs ``on_chat_start`` in a new worker before its next turn, with its history
intact (the history lives in the server's session).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import ws_server
from ws_server import metrics
from ws_server.exceptions import ModelFailed, ModelLoadError, ResourceExhausted, WorkerCrashed
from ws_server.isolation import containment, ipc, launcher
from ws_server.redaction import redact
from ws_server.sdk import EVENT_LIMIT, EventSink, Message

log = logging.getLogger("anything_agent.isolated")

PACKAGE_DIR: Final = Path(ws_server.__file__).resolve().parent
PACKAGE_PARENT: Final = PACKAGE_DIR.parent
# The worker's interpreter gets only the standard library, its virtualenv and the
# directory holding ``ws_server`` on its path: -s and -E keep user site-packages and
# PYTHON* variables out, -u keeps its prints in order with the log. In the sandbox, that
# directory holds nothing but ``ws_server``.
_BOOT: Final = launcher.boot("ws_server.isolation.worker")
CRASH_LIMIT: Final = 5
CRASH_WINDOW: Final = 60.0
LOAD_TIMEOUT: Final = 300.0
STOP_TIMEOUT: Final = 5.0
# A stopped turn's generator gets this long to close in the worker (shorter than the
# session's own cleanup limit, so this check always gets to run). If the worker's event
# loop then does not answer a ping, the worker is wedged and is replaced; if it answers,
# a blocking step in a thread is still running and the turn is left to finish there.
CLEANUP_LIMIT: Final = 5.0
PING_TIMEOUT: Final = 2.0
# Bytes of chunks queued for one session: above HIGH the worker is asked to pause that
# session's generator, below LOW to resume. Memory stays bounded when a client reads slowly.
QUEUE_HIGH: Final = 1024 * 1024
QUEUE_LOW: Final = 256 * 1024
LOG_LINE_LIMIT: Final = 8192
LOG_LINE_BUFFER: Final = 1024 * 1024  # a line without an end is logged past this
# A worker that keeps sending after "pause" ignores flow control (a hostile model writing
# to the channel itself): past this much queued for one session, it is stopped.
QUEUE_HARD_LIMIT: Final = 16 * 1024 * 1024
_cpu_offset = itertools.count()


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs: which model, which interpreter, which limits."""

    name: str
    revision: str
    model_dir: Path
    python: Path
    config: dict[str, Any]
    memory_bytes: int | None = None
    cpus: float | None = None  # isolation.resources.cpu: a CPU-time quota, in cores
    memory_text: str | None = None
    pids: int = containment.DEFAULT_PIDS  # processes in the worker's tree
    network: bool = False  # isolation.network: may the sandboxed worker use the network
    sandbox: str = "auto"  # ServerSettings.sandbox: auto, on or off
    sandbox_share: tuple[tuple[str, str], ...] = ()  # ServerSettings.sandbox_share


@dataclass(frozen=True)
class _TurnEnd:
    outcome: str
    detail: str | None


@dataclass(frozen=True)
class _Event:
    """Something the model emitted, in its place among the turn's chunks."""

    name: str
    data: dict[str, Any]
    size: int  # bytes of its data, counted with the chunks' for flow control


@dataclass(frozen=True)
class _Crash:
    """Queued to a session whose turn was running when its worker died."""

    reason: str
    memory: bool = False  # the kernel killed it for going past its memory limit


_Item = str | _Event | _TurnEnd | _Crash  # what a running turn's queue holds


class _ServerChannel(asyncio.Protocol):
    def __init__(self, runner: IsolatedRunner, generation: int) -> None:
        self.runner = runner
        self.generation = generation
        self.decoder = ipc.FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ipc.ChannelError as exc:
            log.error("model %s: worker sent garbage (%s); stopping it", self.runner.name, exc)
            self.runner.kill_worker()
            return
        for message in messages:
            self.runner.receive(message, self.generation)

    def send(self, message: list[Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ipc.encode(message))


class IsolatedRunner:
    """Runs one model version in a worker process; makes an ``IsolatedSession`` per chat."""

    mode = "isolated"

    def __init__(self, spec: WorkerSpec, on_failed: Callable[[str], None]) -> None:
        self.spec = spec
        self.name = spec.name
        self.on_failed = on_failed
        self.generation = 0
        self.failed: str | None = None
        self.description = ""
        self.sessions: dict[str, IsolatedSession] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._confinement: containment.Confinement | None = None
        self.sandbox: dict[str, Any] | None = None  # the listing's "sandbox" field
        self._channel: _ServerChannel | None = None
        self._ready: asyncio.Future[None] | None = None
        self._loading: int | None = None  # the generation loading its model right now
        self._exiting: int | None = None  # a generation that said it exits (memory limit)
        self._crashes: collections.deque[float] = collections.deque()
        self._closing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cpu_offset = next(_cpu_offset)  # spread workers' cores across the machine

    @property
    def alive(self) -> bool:
        """A worker is (or is about to be) serving: not failed, not stopping."""
        return self.failed is None and not self._closing

    @property
    def serving(self) -> bool:
        """The current worker is up and not on its way out (a planned memory exit)."""
        return self.alive and self._exiting != self.generation

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the first worker and wait until the model has loaded in it."""
        await self._spawn()

    async def _spawn(self) -> None:
        self.generation += 1
        generation = self.generation
        loop = asyncio.get_running_loop()
        if self._ready is None or self._ready.done():  # else requests already wait on it
            self._ready = self._new_ready()
        self._loading = generation
        parent, child = socket.socketpair()
        confinement: containment.Confinement | None = None
        try:
            confinement = await containment.confine(self._request(), [])
            spec = {
                "fd": child.fileno(),
                "model_dir": str(self.spec.model_dir),
                "name": self.spec.name,
                "revision": self.spec.revision,
                "memory_bytes": self.spec.memory_bytes,
                "cpus": math.ceil(self.spec.cpus) if self.spec.cpus else None,
                "cpu_offset": self._cpu_offset,
                "sandboxed": confinement.sandboxed,
            }
            command = [
                *confinement.command,
                str(self.spec.python),
                *("-s", "-E", "-u", "-c", _BOOT, str(PACKAGE_PARENT)),
                json.dumps(spec, default=str),
            ]
            process = await asyncio.create_subprocess_exec(
                *command,
                # bwrap hands inherited descriptors on; it reads the seccomp filter's
                pass_fds=(child.fileno(), *confinement.pass_fds),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.spec.model_dir,
                env=confinement.environment,
                start_new_session=True,  # a terminal's Ctrl-C reaches the server, not us
            )
        except (OSError, ValueError) as exc:
            parent.close()
            if confinement is not None:
                confinement.ended(None)
            raise ModelLoadError(f"isolation: cannot start {self.spec.python}: {exc}") from None
        except BaseException:  # ModelLoadError, or cancelled while starting
            parent.close()
            if confinement is not None:
                confinement.ended(None)
            raise
        finally:
            child.close()
        confinement.started()
        self._process, self._confinement = process, confinement
        self.sandbox = confinement.report
        _, channel = await loop.create_unix_connection(
            lambda: _ServerChannel(self, generation), sock=parent
        )
        self._channel = channel
        # The config (secrets included) goes over the channel: an argument would be in
        # every local user's `ps` and the sandbox's /proc/*/cmdline.
        channel.send(["config", "", self.spec.config])
        assert process.stdout is not None and process.stderr is not None
        self._track(self._pump(process.stdout, "stdout", process.pid))
        self._track(self._pump(process.stderr, "stderr", process.pid))
        self._track(self._watch(process, generation, confinement))
        if self._closing:  # close() ran while we were starting it
            self.kill_worker()
            return
        ready = self._ready
        try:
            await asyncio.wait_for(asyncio.shield(ready), LOAD_TIMEOUT)
        except TimeoutError:
            self.kill_worker()
            raise ModelLoadError(
                f"main.py: the worker did not load within {LOAD_TIMEOUT:g} s"
            ) from None
        log.info(
            "model %s: worker pid %d ready (generation %d, %s; limits: %s)",
            self.name,
            containment.model_pid(process.pid),
            generation,
            "sandboxed" if confinement.sandboxed else "not sandboxed",
            confinement.report["limits"],
        )

    def _request(self) -> containment.Request:
        spec = self.spec
        return containment.Request(
            model=spec.name,
            model_dir=spec.model_dir,
            python=spec.python,
            package_dir=PACKAGE_DIR,
            memory_bytes=spec.memory_bytes,
            memory_text=spec.memory_text,
            cpus=spec.cpus,
            pids=spec.pids,
            network=spec.network,
            sandbox_mode=spec.sandbox,
            sandbox_share=spec.sandbox_share,
        )

    @staticmethod
    def _new_ready() -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Waiters see the exception; nobody waiting is normal, not worth a warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _track(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, stream: asyncio.StreamReader, label: str, pid: int) -> None:
        """The worker's stdout and stderr go to the server log, a line each, prefixed with
        the model. Always drained, so a chatty model never blocks on a full pipe."""
        pending = b""
        while data := await stream.read(65536):
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            if len(pending) > LOG_LINE_BUFFER:  # a huge line without an end: log it anyway
                lines.append(pending)
                pending = b""
            for line in lines:
                self._log_output(line, label, pid)
        if pending:
            self._log_output(pending, label, pid)

    def _log_output(self, line: bytes, label: str, pid: int) -> None:
        # Secrets are masked in the whole line before it is cut to length, so a cut never
        # leaves half a secret unmasked (the log formatter masks whole ones again).
        text = redact(line.decode(errors="replace")).rstrip()[:LOG_LINE_LIMIT]
        log.info("model %s worker[%d] %s: %s", self.name, pid, label, text)

    async def _watch(
        self,
        process: asyncio.subprocess.Process,
        generation: int,
        confinement: containment.Confinement,
    ) -> None:
        code = await process.wait()
        memory = confinement.memory_breached()
        # Its children end with it, and its cgroup goes (a few blocking system calls).
        await asyncio.to_thread(confinement.ended, process.pid)
        if self._closing or generation != self.generation:
            return
        reason = describe_exit(code, confinement.sandboxed)
        if memory:
            reason += f", past its memory limit ({self.spec.memory_text})"
        ready = self._ready
        if self._loading == generation and ready is not None and not ready.done():
            ready.set_exception(
                ModelLoadError(f"main.py: the worker exited while loading the model ({reason})")
            )
            return
        # A memory kill during a turn is that turn's breach; one with no turn running (the
        # model's own background work) counts as a crash: a model that keeps doing it is
        # backed off and, at the crash limit, failed rather than restarted for ever.
        planned = self._exiting == generation or (memory and self._turn_running())
        self._crashed(reason, counted=not planned, memory=memory)

    def _crashed(self, reason: str, counted: bool = True, memory: bool = False) -> None:
        """A worker died: tell its sessions, then restart it (with backoff) or give up.
        One the kernel killed for memory is a breach, not a crash (``counted`` False)."""
        (log.error if counted else log.info)("model %s: worker exited (%s)", self.name, reason)
        for session in self.sessions.values():
            session.worker_died(reason, memory=memory)
        if self._ready is None or self._ready.done():
            self._ready = self._new_ready()
        delay = 0.0
        if counted:
            now = time.monotonic()
            self._crashes.append(now)
            while self._crashes and now - self._crashes[0] > CRASH_WINDOW:
                self._crashes.popleft()
            if len(self._crashes) >= CRASH_LIMIT:
                self.failed = (
                    f"crashed {CRASH_LIMIT} times in {CRASH_WINDOW:g} s; last exit: {reason}"
                )
                log.error("model %s: %s; not restarting", self.name, self.failed)
                self._ready.set_exception(ModelLoadError(self.failed))
                self.on_failed(self.failed)
                return
            delay = min(0.1 * 2 ** (len(self._crashes) - 1), 5.0)
        self._track(self._restart(delay))

    async def _restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing:
            return
        metrics.WORKER_RESTARTS.labels(model=self.name).inc()
        try:
            await self._spawn()
        except ModelLoadError as exc:
            self._crashed(exc.message)
        except Exception as exc:  # the env vanished, no file handles...: still a crash
            log.exception("model %s: restarting the worker failed", self.name)
            self._crashed(f"restart failed: {type(exc).__name__}: {exc}")

    async def ensure_running(self) -> int:
        """Wait until a worker is ready (restarts included); its generation."""
        if self.failed is not None:
            raise WorkerCrashed(f"the model's worker keeps crashing: {self.failed}")
        if self._closing:
            raise WorkerCrashed("the model's worker is stopping")
        assert self._ready is not None
        try:
            await asyncio.shield(self._ready)
        except ModelLoadError as exc:
            raise WorkerCrashed(f"the model's worker could not restart: {exc.message}") from None
        return self.generation

    def _turn_running(self) -> bool:
        return any(session.turn_running for session in self.sessions.values())

    def _breached(self, since: int) -> bool:
        confinement = self._confinement
        return confinement is not None and confinement.memory_breached(since)

    def oom_kills(self) -> int:
        """Memory kills in the current worker's group so far (a turn's starting mark)."""
        return self._confinement.oom_kills() if self._confinement is not None else 0

    def kill_worker(self) -> None:
        """SIGKILL the current worker; requests wait for its replacement from now on."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                self._process.kill()
            if self._ready is not None and self._ready.done():
                self._ready = self._new_ready()

    async def close(self) -> None:
        """Stop the worker: close its channel, then SIGTERM, then SIGKILL."""
        self._closing = True
        for session in list(self.sessions.values()):
            session.worker_died("the worker is stopping")
        process = self._process
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.close()
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
        if process is not None and self._confinement is not None:
            await asyncio.to_thread(self._confinement.ended, process.pid)
        for task in list(self._tasks):
            task.cancel()
        log.info("model %s: worker stopped", self.name)

    # ------------------------------------------------------------------ channel
    def send(self, message: list[Any]) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def receive(self, message: list[Any], generation: int) -> None:
        kind = message[0]
        if kind == "ready":
            self.description = message[1] or ""
            self._loading = None
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        if kind == "load_failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ModelLoadError(message[1], detail=message[2]))
            return
        ending = self.sessions.get(message[1]) if kind == "turn_end" else None
        if (
            ending is not None
            and message[3] != "resource_exhausted"
            and self._breached(ending.oom_mark)
        ):
            # One of the worker's processes was killed for memory during this turn: the
            # turn is a breach, and the worker is replaced (its state is not to be trusted).
            # A kill before the turn began is not blamed on it.
            message = [*message[:3], "resource_exhausted", "killed for memory by the kernel"]
            self.kill_worker()
        if kind == "turn_end" and message[3] == "resource_exhausted":
            # The worker exits right after this message: from now on, requests wait for
            # its replacement, and the exit is a planned one, not a crash.
            if generation == self.generation and self._exiting != generation:
                self._exiting = generation
                if self._ready is not None and self._ready.done():
                    self._ready = self._new_ready()
        session = self.sessions.get(message[1])
        if session is not None:
            session.receive(kind, message[2:])

    def open_session(self) -> IsolatedSession:
        session = IsolatedSession(self, uuid.uuid4().hex)
        self.sessions[session.sid] = session
        return session


class IsolatedSession:
    """One conversation's model instance living in the worker."""

    def __init__(self, runner: IsolatedRunner, sid: str) -> None:
        self.runner = runner
        self.sid = sid
        # The worker (generation) that runs this session's on_chat_start; None once it died.
        self._sent_start_to: int | None = None
        self._replies: dict[str, asyncio.Future[Any]] = {}
        self._queue: asyncio.Queue[_Item] | None = None
        self._queued_bytes = 0
        self._paused = False
        self._overrun = False
        self._turn_id = 0  # numbers this session's turns on the channel
        self.oom_mark = 0  # the worker group's memory kills when the running turn began
        self._context: dict[str, Any] = {}  # the snapshot the last turn_end carried

    # ------------------------------------------------------------------ from the worker
    def receive(self, kind: str, args: list[Any]) -> None:
        if kind in ("chunk", "event", "turn_end") and (not args or args[0] != self._turn_id):
            return  # from a turn already given up on (it was wedged, then replaced)
        if kind == "chunk":
            queue = self._queue
            if queue is not None and not self._overrun:
                queue.put_nowait(args[1])
                self._queued(len(args[1]))
        elif kind == "event":
            event = _checked_event(self.runner.name, args)
            if event is not None and self._queue is not None and not self._overrun:
                self._queue.put_nowait(event)
                self._queued(event.size)
        elif kind == "turn_end":
            if len(args) > 3 and isinstance(args[3], dict):
                self._context = args[3]
            if self._queue is not None:
                self._queue.put_nowait(_TurnEnd(args[1], args[2]))
        elif kind in ("started", "ended", "pong"):
            reply = self._replies.pop(kind, None)
            if reply is not None and not reply.done():
                reply.set_result(args[0])

    def _queued(self, size: int) -> None:
        """``size`` more bytes wait for the session: past QUEUE_HIGH the worker is asked to
        pause; past the hard limit it ignored that, and is stopped."""
        self._queued_bytes += size
        if not self._paused and self._queued_bytes > QUEUE_HIGH:
            self._paused = True
            self.runner.send(["pause", self.sid])
        elif self._queued_bytes > QUEUE_HARD_LIMIT:
            log.error(
                "model %s: the worker ignored flow control (%d bytes queued); stopping it",
                self.runner.name,
                self._queued_bytes,
            )
            self._overrun = True  # what else it sends is dropped; its death ends
            self.runner.kill_worker()  # the turn with model_crashed

    @property
    def turn_running(self) -> bool:
        return self._queue is not None

    def worker_died(self, reason: str, memory: bool = False) -> None:
        self._sent_start_to = None  # nothing of this session lives on in any worker
        if self._queue is not None:
            self._queue.put_nowait(_Crash(reason, memory))
        for reply in self._replies.values():
            if not reply.done():
                reply.set_exception(WorkerCrashed(reason))
        self._replies.clear()

    async def _request(self, message: list[Any], answer: str) -> Any:
        reply = asyncio.get_running_loop().create_future()
        self._replies[answer] = reply
        self.runner.send(message)
        return await reply

    # ------------------------------------------------------------------ ModelSession
    async def start(self, context: dict[str, Any] | None = None) -> None:
        generation = await self.runner.ensure_running()
        self._sent_start_to = generation
        error = await self._request(["start", self.sid, context], "started")
        if error:
            raise ModelFailed(f"on_chat_start raised in the worker:\n{error}")

    async def end(self) -> None:
        try:
            if self._sent_start_to == self.runner.generation and self.runner.serving:
                try:
                    error = await asyncio.wait_for(
                        self._request(["end", self.sid], "ended"), STOP_TIMEOUT
                    )
                except WorkerCrashed:
                    return  # its instance died with the worker: nothing left to end
                if error:
                    raise ModelFailed(f"on_chat_end raised in the worker:\n{error}")
        finally:
            self.runner.sessions.pop(self.sid, None)

    def snapshot(self) -> dict[str, Any]:
        return self._context

    async def stream(
        self,
        messages: list[Message],
        snapshot: bool = False,
        params: dict[str, Any] | None = None,
        events: EventSink | None = None,
    ) -> AsyncIterator[str]:
        if self._sent_start_to != await self.runner.ensure_running():
            await self.start()  # a new worker: on_chat_start runs again there
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue, self._queued_bytes, self._paused = queue, 0, False
        self._overrun = False
        self._turn_id += 1
        self.oom_mark = self.runner.oom_kills()
        self.runner.send(["turn", self.sid, messages, self._turn_id, snapshot, params])
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, str):
                    self._queued_bytes -= len(item)
                    if self._paused and self._queued_bytes < QUEUE_LOW:
                        self._paused = False
                        self.runner.send(["resume", self.sid])
                    yield item
                    continue
                if isinstance(item, _Event):
                    self._queued_bytes -= item.size
                    if events is not None:
                        events(item.name, item.data)
                    continue
                finished = True
                self._raise_for(item)
                return
        finally:
            if not finished:
                await self._cancel_in_worker(queue, events)
            self._queue = None

    async def _cancel_in_worker(
        self, queue: asyncio.Queue[_Item], events: EventSink | None
    ) -> None:
        """Stopped early (cancel, timeout, client gone): close the generator in the worker
        and wait until its ``finally`` has run there (what it emits meanwhile, such as its
        steps closing as ``error``, still goes out); a wedged worker gets replaced."""
        self.runner.send(["cancel", self.sid])
        if self._paused:
            self.runner.send(["resume", self.sid])

        async def turn_over() -> None:
            while not isinstance(item := await queue.get(), (_TurnEnd, _Crash)):
                if isinstance(item, _Event) and events is not None:
                    events(item.name, item.data)

        try:
            await asyncio.wait_for(turn_over(), CLEANUP_LIMIT)
        except TimeoutError:
            if not await self._worker_responds():
                log.error(
                    "model %s: worker unresponsive after cancelling a turn; replacing it",
                    self.runner.name,
                )
                self.runner.kill_worker()
        except asyncio.CancelledError:
            self.runner.kill_worker()  # stopped while waiting: never leave it wedged
            raise

    async def _worker_responds(self) -> bool:
        try:
            await asyncio.wait_for(self._request(["ping", self.sid], "pong"), PING_TIMEOUT)
        except (TimeoutError, WorkerCrashed):
            return False
        return True

    def _raise_for(self, end: _TurnEnd | _Crash) -> None:
        if isinstance(end, _Crash) and end.memory:
            raise ResourceExhausted(
                f"the turn went past the model's memory limit ({self.runner.spec.memory_text}); "
                "its worker is being replaced"
            )
        if isinstance(end, _Crash):
            raise WorkerCrashed(
                "the model's worker crashed; a new one is starting, send your message again"
            )
        if end.outcome == "error":
            raise ModelFailed(f"on_chat_messages raised in the worker:\n{end.detail}")
        if end.outcome == "resource_exhausted":
            limit = self.runner.spec.memory_text or "its limit"
            raise ResourceExhausted(
                f"the turn went past the model's memory limit ({limit}); "
                "its worker is being replaced"
            )


def describe_exit(code: int, sandboxed: bool = False) -> str:
    """``exit code 3`` or ``killed by signal 9 (SIGKILL)``.

    bwrap exits with its command's status, and with 128 + N when a signal N killed it
    (as shells do); a signal that killed bwrap itself shows as usual (``-N``)."""
    if sandboxed and 128 < code < 128 + signal.NSIG:
        code = 128 - code
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def _checked_event(model: str, args: list[Any]) -> _Event | None:
    """An ``event`` message from a worker, if it is one the SDK would have sent (a model
    writing to the channel itself gets its malformed events dropped, and a log line)."""
    if len(args) >= 3 and isinstance(args[1], str) and isinstance(args[2], dict):
        name, data = args[1], args[2]
        try:
            name.encode()
            size = len(json.dumps(data, ensure_ascii=False, allow_nan=False).encode())
        except (TypeError, ValueError, RecursionError):  # lone surrogates, NaN, depth
            size = EVENT_LIMIT + 1
        if 0 < len(name) <= 64 and name != "queued" and size <= EVENT_LIMIT:
            return _Event(name, data, size)
    log.warning("model %s: dropped a malformed event from its worker", model)
    return None
