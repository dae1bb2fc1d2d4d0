from ws_server import AnythingBaseModel

class M(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield "x"
