import helpers
from . import helpers as same_helpers

from ws_server import AnythingBaseModel


class UsesHelpers(AnythingBaseModel):
    """Imports a sibling module both ways."""

    async def on_chat_messages(self, messages):
        yield helpers.shout(messages[-1]["content"])
        yield " " + same_helpers.shout("again")
