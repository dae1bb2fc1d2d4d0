"""A turn whose generator needs a second to clean up in its finally."""

import asyncio
import os
import uuid
from pathlib import Path

from ws_server import AnythingBaseModel


class Cleanup(AnythingBaseModel):
    def record(self, event: str) -> None:
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        with open(folder / f"{self.context['instance']}.log", "a") as log:
            log.write(event + "\n")

    async def on_chat_start(self):
        self.context["instance"] = uuid.uuid4().hex

    async def on_chat_messages(self, messages):
        if messages[-1]["content"] == "id":
            yield self.context["instance"]
            return
        yield "working"
        try:
            await asyncio.sleep(30)
        finally:
            try:
                await asyncio.sleep(1)
                self.record("cleanup-done")
            except asyncio.CancelledError:
                self.record("cleanup-interrupted")
                raise
