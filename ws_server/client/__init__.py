"""Clients of the chat endpoint: the Python API bot frontends use (``connect``, here) and
the terminal client of ``anything-agent chat`` (``client.terminal``), built on it."""

from ws_server.client.chat import (
    DEFAULT_URL,
    ChatClient,
    ResumeNotice,
    Turn,
    chat_url,
    connect,
)

__all__ = ["DEFAULT_URL", "ChatClient", "ResumeNotice", "Turn", "chat_url", "connect"]
