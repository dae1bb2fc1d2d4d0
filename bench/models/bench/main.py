"""Benchmark model: the message {"chunks": N, "size": S} makes it yield N chunks of S chars."""

import json
from collections.abc import AsyncIterator

from ws_server import AnythingBaseModel


class Bench(AnythingBaseModel):
    """Yields N chunks of S characters, as fast as the server takes them."""

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        request = json.loads(messages[-1]["content"])
        chunk = "x" * int(request["size"])
        for _ in range(int(request["chunks"])):
            yield chunk
