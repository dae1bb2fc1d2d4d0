"""Answers with the turn's parameters as JSON: what the client's ``params`` became."""

import json

from ws_server import AnythingBaseModel


class ParamsEcho(AnythingBaseModel):
    """Test model: replies with its turn's self.params as JSON (null if it has none)."""

    async def on_chat_messages(self, messages):
        yield json.dumps(getattr(self, "params", None), sort_keys=True)
