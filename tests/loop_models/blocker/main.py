"""Blocks the server's event loop on purpose, as a careless shared model would."""

import time

from ws_server import AnythingBaseModel


class Blocker(AnythingBaseModel):
    """Calls time.sleep(1) inside its async on_chat_messages: a blocking call."""

    async def on_chat_messages(self, messages):
        time.sleep(1)  # noqa: ASYNC251 - the blocking call under test
        yield "woke up"
