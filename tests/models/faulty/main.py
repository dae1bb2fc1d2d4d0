import asyncio

from ws_server import AnythingBaseModel


class Faulty(AnythingBaseModel):
    """Raises mid-turn when asked to, with a secret in the exception message."""

    async def on_chat_messages(self, messages):
        if messages[-1]["content"] == "boom":
            yield "partial"
            raise RuntimeError("SECRET-TOKEN-123 leaked database password")
        if messages[-1]["content"] == "selfcancel":
            yield "before"
            raise asyncio.CancelledError("the model's own")
        if messages[-1]["content"] == "number":
            yield 42
        yield "fine"
