import time

from ws_server import AnythingBaseModel


class SlowLoader(AnythingBaseModel):
    """Takes a few seconds to load its resources, so it is `building` for a while."""

    @classmethod
    def load_resources(cls, model_dir, config):
        time.sleep(float(config["parameters"]["load_seconds"]))
        return "loaded"

    async def on_chat_messages(self, messages):
        yield self.resources
