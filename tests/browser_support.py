"""What the browser tests share besides their fixtures (``browser`` and ``page``, in
conftest.py): screenshots, and a record of every WebSocket frame the page sends and gets
(shown when a test fails)."""

from __future__ import annotations

import json
import re
from typing import Any

from conftest import OUTPUT_DIR
from playwright.sync_api import Locator, Page, WebSocket, expect

SHOTS = OUTPUT_DIR / "screenshots"


def replies(page: Page) -> Locator:
    return page.locator(".message.assistant")


def finished_reply(page: Page, index: int = -1) -> Locator:
    """The reply at ``index`` once its turn is over."""
    reply = replies(page).nth(index)
    expect(reply).to_have_attribute("data-reason", re.compile(".+"), timeout=15000)
    return reply


def screenshot(page: Page, name: str) -> None:
    """Keep a picture of a moment inside a scenario (the end is kept by the fixture)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


class Wire:
    """Every frame of every WebSocket the page opens, in order, per socket: ("in" or "out",
    the parsed frame); shown in failure messages, so that a failure says what the page got."""

    def __init__(self, page: Page) -> None:
        self.sockets: list[tuple[WebSocket, list[tuple[str, Any]]]] = []
        page.on("websocket", self._opened)

    def _opened(self, socket: WebSocket) -> None:
        frames: list[tuple[str, Any]] = []
        self.sockets.append((socket, frames))
        socket.on("framereceived", lambda payload: frames.append(("in", self._parse(payload))))
        socket.on("framesent", lambda payload: frames.append(("out", self._parse(payload))))

    @staticmethod
    def _parse(payload: str | bytes) -> Any:
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def received(self, kind: str) -> list[dict[str, Any]]:
        return self._frames("in", kind)

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return self._frames("out", kind)

    def _frames(self, way: str, kind: str) -> list[dict[str, Any]]:
        return [
            frame
            for _, frames in self.sockets
            for went, frame in frames
            if went == way and isinstance(frame, dict) and frame.get("type") == kind
        ]

    @property
    def sessions(self) -> int:
        """How many times the page got a session: a ``ready`` or a ``resumed``."""
        return len(self.received("ready")) + len(self.received("resumed"))

    @property
    def session_id(self) -> str:
        ready = self.received("ready")
        assert ready, f"the page got no ready frame:\n{self}"
        return str(ready[0]["session_id"])

    def __str__(self) -> str:
        """Each socket's frames, chunks run together (a reply is hundreds of them)."""
        lines = []
        for number, (_, frames) in enumerate(self.sockets):
            lines.append(f"socket {number}:")
            chunks: list[str] = []
            for went, frame in [*frames, ("", None)]:
                if isinstance(frame, dict) and frame.get("type") == "chunk" and went == "in":
                    chunks.append(f"{frame.get('seq')}:{frame.get('content')!r}")
                    continue
                if chunks:
                    lines.append(f"  in  {len(chunks)} chunks {chunks[0]} … {chunks[-1]}")
                    chunks = []
                if frame is not None:
                    lines.append(f"  {went:<3} {json.dumps(frame)[:300]}")
        return "\n".join(lines)
