"""Answers the browser tests' commands with replies that exercise the page's rendering."""

import asyncio

from ws_server import AnythingBaseModel

CODE_REPLY = [
    "Here is the function:\n\n",
    "```python\n",
    "def greet(name):\n",
    '    return f"Hello, {name}!"\n',
    "```\n",
    "Call it with `greet(\"Ada\")`.",
]
HOSTILE_REPLY = [
    '<img src=x onerror="window.injected = true">',
    " and <script>window.injected = true</script>",
    " and <b>not bold</b>",
]


class Scripted(AnythingBaseModel):
    """`code`, `html`, `long`, `boom`, `recall`; anything else is echoed."""

    async def on_chat_messages(self, messages):
        command = messages[-1]["content"].strip()
        if command == "code":
            for piece in CODE_REPLY:
                yield piece
        elif command == "html":
            for piece in HOSTILE_REPLY:
                yield piece
        elif command == "long":
            for number in range(1, 400):
                yield f"word{number} "
                await asyncio.sleep(0.05)
        elif command == "boom":
            yield "Starting… "
            raise RuntimeError("the database password is hunter2")
        elif command == "recall":
            said = [m["content"] for m in messages if m["role"] == "user"]
            yield f"You said {len(said)} things: " + " | ".join(said)
        else:
            yield command
