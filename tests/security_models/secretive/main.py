from ws_server import AnythingBaseModel


class Secretive(AnythingBaseModel):
    """Uses its secrets, and leaks them every way a careless model could."""

    async def on_chat_messages(self, messages):
        secrets = self.config["secrets"]
        command = messages[-1]["content"]
        if command == "lengths":
            yield f"api={len(secrets['api_key'])} inline={len(secrets['inline'])}"
        elif command == "leak":
            raise RuntimeError(f"failed with key {secrets['api_key']} and {secrets['inline']}")
        else:
            yield "ok"
