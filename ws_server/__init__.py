"""AnythingAgent: put any Python model behind a real-time WebSocket chat endpoint.

Model authors import ``AnythingBaseModel`` from here. This module must stay standard-library
only (it is imported inside isolated workers), so the server itself lives in submodules.
"""

from ws_server.sdk import AnythingBaseModel, Message, __version__

__all__ = ["AnythingBaseModel", "Message", "__version__"]
