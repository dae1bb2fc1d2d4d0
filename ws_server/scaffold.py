"""``anything-agent new NAME``: a model directory that runs as generated."""

from __future__ import annotations

from pathlib import Path

from ws_server.exceptions import SettingsError
from ws_server.registry.config import NAME_PATTERN, NAME_RULE

MAIN_TEMPLATE = '''\
"""{title}: describe what this model does; the model list shows this text."""

from collections.abc import AsyncIterator

from ws_server import AnythingBaseModel


class {class_name}(AnythingBaseModel):
    """{title}: replies to every message, streaming it back a word at a time."""

    async def on_chat_start(self) -> None:
        # One instance per chat session: self.context belongs to this conversation.
        self.context["turns"] = 0

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        self.context["turns"] += 1
        greeting = self.config.get("parameters", {{}}).get("greeting", "You said:")
        yield greeting
        for word in messages[-1]["content"].split():
            yield " " + word

    async def on_chat_end(self) -> None:
        self.clear_context()
'''

CONFIG_TEMPLATE = """\
# {name}: see the config.yaml reference in the README.
name: {name}
version: 0.1.0
description: {title}, made with `anything-agent new`.

parameters:
  greeting: "You said:"

settings:
  timeout: 60   # seconds a turn may run before it ends with `timeout`
"""


def create_model(models_dir: Path, name: str) -> Path:
    """Write ``models_dir/name`` with main.py, config.yaml and data/; never overwrite."""
    if not NAME_PATTERN.match(name):
        raise SettingsError(f"model name {name!r} breaks the naming rule: {NAME_RULE}")
    target = models_dir / name
    if target.exists():
        raise SettingsError(f"{target} already exists; pick another name or remove it")
    title = name.replace("_", " ").capitalize()
    class_name = "".join(part.capitalize() for part in name.split("_")) + "Model"
    (target / "data").mkdir(parents=True)
    (target / "main.py").write_text(MAIN_TEMPLATE.format(title=title, class_name=class_name))
    (target / "config.yaml").write_text(CONFIG_TEMPLATE.format(name=name, title=title))
    (target / "data" / ".gitkeep").write_text("")
    return target
