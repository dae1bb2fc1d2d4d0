"""The local placement: a worker is a process on this node, started from the model's own
virtualenv inside its sandbox and limits (``containment.py``), talking over a socket pair.

Its stdout and stderr go to the server log, a line each; its exit (code, signal, memory
kill) is the link's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import ws_server
from ws_server.exceptions import ModelLoadError
from ws_server.isolation import containment, ipc, launcher
from ws_server.isolation.link import Deliver, Ended, LinkEnd, WorkerSpec
from ws_server.isolation.messages import Config, ServerMessage, WorkerMessage
from ws_server.redaction import redact

log = logging.getLogger("anything_agent.isolated")

PACKAGE_DIR: Final = Path(ws_server.__file__).resolve().parent
PACKAGE_PARENT: Final = PACKAGE_DIR.parent
# The worker's interpreter gets only the standard library, its virtualenv and the
# directory holding ``ws_server`` on its path: -s and -E keep user site-packages and
# PYTHON* variables out, -u keeps its prints in order with the log. In the sandbox, that
# directory holds nothing but ``ws_server``.
_BOOT: Final = launcher.boot("ws_server.isolation.worker")
STOP_TIMEOUT: Final = 5.0
LOG_LINE_LIMIT: Final = 8192
LOG_LINE_BUFFER: Final = 1024 * 1024  # a line without an end is logged past this
_cpu_offset = itertools.count()


@dataclass(frozen=True)
class LocalProcesses:
    """Makes local worker processes: from which interpreter, in which sandbox."""

    python: Path  # the model's environment's interpreter
    sandbox: str = "auto"  # ServerSettings.sandbox: auto, on or off
    sandbox_share: tuple[tuple[str, str], ...] = ()  # ServerSettings.sandbox_share
    kind: str = "local"

    def link(self, spec: WorkerSpec, deliver: Deliver, ended: Ended) -> LocalProcessLink:
        return LocalProcessLink(self, spec, deliver, ended)


class _Channel(asyncio.Protocol):
    """The server's end of the socket pair."""

    def __init__(self, link: LocalProcessLink) -> None:
        self.link = link
        self.decoder = ipc.FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ipc.ChannelError as exc:
            log.error("model %s: worker sent garbage (%s); stopping it", self.link.name, exc)
            self.link.kill()
            return
        deliver = self.link.deliver
        for message in messages:
            deliver(cast(WorkerMessage, message))

    def send(self, message: ServerMessage) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ipc.encode(message))


class LocalProcessLink:
    """One worker process of a model version on this node."""

    placement = "local"

    def __init__(
        self, processes: LocalProcesses, spec: WorkerSpec, deliver: Deliver, ended: Ended
    ) -> None:
        self.processes = processes
        self.spec = spec
        self.name = spec.name
        self.deliver = deliver
        self._ended = ended
        self.sandbox: dict[str, Any] = {}
        self._process: asyncio.subprocess.Process | None = None
        self._confinement: containment.Confinement | None = None
        self._channel: _Channel | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._cpu_offset = next(_cpu_offset)  # spread workers' cores across the machine

    @property
    def label(self) -> str:
        """``worker pid N``: the model's interpreter on the host (below bwrap, once the
        sandbox has started it)."""
        if self._process is None:
            return "worker"
        return f"worker pid {containment.model_pid(self._process.pid)}"

    async def open(self) -> None:
        """Spawn the worker in its confinement and send it the config."""
        parent, child = socket.socketpair()
        confinement: containment.Confinement | None = None
        try:
            confinement = await containment.confine(self._request(), [])
            spec = self.spec
            instructions = {
                "fd": child.fileno(),
                "model_dir": str(spec.model_dir),
                "name": spec.name,
                "revision": spec.revision,
                "memory_bytes": spec.memory_bytes,
                "cpus": math.ceil(spec.cpus) if spec.cpus else None,
                "cpu_offset": self._cpu_offset,
                "sandboxed": confinement.sandboxed,
            }
            command = [
                *confinement.command,
                str(self.processes.python),
                *("-s", "-E", "-u", "-c", _BOOT, str(PACKAGE_PARENT)),
                json.dumps(instructions, default=str),
            ]
            process = await asyncio.create_subprocess_exec(
                *command,
                # bwrap hands inherited descriptors on; it reads the seccomp filter's
                pass_fds=(child.fileno(), *confinement.pass_fds),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=spec.model_dir,
                env=confinement.environment,
                start_new_session=True,  # a terminal's Ctrl-C reaches the server, not us
            )
        except (OSError, ValueError) as exc:
            parent.close()
            if confinement is not None:
                confinement.ended(None)
            raise ModelLoadError(
                f"isolation: cannot start {self.processes.python}: {exc}"
            ) from None
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
        loop = asyncio.get_running_loop()
        _, channel = await loop.create_unix_connection(lambda: _Channel(self), sock=parent)
        self._channel = channel
        # The config (secrets included) goes over the channel: an argument would be in
        # every local user's `ps` and the sandbox's /proc/*/cmdline.
        channel.send(Config(spec.config))
        assert process.stdout is not None and process.stderr is not None
        self._track(self._pump(process.stdout, "stdout", process.pid))
        self._track(self._pump(process.stderr, "stderr", process.pid))
        self._track(self._watch(process, confinement))

    def _request(self) -> containment.Request:
        spec = self.spec
        return containment.Request(
            model=spec.name,
            model_dir=spec.model_dir,
            python=self.processes.python,
            package_dir=PACKAGE_DIR,
            memory_bytes=spec.memory_bytes,
            memory_text=spec.memory_text,
            cpus=spec.cpus,
            pids=spec.pids,
            network=spec.network,
            sandbox_mode=self.processes.sandbox,
            sandbox_share=self.processes.sandbox_share,
        )

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
                log_output(self.name, f"worker[{pid}]", label, line.decode(errors="replace"))
        if pending:
            log_output(self.name, f"worker[{pid}]", label, pending.decode(errors="replace"))

    async def _watch(
        self, process: asyncio.subprocess.Process, confinement: containment.Confinement
    ) -> None:
        code = await process.wait()
        memory = confinement.memory_breached()
        # Its children end with it, and its cgroup goes (a few blocking system calls).
        await asyncio.to_thread(confinement.ended, process.pid)
        if self._closing:
            return
        reason = describe_exit(code, confinement.sandboxed)
        if memory:
            reason += f", past its memory limit ({self.spec.memory_text})"
        self._ended(LinkEnd(reason, memory))

    def send(self, message: ServerMessage) -> None:
        if self._channel is not None:
            self._channel.send(message)

    def memory_breached(self, since: int | None = None) -> bool:
        confinement = self._confinement
        return confinement is not None and confinement.memory_breached(since)

    def oom_kills(self) -> int:
        """Memory kills in the worker's group so far (a turn's starting mark)."""
        return self._confinement.oom_kills() if self._confinement is not None else 0

    def kill(self) -> None:
        """SIGKILL the worker; its exit is reported as its end."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                self._process.kill()

    async def close(self) -> None:
        """Close the channel (the worker exits), then SIGTERM, then SIGKILL."""
        self._closing = True
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


def log_output(model: str, worker: str, stream: str, line: str) -> None:
    """One line a model's worker printed, in the server log. Secrets are masked in the
    whole line before it is cut to length, so a cut never leaves half a secret unmasked
    (the log formatter masks whole ones again)."""
    text = redact(line).rstrip()[:LOG_LINE_LIMIT]
    log.info("model %s %s %s: %s", model, worker, stream, text)


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
