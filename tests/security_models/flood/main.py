from ws_server import AnythingBaseModel


class Flood(AnythingBaseModel):
    """Yields 64 KiB chunks as fast as it may, forever: a client that stops reading must
    pause it rather than make the server buffer."""

    async def on_chat_messages(self, messages):
        block = "x" * 65536
        while True:
            yield block
