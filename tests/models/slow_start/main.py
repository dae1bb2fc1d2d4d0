"""on_chat_start takes long; records whether it finished or was cancelled."""

import asyncio
import os
from pathlib import Path

from ws_server import AnythingBaseModel


class SlowStart(AnythingBaseModel):
    def record(self, event: str) -> None:
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        tag = self.config["parameters"]["tag"]
        with open(folder / f"slow_start-{tag}.log", "a") as log:
            log.write(event + "\n")

    async def on_chat_start(self):
        self.record("start-begun")
        try:
            await asyncio.sleep(float(self.config["parameters"]["pause"]))
        except asyncio.CancelledError:
            self.record("start-cancelled")
            raise
        self.record("start-done")

    async def on_chat_messages(self, messages):
        yield "started"

    async def on_chat_end(self):
        self.record("end")
