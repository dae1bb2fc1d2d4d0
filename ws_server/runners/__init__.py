"""Where model code executes: ``shared`` (in the server process) or ``isolated`` (a worker
process per model, ``isolation.runner``; not imported here, as workers import this package
and have none of the server's dependencies)."""

from ws_server.runners.base import ModelSession, Runner
from ws_server.runners.shared import SharedRunner

__all__ = ["ModelSession", "Runner", "SharedRunner"]
