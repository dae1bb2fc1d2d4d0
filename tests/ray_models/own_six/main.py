"""Streams the version of six it imports: requirements.txt pins one that the server's own
environment does not have, so the answer shows which environment the model runs in."""

import six

from ws_server import AnythingBaseModel


class OwnSix(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield "six "
        yield six.__version__
