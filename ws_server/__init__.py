"""AnythingAgent: put any Python model behind a real-time WebSocket chat endpoint.

Model authors import ``AnythingBaseModel`` from here. This module must stay standard-library
only (it is imported inside isolated workers), so the server itself lives in submodules.
"""

from ws_server.sdk import AnythingBaseModel, EventError, Message, Step, __version__

__all__ = ["AnythingBaseModel", "EventError", "Message", "Step", "__version__"]
