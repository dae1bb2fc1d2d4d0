"""Secret values the server knows of, and their removal from every text that leaves it.

Model secrets (config.yaml's ``secrets:``) and the server's API and admin keys are
registered here when read; the log formatter, the model listing and error messages pass
their text through ``redact`` so a secret a model echoes in an exception, or a key in a
misconfigured value, is shown as ``[secret]``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Final

MASK: Final = "[secret]"
# Shorter values would mask ordinary words all over the log.
MIN_LENGTH: Final = 4

_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register(*values: str) -> None:
    """Treat each value (of ``MIN_LENGTH`` or more characters) as a secret from now on."""
    global _pattern
    forms = set()
    for value in values:  # as written, and as repr() and JSON would escape it
        forms |= {value, repr(value)[1:-1], json.dumps(value)[1:-1]}
    new = {v for v in forms if len(v) >= MIN_LENGTH} - _values
    if new:
        _values.update(new)
        ordered = sorted(_values, key=len, reverse=True)  # longest first: no partial leaks
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``[secret]``."""
    if _pattern is None or not text:
        return text
    return _pattern.sub(MASK, text)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose whole output (message, traceback) has secrets masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
