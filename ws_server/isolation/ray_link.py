"""The Ray placement: a worker is an actor on a Ray cluster (``serve --ray-address``).

Each isolated model version runs as one async actor (``ray_actor.ModelActor``: Ray Core,
since a session is stateful and must stay with the instance that holds it). Ray's
``runtime_env`` builds its environment from the model's requirements.txt, ships the model
directory as its working directory and this package beside it; ``isolation.resources``
becomes the actor's ``num_cpus`` and ``memory``. Messages map onto actor calls: a turn is
one streaming call (Ray holds the actor's generator back when the server stops pulling),
start, end and ping are calls with an answer, cancel is a call. A long-lived ``follow``
call streams what the model prints into the server log and is how the link learns,
at once, that the actor died.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import ws_server
from ws_server.isolation import ipc
from ws_server.isolation.link import Deliver, Ended, LinkEnd, WorkerSpec
from ws_server.isolation.local_link import log_output
from ws_server.isolation.messages import (
    Cancel,
    End,
    LoadFailed,
    MessageError,
    Pause,
    Ping,
    Resume,
    ServerMessage,
    Start,
    Turn,
    WorkerMessage,
    from_list,
    to_list,
)

if TYPE_CHECKING:
    from ws_server.isolation.ray_cluster import RayCluster

log = logging.getLogger("anything_agent.isolated")

PACKAGE_DIR: Final = Path(ws_server.__file__).resolve().parent
# Streamed items (batches of a turn's messages) Ray lets the actor run ahead of the server.
BACKPRESSURE_ITEMS: Final = 8
# Not shipped to the cluster with the model or with this package.
EXCLUDES: Final = ["__pycache__", "*.pyc", ".venv", ".git", ".pytest_cache"]
# requirements.txt as the local placement installs it: wheels only (building an sdist
# runs its code at install time).
PIP_OPTIONS: Final = ["--disable-pip-version-check", "--no-cache-dir", "--only-binary=:all:"]


class RayActors:
    """Makes the links of Ray-placed workers: one actor each."""

    kind = "ray"

    def __init__(self, cluster: RayCluster) -> None:
        self.cluster = cluster

    def link(self, spec: WorkerSpec, deliver: Deliver, ended: Ended) -> RayActorLink:
        return RayActorLink(self.cluster, spec, deliver, ended)


class RayActorLink:
    """One actor running one model version."""

    placement = "ray"

    def __init__(self, cluster: RayCluster, spec: WorkerSpec, deliver: Deliver, ended: Ended):
        self.cluster = cluster
        self.spec = spec
        self.deliver = deliver
        self._ended = ended
        self.label = "Ray actor"
        self.sandbox = {
            "bubblewrap": False,
            "network": True,
            "read_only_root": False,
            "private_tmp": False,
            "seccomp": False,
            "host_user": None,
            "limits": "ray",
            "memory": spec.memory_text,
            "pids": None,
            "cpu": spec.cpus,
        }
        self._actor: Any = None
        self._flow: dict[str, asyncio.Event] = {}  # cleared while a session is paused
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gone = False
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Create the actor (Ray builds its environment) and load the model in it."""
        options: dict[str, Any] = {
            "runtime_env": self._runtime_env(),
            "max_restarts": 0,  # the runner restarts workers, with its crash-loop rule
            "max_concurrency": 10_000,  # sessions are tasks on the actor's event loop
        }
        if self.spec.cpus is not None:
            options["num_cpus"] = self.spec.cpus
        if self.spec.memory_bytes is not None:
            options["memory"] = self.spec.memory_bytes
        actor_class = self.cluster.actor_class

        def create() -> Any:
            options["runtime_env"] = upload(options["runtime_env"])
            return actor_class.options(**options).remote(self.spec.name, self.spec.revision)

        # Packing and uploading the model directory (once per content) is blocking work.
        self._actor = await asyncio.to_thread(create)
        self.label = f"Ray actor {self._actor._actor_id.hex()[:12]}"
        self._track(self._follow())
        self._track(self._load())

    def _runtime_env(self) -> dict[str, Any]:
        model_dir = self.spec.model_dir
        environment: dict[str, Any] = {
            "working_dir": str(model_dir),
            "py_modules": [str(PACKAGE_DIR)],
            "excludes": EXCLUDES,
            "env_vars": dict(self.cluster.env_vars),
        }
        packages = requirements(model_dir / "requirements.txt")
        if packages:
            environment["pip"] = {
                "packages": packages,
                "pip_check": False,
                "pip_install_options": PIP_OPTIONS,
            }
        return environment

    async def _load(self) -> None:
        import ray

        try:
            wire = await self._actor.load.remote(self.spec.config, self.spec.python_version)
            pid = await self._actor.pid.remote()
        except ray.exceptions.RuntimeEnvSetupError as exc:
            self.deliver(
                LoadFailed(
                    f"requirements.txt: Ray could not build the model's environment: "
                    f"{_pip_error(exc)}",
                    str(exc),
                )
            )
            return
        except ray.exceptions.RayActorError as exc:
            self._lost(exc)
            return
        except ray.exceptions.RayError as exc:
            self.deliver(LoadFailed(f"Ray: loading the model failed: {first_line(exc)}", str(exc)))
            return
        self.label = f"{self.label} (pid {pid})"
        self._receive(wire)

    async def _follow(self) -> None:
        """The actor's printed lines into the server log, until it dies."""
        import ray

        try:
            async for ref in self._actor.follow.options(num_returns="streaming").remote():
                for stream, line in await ref:
                    log_output(self.spec.name, self.label, stream, str(line))
        except ray.exceptions.RayError as exc:
            self._lost(exc)
        else:
            self._lost(None)

    def _track(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lost(self, exc: BaseException | None) -> None:
        """The actor is gone: reported once, unless we closed it."""
        if self._gone:
            return
        self._gone = True
        if not self._closing:
            self._ended(LinkEnd(_death(exc)))

    def kill(self) -> None:
        """End the actor now; its death is reported as the link's end."""
        if self._actor is not None:
            import ray

            ray.kill(self._actor, no_restart=True)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._actor is not None:
            import ray

            ray.kill(self._actor, no_restart=True)

    def oom_kills(self) -> int:
        return 0  # Ray's memory monitor, not ours, kills for memory there

    def memory_breached(self, since: int | None = None) -> bool:
        return False

    # ------------------------------------------------------------------ messages
    def send(self, message: ServerMessage) -> None:
        """Each message becomes its actor call here and now, so calls reach the actor in
        the order the runner sent them; their answers are awaited in tasks."""
        if self._actor is None or self._gone:
            return
        if isinstance(message, Turn):
            method = self._actor.turn.options(
                num_returns="streaming", _generator_backpressure_num_objects=BACKPRESSURE_ITEMS
            )
            flow = self._flow.setdefault(message.sid, asyncio.Event())
            flow.set()
            self._track(self._stream(method.remote(to_list(message)), flow))
        elif isinstance(message, (Start, End, Ping)):
            self._track(self._answer(message, self._actor.call.remote(to_list(message))))
        elif isinstance(message, Cancel):
            self._actor.cancel.remote(to_list(message))
        elif isinstance(message, Pause):
            self._flow.setdefault(message.sid, asyncio.Event()).clear()
        elif isinstance(message, Resume):
            self._flow.setdefault(message.sid, asyncio.Event()).set()

    async def _answer(self, message: Start | End | Ping, reply: Any) -> None:
        import ray

        try:
            wire = await reply
        except ray.exceptions.RayActorError as exc:
            self._lost(exc)
            return
        except ray.exceptions.RayError:
            log.exception("model %s: %s failed in its Ray actor", self.spec.name, message)
            self.kill()
            return
        if isinstance(message, End):
            self._flow.pop(message.sid, None)
        self._receive(wire)

    async def _stream(self, items: Any, flow: asyncio.Event) -> None:
        """Deliver one turn's streamed messages; while its session is paused, stop pulling
        (Ray then stops the actor's generator a few items ahead)."""
        import ray

        decoder = ipc.FrameDecoder()
        deliver = self.deliver
        try:
            async for ref in items:
                try:
                    messages = decoder.feed(await ref)
                except ipc.ChannelError as exc:
                    log.error("model %s: its actor sent garbage (%s)", self.spec.name, exc)
                    self.kill()
                    return
                for message in messages:
                    deliver(cast(WorkerMessage, message))
                if not flow.is_set():
                    await flow.wait()
        except ray.exceptions.RayActorError as exc:
            self._lost(exc)
        except ray.exceptions.RayError:
            log.exception("model %s: a turn failed in its Ray actor", self.spec.name)
            self.kill()

    def _receive(self, wire: Any) -> None:
        """An answer the actor returned, as the message it stands for."""
        try:
            message = from_list(wire)
        except MessageError as exc:
            log.error("model %s: its actor answered garbage (%s)", self.spec.name, exc)
            self.kill()
            return
        self.deliver(cast(WorkerMessage, message))


def upload(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """``runtime_env`` with its local ``working_dir`` and ``py_modules`` packed and stored
    in the cluster (content-addressed, so an unchanged directory is not sent again), as
    ``ray.init`` does for a job's: an actor's options take only such URIs."""
    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    scratch = tempfile.gettempdir()
    runtime_env = upload_py_modules_if_needed(runtime_env, True, scratch, log)
    runtime_env = upload_working_dir_if_needed(runtime_env, True, scratch, log)
    runtime_env.pop("excludes", None)
    return runtime_env


def requirements(path: Path) -> list[str]:
    """requirements.txt's lines, comments and blanks left out (none if there is no file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = (line.split(" #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (Ray's run to pages), at most 300 characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _pip_error(exc: BaseException) -> str:
    """pip's own ERROR lines out of Ray's long report, else its first line."""
    errors = [line.strip() for line in str(exc).splitlines() if "ERROR:" in line]
    return " ".join(errors)[:500] if errors else first_line(exc)


_EXIT_DETAIL: Final = re.compile(r"Worker exit detail: (.+?)(?:\.\s|\n|$)")


def _death(exc: BaseException | None) -> str:
    """Why an actor ended, in a line: Ray's exit detail when it gives one."""
    if exc is None:
        return "the Ray actor's follow call ended"
    found = _EXIT_DETAIL.search(str(exc))
    detail = found.group(1) if found else first_line(exc)
    return f"the Ray actor died ({type(exc).__name__}: {detail})"
