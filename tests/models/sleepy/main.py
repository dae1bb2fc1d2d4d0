import asyncio

from ws_server import AnythingBaseModel


class Sleepy(AnythingBaseModel):
    """Yields once, then sleeps past its settings.timeout."""

    async def on_chat_messages(self, messages):
        yield "dozing"
        await asyncio.sleep(30)
        yield "never reached"
