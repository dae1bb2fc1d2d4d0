"""Rules template: a bot answering from a table of patterns and replies, with a memory.

Each rule is a regular expression and the replies to send when it matches: the first rule
whose pattern is found in the message answers. A reply may use the pattern's named groups
({topic}) and {name}, the user's name once they have told it ("my name is Ada"). Add your
own rules to RULES; put the more specific ones first.
"""

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ws_server import AnythingBaseModel

# (pattern, reply, reply while the user's name is unknown)
RULES: list[tuple[str, str, str]] = [
    (
        r"\b(?:my name is|call me)\s+(?P<name>[^\W\d_][\w'-]*)",
        "Nice to meet you, {name}!",
        "Nice to meet you, {name}!",
    ),
    (
        r"\bwhat(?:'s| is) my name\b",
        "Your name is {name}.",
        'You haven\'t told me your name yet. Say "my name is ...".',
    ),
    (r"^(?:hi|hello|hey)\b", "Hello, {name}! What shall we talk about?", "Hello! Who are you?"),
    (r"\b(?:thanks|thank you)\b", "You're welcome, {name}.", "You're welcome."),
    (r"\b(?:bye|goodbye|see you)\b", "Goodbye, {name}!", "Goodbye!"),
    (
        r"\bi (?:like|love) (?P<topic>[^.!?]+)",
        "What do you like most about {topic}, {name}?",
        "What do you like most about {topic}?",
    ),
    (
        r"\bhelp\b",
        "I answer greetings, thanks and goodbyes, and I remember your name.",
        "I answer greetings, thanks and goodbyes. Tell me your name and I'll remember it.",
    ),
]
FALLBACK = 'I have no rule for that yet. Try hello, "my name is ..." or help.'


class RulesModel(AnythingBaseModel):
    """A rules bot: regular expressions and their replies, remembering your name."""

    @classmethod
    def load_resources(cls, model_dir: Path, config: dict[str, Any]) -> list[Any]:
        # Once per model version, not per chat: every session shares the compiled rules.
        return [(re.compile(p, re.IGNORECASE), known, unknown) for p, known, unknown in RULES]

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        text = messages[-1]["content"].strip()
        for pattern, reply, reply_without_name in self.resources:
            found = pattern.search(text)
            if found is None:
                continue
            groups = {key: value.strip() for key, value in found.groupdict().items() if value}
            if "name" in groups:
                self.context["name"] = groups["name"].capitalize()  # this session's memory
            name = self.context.get("name")
            yield (reply if name else reply_without_name).format(**{**groups, "name": name})
            return
        yield FALLBACK
