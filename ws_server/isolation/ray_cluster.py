"""The server's connection to a Ray cluster (``serve --ray-address``): made when the first
model placed on Ray needs it, off the event loop and with a time limit, since ``ray.init``
to an address that never answers waits for minutes. A cluster that cannot be reached fails
the models placed on it (``ClusterUnreachable``), never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from ws_server.exceptions import ClusterUnreachable, ModelLoadError
from ws_server.isolation.ray_link import RayActors, first_line

log = logging.getLogger("anything_agent.isolated")

CONNECT_TIMEOUT: Final = 30.0
PROBE_TIMEOUT: Final = 3.0
NAMESPACE: Final = "anything-agent"


class RayCluster:
    """The server's connection to one Ray cluster: made on first use, with a time limit."""

    def __init__(self, address: str, env_vars: dict[str, str] | None = None) -> None:
        self.address = address
        self.env_vars = dict(env_vars or {})  # given to every actor (--sandbox-share)
        self._lock = asyncio.Lock()
        self._attempt: threading.Thread | None = None
        self._finished = asyncio.Event()  # set by the attempt's thread when it returns
        self._failure: BaseException | None = None
        self._connected = False
        self.actor_class: Any = None

    async def actors(self) -> RayActors:
        """Links for workers on this cluster (connecting first, if need be)."""
        await self.connect()
        return RayActors(self)

    async def connect(self) -> None:
        """Connect once; a cluster that cannot be reached is ``ClusterUnreachable`` naming Ray
        and the address, within ``CONNECT_TIMEOUT`` (the server and other models go on)."""
        async with self._lock:
            if self._connected:
                return
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports from us
            # Ray's C++ core would otherwise catch SIGTERM too, printing a stack dump.
            os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
            try:
                import ray
            except ImportError:
                raise ModelLoadError(
                    "Ray: the ray package is not installed next to the server "
                    "(pip install 'anything-agent[ray]')"
                ) from None
            await asyncio.to_thread(self._probe)
            if self._attempt is None or not self._attempt.is_alive():
                self._failure = None
                self._finished = asyncio.Event()
                loop = asyncio.get_running_loop()
                # A thread of its own, not the loop's executor: one that hangs must not
                # hold up the interpreter's exit.
                self._attempt = threading.Thread(
                    target=self._init,
                    args=(lambda: loop.call_soon_threadsafe(self._finished.set),),
                    name="ray-connect",
                    daemon=True,
                )
                self._attempt.start()
            try:
                await asyncio.wait_for(self._finished.wait(), CONNECT_TIMEOUT)
            except TimeoutError:
                raise ClusterUnreachable(
                    f"Ray: no answer from the cluster at {self.address} within "
                    f"{CONNECT_TIMEOUT:g} s (is `ray start --head` running there?)"
                ) from None
            if self._failure is not None:
                raise ClusterUnreachable(
                    f"Ray: cannot connect to the cluster at {self.address}: "
                    f"{first_line(self._failure)}"
                )
            from ws_server.isolation.ray_actor import ModelActor

            self.actor_class = ray.remote(ModelActor)
            self._connected = True
            log.info("connected to the Ray cluster at %s", self.address)

    def _probe(self) -> None:
        """Refused at once rather than after Ray's own retries, when nothing listens."""
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or "://" in self.address:
            return  # "auto", or a ray:// address: Ray's own checks apply
        try:
            with socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT):
                pass
        except OSError as exc:
            raise ClusterUnreachable(
                f"Ray: cannot connect to the cluster at {self.address}: {exc.strerror or exc}"
            ) from None

    def _init(self, finished: Callable[[], object]) -> None:
        import ray

        # In this thread, ray.init leaves the server's SIGTERM handler alone (in the main
        # thread it would put sys.exit there), and says so, which is noise here.
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray._private.worker").setLevel(logging.ERROR)
        try:
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                log_to_driver=False,  # the link logs each model's lines itself
                configure_logging=False,
                ignore_reinit_error=True,
            )
        except BaseException as exc:
            self._failure = exc
        finally:
            with contextlib.suppress(RuntimeError):  # the loop that waited has closed
                finished()

    def disconnect(self) -> None:
        """Leave the cluster (its actors owned by this server end with that)."""
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
