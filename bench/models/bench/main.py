"""Benchmark model: the message {"chunks": N, "size": S} makes it yield N chunks of S chars.

With ``"awaits": true`` it also gives the event loop a turn after each chunk, as a model
streaming from a network API does between pieces (the bench's detached-session mode floods
this way; without it, a chunk the server takes without waiting never lets the loop run).
"""

import asyncio
import json
from collections.abc import AsyncIterator

from ws_server import AnythingBaseModel


class Bench(AnythingBaseModel):
    """Yields N chunks of S characters, as fast as the server takes them."""

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        request = json.loads(messages[-1]["content"])
        chunk = "x" * int(request["size"])
        if request.get("awaits"):
            for _ in range(int(request["chunks"])):
                yield chunk
                await asyncio.sleep(0)
            return
        for _ in range(int(request["chunks"])):
            yield chunk
