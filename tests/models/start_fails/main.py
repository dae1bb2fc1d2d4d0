from ws_server import AnythingBaseModel


class StartFails(AnythingBaseModel):
    async def on_chat_start(self):
        raise ValueError("cannot start: SECRET-START")

    async def on_chat_messages(self, messages):
        yield "never"
