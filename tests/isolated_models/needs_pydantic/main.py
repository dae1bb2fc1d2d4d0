import pydantic

from ws_server import AnythingBaseModel


class NeedsPydantic(AnythingBaseModel):
    """Imports pydantic: works isolated only once requirements.txt lists it."""

    async def on_chat_messages(self, messages):
        yield "pydantic " + pydantic.VERSION.split(".")[0]
