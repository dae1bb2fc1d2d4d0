"""Log set-up: one line per event, saying which model, which session, what happened."""

from __future__ import annotations

import logging
import sys

from ws_server.redaction import RedactingFormatter

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Send every ``anything_agent.*`` logger to stderr at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(FORMAT))  # secrets never reach the log
    root = logging.getLogger("anything_agent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # websockets logs every refused handshake and bad frame at INFO; ours say it better.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("websockets").addHandler(handler)
