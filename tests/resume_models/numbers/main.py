"""Numbered chunks, so that the resume tests can drop connections mid-reply and check that
every chunk arrived exactly once and in order."""

import asyncio

from ws_server import AnythingBaseModel


class Numbers(AnythingBaseModel):
    """``count N [PAUSE]``: the chunks ``1 `` … ``N `` with PAUSE seconds between them
    (default none, so a turn runs at full speed); ``wait S``: nothing for S seconds, then
    ``waited`` (a model thinking before its first token); ``recall``: the user messages
    so far; anything else is echoed."""

    async def on_chat_messages(self, messages):
        words = messages[-1]["content"].split()
        if words and words[0] == "count":
            pause = float(words[2]) if len(words) > 2 else 0.0
            for number in range(1, int(words[1]) + 1):
                yield f"{number} "
                await asyncio.sleep(pause)
        elif words and words[0] == "wait":
            await asyncio.sleep(float(words[1]))
            yield "waited"
        elif words == ["recall"]:
            said = [m["content"] for m in messages if m["role"] == "user"]
            yield f"You said {len(said)} things: " + " | ".join(said)
        else:
            yield messages[-1]["content"]
