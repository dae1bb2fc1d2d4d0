"""The model author's API: subclass ``AnythingBaseModel`` in your model's ``main.py``.

Standard library only: isolated workers import this module from their own virtualenv,
which has none of the server's dependencies.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

__version__ = "0.1.0"

__all__ = ["AnythingBaseModel", "Message", "__version__", "context_snapshot"]

CONTEXT_SNAPSHOT_LIMIT = 64 * 1024  # bytes of JSON kept of a session's context

Message = dict[str, Any]
"""One chat message: ``{"role": "user" | "assistant" | "system", "content": "..."}``.

``content`` is always a string. A message whose client sent a list of content parts
holding more than text (an image, a file) also has them, as sent, under ``parts``."""


def context_snapshot(context: dict[Any, Any]) -> dict[str, Any]:
    """The part of ``self.context`` that can move to another node: every entry whose key is
    a string and whose value is JSON, as long as the whole stays under 64 KiB (entries
    past that are left out). A client object or an open file stays behind."""
    kept: dict[str, Any] = {}
    size = 2
    for key, value in list(context.items()):
        if not isinstance(key, str):
            continue
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            continue
        size += len(key) + len(text) + 4
        if size > CONTEXT_SNAPSHOT_LIMIT:
            break
        kept[key] = json.loads(text)
    return kept


class AnythingBaseModel:
    """Base class of every model.

    The server creates one instance per chat session, so ``self.context`` and the hooks
    belong to that conversation. Work that should happen once per model version rather
    than once per session (loading weights, building an index) goes in the class method
    ``load_resources``; its return value is available to every session as
    ``self.resources``.

    Hooks, in the order the server calls them:

    * ``on_chat_start()`` once, when a client connects;
    * ``on_chat_messages(messages)`` once per user turn, yielding the reply in chunks;
    * ``on_chat_end()`` exactly once, when the connection goes, whatever the cause.
    """

    config: dict[str, Any]
    """The model's parsed ``config.yaml`` (an empty dict when there is none)."""
    model_dir: Path
    """The model's directory."""
    data_dir: Path
    """``model_dir / "data"``: data files the model reads (vocabularies, weights)."""
    resources: Any
    """What ``load_resources`` returned for this model version (``None`` by default)."""
    context: dict[str, Any]
    """Per-session scratch space; ``clear_context()`` empties it."""
    params: dict[str, Any]
    """The client's parameters for the running turn (``temperature``, ``max_tokens``, ...
    or anything the client chose); set before each ``on_chat_messages``, ``{}`` when the
    client sent none."""

    _anything_bound: ClassVar[bool] = False

    def __init__(self) -> None:
        # Subclasses may define __init__(self) and call super().__init__(); the
        # attributes bound by the server before __init__ must survive that call.
        if not hasattr(self, "context"):
            self.context = {}
        if not hasattr(self, "config"):
            self.config = {}
        if not hasattr(self, "resources"):
            self.resources = None
        if not hasattr(self, "params"):
            self.params = {}

    # ----------------------------------------------------------------- per version
    @classmethod
    def load_resources(cls, model_dir: Path, config: dict[str, Any]) -> Any:
        """Load what every session of this model version shares; runs once per version.

        Override it (sync or ``async``) to read weights or build an index from
        ``model_dir / "data"``; the return value becomes ``self.resources``. It runs when
        the model is loaded or reloaded, never per session. An exception here marks the
        model ``failed`` with the exception's message.
        """
        return None

    # ----------------------------------------------------------------- per session
    async def on_chat_start(self) -> None:
        """Called once when a chat session opens, before the first turn."""

    def on_chat_messages(self, messages: list[Message]) -> AsyncIterator[str]:
        """Yield the reply to ``messages`` (the whole history, last one the user's).

        Implement it as an ``async`` generator yielding text chunks; each chunk reaches
        the client as its own frame the moment it is yielded. A plain generator (run off
        the event loop) and a coroutine returning one whole string also work.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement on_chat_messages")

    async def on_chat_end(self) -> None:
        """Called exactly once when the session ends: client left, server stopped, or error."""

    def clear_context(self) -> None:
        """Forget everything stored in ``self.context`` for this session."""
        self.context.clear()

    # ----------------------------------------------------------------- framework
    @classmethod
    def description(cls) -> str:
        """The class docstring, cleaned: what the model list shows without a config one."""
        doc = cls.__doc__
        if doc is None or cls.__doc__ == AnythingBaseModel.__doc__:
            return ""
        return inspect.cleandoc(doc)

    @classmethod
    def create_session_instance(
        cls, *, config: dict[str, Any], model_dir: Path, resources: Any
    ) -> AnythingBaseModel:
        """Make the instance for one session with its attributes bound before ``__init__``.

        Binding first means a subclass ``__init__`` can already read ``self.config`` and
        ``self.data_dir``, and one that never calls ``super().__init__()`` still works.
        """
        instance = cls.__new__(cls)
        instance.config = config
        instance.model_dir = model_dir
        instance.data_dir = model_dir / "data"
        instance.resources = resources
        instance.context = {}
        instance.params = {}
        instance.__init__()  # type: ignore[misc]
        return instance
