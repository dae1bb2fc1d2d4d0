"""Reports what it does besides text: a status, a step with a nested step (whose output
is markup, to be shown as text), a custom event, and its answer around them. With
``params`` ``{"pause": S}`` it waits S seconds inside the outer step, after the nested one
ended (so a client can drop, reload or resume while a step runs)."""

import asyncio

from ws_server import AnythingBaseModel


class AgentEvents(AnythingBaseModel):
    """Test model: status, nested steps and a custom event around an echoed answer."""

    async def on_chat_messages(self, messages):
        last = messages[-1]["content"]
        self.status("thinking")
        with self.step("search", input={"q": last}) as s:
            with self.step("fetch", input="https://example.invalid/x") as f:
                f.output = "<b>not bold</b>"
            pause = self.params.get("pause") if isinstance(self.params, dict) else None
            if isinstance(pause, (int, float)) and pause > 0:
                await asyncio.sleep(pause)
            s.output = "found 2"
        yield "Answer: "
        yield last
        self.emit("custom", value=1)
        yield "done"
