"""Holds its slot for the seconds it is sent (0.1 by default), then says which turn ran."""

import asyncio

from ws_server import AnythingBaseModel


class Gated(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        text = messages[-1]["content"]
        try:
            pause = float(text.split()[-1])
        except ValueError:
            pause = 0.1
        yield "running "
        await asyncio.sleep(pause)
        yield text
