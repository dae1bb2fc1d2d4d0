"""Records every hook call so tests can check their order; answers commands."""

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from ws_server import AnythingBaseModel


class Recorder(AnythingBaseModel):
    """Test model: writes hook events to $MODEL_TEST_EVENTS/<instance>.log."""

    @classmethod
    def load_resources(cls, model_dir, config):
        return {"load_id": uuid.uuid4().hex}

    def record(self, event: str) -> None:
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        with open(folder / f"{self.context['instance']}.log", "a") as log:
            log.write(event + "\n")

    async def on_chat_start(self) -> None:
        self.context["instance"] = uuid.uuid4().hex
        self.context["turns"] = 0
        self.record("start")

    async def on_chat_messages(self, messages) -> AsyncIterator[str]:
        self.context["turns"] += 1
        self.record("messages")
        command = messages[-1]["content"]
        if command == "state":
            yield json.dumps({
                "instance": self.context["instance"],
                "load_id": self.resources["load_id"],
                "turns": self.context["turns"],
                "messages": messages,
                "parameters": self.config.get("parameters", {}),
                "settings": self.config.get("settings", {}),
            })
            return
        if command.startswith("stream"):
            # "stream N": N numbered chunks 50 ms apart; records when the generator closes.
            count = int(command.split()[1]) if " " in command else 100
            try:
                for index in range(count):
                    yield f"{index} "
                    await asyncio.sleep(0.05)
            finally:
                self.record("generator-closed")
            return
        yield "ok"

    async def on_chat_end(self) -> None:
        self.record("end")
