"""Echo: streams your last message back to you, one word per chunk."""

import asyncio
from collections.abc import AsyncIterator

from ws_server import AnythingBaseModel


class Echo(AnythingBaseModel):
    """Streams your last message back to you, word by word.

    Handy for checking a client: every word arrives as its own chunk frame.
    """

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        delay = float(self.config.get("parameters", {}).get("delay", 0))
        words = messages[-1]["content"].split(" ")
        for index, word in enumerate(words):
            yield word if index == 0 else " " + word
            if delay:
                await asyncio.sleep(delay)
