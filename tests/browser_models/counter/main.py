"""Streams numbered chunks slowly, so that a test can cut or reload mid-reply and check that
each arrived exactly once."""

import asyncio

from ws_server import AnythingBaseModel

CHUNKS = 40
PAUSE = 0.05  # seconds between chunks: the whole reply takes 2 s


class Counter(AnythingBaseModel):
    """`count`: <1><2>…<40>, one chunk each (`count N`: up to N); `recall`: the user
    messages so far; anything else is echoed."""

    async def on_chat_messages(self, messages):
        command = messages[-1]["content"].strip()
        words = command.split()
        if words[:1] == ["count"]:
            last = int(words[1]) if len(words) > 1 else CHUNKS
            for number in range(1, last + 1):
                yield f"<{number}>"
                await asyncio.sleep(PAUSE)
        elif command == "recall":
            said = [m["content"] for m in messages if m["role"] == "user"]
            yield f"You said {len(said)} things: " + " | ".join(said)
        else:
            yield command
