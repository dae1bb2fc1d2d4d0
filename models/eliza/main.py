"""ELIZA: the 1966 Rogerian psychotherapist, offline and streaming, with a memory."""

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ws_server import AnythingBaseModel

REFLECTIONS = {
    "am": "are",
    "was": "were",
    "i": "you",
    "i'd": "you would",
    "i've": "you have",
    "i'll": "you will",
    "my": "your",
    "are": "am",
    "you've": "I have",
    "you'll": "I will",
    "your": "my",
    "yours": "mine",
    "you": "me",
    "me": "you",
    "myself": "yourself",
    "yourself": "myself",
    "i'm": "you are",
    "you're": "I am",
}


class Rule:
    """One compiled pattern with its answer templates."""

    def __init__(self, pattern: str, answers: list[str]) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE)
        self.answers = answers


class Eliza(AnythingBaseModel):
    """ELIZA, the classic 1966 therapist bot. Tell it how you feel; it remembers your name.

    Its rules load once per model version (``load_resources``), not once per chat.
    """

    @classmethod
    def load_resources(cls, model_dir: Path, config: dict[str, Any]) -> list[Rule]:
        # The heavy part (here: reading and compiling the rule set) runs once per version
        # and is shared by every session as self.resources.
        raw = json.loads((model_dir / "data" / "rules.json").read_text(encoding="utf-8"))
        return [Rule(item["pattern"], item["answers"]) for item in raw]

    async def on_chat_start(self) -> None:
        seed = self.config.get("parameters", {}).get("seed")
        self.context["random"] = random.Random(seed)
        self.context["name"] = None

    async def on_chat_messages(self, messages: list[dict[str, str]]) -> AsyncIterator[str]:
        reply = self.respond(messages[-1]["content"].strip())
        delay = float(self.config.get("parameters", {}).get("typing_delay", 0))
        for index, word in enumerate(reply.split(" ")):
            yield word if index == 0 else " " + word
            if delay:
                await asyncio.sleep(delay)

    async def on_chat_end(self) -> None:
        self.clear_context()

    def respond(self, text: str) -> str:
        """Pick the first rule that matches and fill its template with reflected words."""
        name_match = re.search(r"\bmy name is (\w+)", text, re.IGNORECASE)
        if name_match:
            self.context["name"] = name_match.group(1).capitalize()
            return f"Nice to meet you, {self.context['name']}. What brings you here today?"
        rng: random.Random = self.context["random"]
        for rule in self.resources:
            match = rule.regex.match(text.rstrip(".!?"))
            if match:
                answer = rng.choice(rule.answers)
                fragments = [reflect(group or "") for group in match.groups()]
                answer = answer.format(*fragments)
                if self.context["name"] and rng.random() < 0.25:
                    answer = f"{self.context['name']}, {answer[0].lower()}{answer[1:]}"
                return answer
        return "Please, go on."


def reflect(fragment: str) -> str:
    """Turn "my job hates me" into "your job hates you"."""
    words = fragment.lower().split()
    return " ".join(REFLECTIONS.get(word, word) for word in words)
