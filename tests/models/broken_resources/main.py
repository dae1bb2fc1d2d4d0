from ws_server import AnythingBaseModel


class BrokenResources(AnythingBaseModel):
    @classmethod
    def load_resources(cls, model_dir, config):
        raise FileNotFoundError("weights.bin missing at SECRET-PATH")

    async def on_chat_messages(self, messages):
        yield "x"
