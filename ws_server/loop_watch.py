"""Notices an event loop blocked by a model, and says which model and session did it.

A shared model runs on the server's event loop: an ``async`` hook that blocks
(``time.sleep``, a synchronous HTTP call, a long computation) stalls every shared
session, not only its own. The loop bumps a heartbeat every ``BEAT`` seconds; a watchdog
thread that finds the next beat over ``BLOCKED_AFTER`` seconds late logs a warning naming
the task the loop is stuck in (sessions label their tasks with model and session) and
the line its code is on. Nothing is done per chunk: a timer callback every ``BEAT`` on the
loop, and a label per session and per turn.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any, Final

log = logging.getLogger("anything_agent.loop_watch")

BLOCKED_AFTER: Final = 0.5  # seconds the loop may be stuck before it is reported
BEAT: Final = 0.1  # seconds between heartbeats, and between the watchdog's checks

# Who runs in a task: its name, "model=M@V session=S" (a name costs nothing per turn,
# where a weak mapping from tasks to owners cost a weak reference and its callback).
OWNER_PREFIX: Final = "model="


def attribute(task: asyncio.Task[Any], owner: str) -> None:
    """Name who runs in ``task`` (``owner`` starts with ``OWNER_PREFIX``), for the warning
    if it ever blocks the loop."""
    task.set_name(owner)


class LoopWatch:
    """A heartbeat on the loop and a thread that warns when it stops beating."""

    def __init__(self, loop: asyncio.AbstractEventLoop, blocked_after: float = BLOCKED_AFTER):
        self._loop = loop
        self._blocked_after = blocked_after
        self._beat_at = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = 0

    def start(self) -> None:
        """Start beating and watching; call it on the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._beat()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    def _beat(self) -> None:
        self._beat_at = time.monotonic()
        self._timer = self._loop.call_later(BEAT, self._beat)

    def _watch(self) -> None:
        """The watchdog thread: one warning per stall, once one task is seen stuck in it
        at two checks in a row (a loop merely busy with many callbacks blames nobody)."""
        reported_beat: float | None = None  # the beat the stall reported began after
        culprit = ""
        suspect: asyncio.Task[Any] | None = None
        while not self._stopped.wait(BEAT):
            beat_at = self._beat_at
            late = time.monotonic() - beat_at - BEAT
            if reported_beat is not None and beat_at != reported_beat:
                stall = beat_at - reported_beat  # the block and up to one BEAT before it
                log.info(
                    "event loop running again after about %.1f s, blocked by %s", stall, culprit
                )
                reported_beat = None
            if late <= self._blocked_after / 2:
                suspect = None
                continue
            task = asyncio.current_task(self._loop)
            if reported_beat is None and late > self._blocked_after and task is suspect:
                reported_beat, culprit = beat_at, self._describe(task)
                log.warning(
                    "event loop blocked (%.1f s so far) by %s: every shared session stalls "
                    "meanwhile; blocking code belongs in a thread (a plain generator, "
                    "asyncio.to_thread) or in an isolated model",
                    late,
                    culprit,
                )
            suspect = task

    def _describe(self, task: asyncio.Task[Any] | None) -> str:
        """Who is running (the task's owner, or the task) and where its code is."""
        if task is None:
            owner = "a callback"
        else:
            name = task.get_name()
            owner = name if name.startswith(OWNER_PREFIX) else f"task {name}"
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return owner
        code = frame.f_code
        return f"{owner} at {code.co_filename}:{frame.f_lineno} in {code.co_name}"
