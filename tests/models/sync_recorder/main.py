"""A blocking (sync) generator that records its steps, its closing and on_chat_end."""

import os
import time
import uuid
from pathlib import Path

from ws_server import AnythingBaseModel


class SyncRecorder(AnythingBaseModel):
    def record(self, event: str) -> None:
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        with open(folder / f"{self.context['instance']}.log", "a") as log:
            log.write(event + "\n")

    def on_chat_start(self):
        self.context["instance"] = uuid.uuid4().hex
        self.record("start")

    def on_chat_messages(self, messages):
        if messages[-1]["content"] == "id":
            yield self.context["instance"]
            return
        self.record("messages")
        try:
            for index in range(50):
                yield f"{index} "
                time.sleep(0.3)  # blocking, cannot be interrupted
                self.record(f"step-{index}-done")
        finally:
            self.record("generator-closed")

    def on_chat_end(self):
        self.record("end")
