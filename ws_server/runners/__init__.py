"""Where model code executes: ``shared`` (in the server process) or, later, ``isolated``."""

from ws_server.runners.base import ModelSession, Runner
from ws_server.runners.shared import SharedRunner

__all__ = ["ModelSession", "Runner", "SharedRunner"]
