"""Counts: ``count N [DELAY]`` yields "0 ", "1 ", ... "N-1 " (DELAY seconds apart, 0 by
default); ``flood N`` yields N chunks without ever awaiting; ``forever [PAUSE]`` yields
"start ", waits PAUSE seconds, then yields numbered chunks as fast as it can until
stopped, recording how far it got. Hook calls are recorded in
$MODEL_TEST_EVENTS/counter-<instance>.log."""

import asyncio
import os
import uuid
from pathlib import Path

from ws_server import AnythingBaseModel


class Counter(AnythingBaseModel):
    def record(self, event):
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        with open(folder / f"counter-{self.context['instance']}.log", "a") as log:
            log.write(event + "\n")

    async def on_chat_start(self):
        self.context["instance"] = uuid.uuid4().hex
        self.record("start")

    async def on_chat_messages(self, messages):
        command, *arguments = messages[-1]["content"].split()
        self.record(f"instance {self.context['instance']}")
        if command == "count":
            delay = float(arguments[1]) if len(arguments) > 1 else 0.0
            for index in range(int(arguments[0])):
                yield f"{index} "
                if delay:
                    await asyncio.sleep(delay)
                elif index % 50 == 0:
                    await asyncio.sleep(0)
            return
        if command == "flood":  # "flood N": N chunks, never awaiting between them
            for index in range(int(arguments[0])):
                yield f"{index} "
            return
        if command == "forever":  # "forever [PAUSE]": one chunk, PAUSE s, then a flood
            index = 0
            yield "start "
            await asyncio.sleep(float(arguments[0]) if arguments else 0.0)
            try:
                while True:
                    yield f"{index:06d} "
                    index += 1
                    if index % 100 == 0:
                        await asyncio.sleep(0)
            finally:
                self.record(f"stopped at {index}")
            return
        yield "ok"

    async def on_chat_end(self):
        self.record("end")
