import os

from ws_server import AnythingBaseModel


class Crasher(AnythingBaseModel):
    """Kills its own worker when asked."""

    async def on_chat_messages(self, messages):
        if messages[-1]["content"] == "crash":
            os._exit(3)
        yield "alive"
