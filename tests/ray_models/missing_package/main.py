"""Its requirements.txt names a package that does not exist: Ray cannot build its
environment, and the model fails with pip's own words."""

from ws_server import AnythingBaseModel


class MissingPackage(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield "unreachable"
