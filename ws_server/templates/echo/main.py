"""Echo template: the smallest model to start from. Replace the reply with your own."""

from collections.abc import AsyncIterator

from ws_server import AnythingBaseModel


class EchoModel(AnythingBaseModel):
    """Replies to every message, streaming it back a word at a time."""

    async def on_chat_start(self) -> None:
        # One instance per chat session: self.context belongs to this conversation.
        self.context["turns"] = 0

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        self.context["turns"] += 1
        greeting = self.config.get("parameters", {}).get("greeting", "You said:")
        yield greeting
        for word in messages[-1]["content"].split():
            yield " " + word

    async def on_chat_end(self) -> None:
        self.clear_context()
