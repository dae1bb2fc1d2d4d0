from ws_server import AnythingBaseModel
import asyncio


class Slow(AnythingBaseModel):
    """Yields one chunk, thinks for a while, then yields another."""

    async def on_chat_messages(self, messages):
        yield "first"
        await asyncio.sleep(float(self.config["parameters"]["pause"]))
        yield "second"
