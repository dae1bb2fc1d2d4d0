"""Reports what it does with events: status lines, nested steps, its own events, and the
mistakes a model can make with them (answers what it was asked, by its first word)."""

import asyncio
import time

from ws_server import AnythingBaseModel, EventError


class Eventful(AnythingBaseModel):
    """Test model: ``steps``, ``mistakes``, ``open``, ``big``, ``sync``."""

    async def on_chat_messages(self, messages):
        command = messages[-1]["content"].split()[0]
        if command == "sync":
            for chunk in self._sync():
                yield chunk
            return
        if command == "syncsteps":
            for chunk in self._sync_steps():
                yield chunk
            return
        if command == "parallel":
            with self.step("plan"):

                async def tool(name):
                    with self.step(name):
                        await asyncio.sleep(0.01)
                        with self.step(name + "-inner"):
                            await asyncio.sleep(0.01)

                await asyncio.gather(tool("a"), tool("b"))
            yield "ok"
            return
        if command == "steps":
            self.status("thinking")
            yield "a"
            with self.step("plan", input={"goal": "answer"}) as plan:
                with self.step("tool", input="2+2") as tool:
                    tool.output = 4
                plan.output = "<b>done</b>"
            self.emit("custom", value=1, name="not the event's name")
            yield "b"
        elif command == "mistakes":
            problems = []
            try:
                self.emit("bad", value=object())
            except EventError as exc:
                problems.append(str(exc))
            try:
                self.emit("big", text="x" * 70_000)
            except EventError as exc:
                problems.append(str(exc))
            step = self.step("twice")
            with step:
                pass
            try:
                step.close()
            except EventError as exc:
                problems.append(str(exc))
            for bad in ({"value": float("nan")}, None):
                try:
                    if bad is None:
                        self.emit("queued", position=1)
                    else:
                        self.emit("nan", **bad)
                except EventError as exc:
                    problems.append(str(exc))
            try:
                with self.step("huge", input="x" * 70_000):
                    pass
            except EventError as exc:
                problems.append(str(exc))
            with self.step("after") as after:
                after.output = "parent is none"
            yield " | ".join(problems)
        elif command == "flood":
            sent = 0
            try:
                for _ in range(200):
                    self.emit("blob", text="y" * 60_000)
                    sent += 1
            except EventError as exc:
                yield f"{sent} sent; {exc}"
        elif command == "hang":
            with self.step("long"):
                yield "started"
                await asyncio.sleep(30)
        elif command == "open":
            self.step("left open", input=1).open()
            yield "leaving a step open"
        elif command == "raises":
            with self.step("doomed"):
                yield "before"
                raise RuntimeError("the step fails")

    def _sync(self):
        # A plain generator runs in a pool thread: its events still come in order.
        for index in range(3):
            self.status(f"working {index}")
            time.sleep(0.01)
            yield str(index)

    def _sync_steps(self):
        # Steps held open across yields, each next() in whatever pool thread is free.
        with self.step("outer"):
            yield "x"
            time.sleep(0.01)
            with self.step("inner"):
                yield "y"
