from ws_server import AnythingBaseModel


class WholeReply(AnythingBaseModel):
    """A coroutine returning one whole string instead of yielding chunks."""

    async def on_chat_messages(self, messages):
        return "whole: " + messages[-1]["content"]
