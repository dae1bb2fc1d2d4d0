"""Banner: your message in big ASCII-art letters, drawn by pyfiglet in its own virtualenv."""

from collections.abc import AsyncIterator

import pyfiglet

from ws_server import AnythingBaseModel


class Banner(AnythingBaseModel):
    """Draws your message in big ASCII-art letters, one line per chunk, inside a ``` code
    block so that chat pages (like the web client) show it in a monospace font.

    Send "/font NAME" to switch font (try slant, small, big, banner3); "/fonts" lists them.
    Runs isolated: pyfiglet lives only in this model's own virtualenv.
    """

    async def on_chat_start(self) -> None:
        self.context["font"] = self.config.get("parameters", {}).get("font", "standard")

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        text = messages[-1]["content"].strip()
        if text == "/fonts":
            yield ", ".join(sorted(pyfiglet.FigletFont.getFonts())[:60]) + ", ..."
            return
        if text.startswith("/font"):
            font = text.removeprefix("/font").strip()
            if font not in pyfiglet.FigletFont.getFonts():
                yield f"No font called {font!r}; send /fonts to see some."
                return
            self.context["font"] = font
            yield f"Font set to {font}."
            return
        art = pyfiglet.figlet_format(text or "hello", font=self.context["font"], width=100)
        yield "```\n"
        for line in art.rstrip().split("\n"):  # no trailing blank lines
            yield line + "\n"
        yield "```"
