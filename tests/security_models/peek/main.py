import json
import os

from ws_server import AnythingBaseModel


class Peek(AnythingBaseModel):
    """Reports what a model can see of its own process: open descriptors, argv."""

    async def on_chat_messages(self, messages):
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        yield json.dumps({"fds": fds, "secret_length": len(self.config["secrets"]["token"])})
