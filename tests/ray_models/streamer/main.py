"""A model for the Ray placement's tests: tells its pid, streams slowly, records its
``finally`` in $MODEL_TEST_EVENTS, and prints to stdout (which reaches the server log)."""

import asyncio
import json
import os
from pathlib import Path

from ws_server import AnythingBaseModel

print("streamer loaded in pid", os.getpid(), flush=True)


class Streamer(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        command = messages[-1]["content"]
        if command == "pid":
            yield str(os.getpid())
        elif command == "history":
            yield json.dumps([m["content"] for m in messages])
        elif command.startswith("stream "):
            try:
                for index in range(int(command.split()[1])):
                    yield f"{index} "
                    await asyncio.sleep(0.05)
            finally:
                marker = Path(os.environ["MODEL_TEST_EVENTS"]) / f"closed-{os.getpid()}"
                marker.write_text("finally ran")
        else:
            yield "echo: " + command
