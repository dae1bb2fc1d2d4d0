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
    ' and **<img src=x onerror="window.injected = true">**',
    ' and `<img src=x onerror="window.injected = true">`',
    " and javascript:window.injected=true",
    ' and https://x.test/"><img src=x onerror="window.injected=true">',
    " and http://trusted.test@evil.test/login\n",
    '```<img src=x onerror="window.injected = true">\n',
    "<script>window.injected = true</script>\n",
    "```\n",
]
TERMINAL_TRICKS = "title\x1b]0;pwned\x07 cleared\x1b[2J\x1b[H bell\x07 done"


class Scripted(AnythingBaseModel):
    """`code`, `html`, `escapes`, `long`, `stubborn`, `boom`, `recall`; anything else is
    echoed."""

    async def on_chat_messages(self, messages):
        command = messages[-1]["content"].strip()
        if command == "code":
            for piece in CODE_REPLY:
                yield piece
        elif command == "html":
            for piece in HOSTILE_REPLY:
                yield piece
        elif command == "escapes":
            yield TERMINAL_TRICKS
        elif command == "stubborn":
            try:
                yield "holding on"
                await asyncio.sleep(60)
            finally:
                await asyncio.sleep(5)  # a slow cleanup after a cancel
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
