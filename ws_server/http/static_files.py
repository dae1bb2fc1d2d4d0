"""Serves the browser client's files from ``web_client/``, refusing anything outside it.

The files live in the checkout's top-level ``web_client/``; a wheel ships them as package data
in ``ws_server/web_client/`` (pyproject.toml maps one onto the other)."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Final

import ws_server


def _web_client_dir() -> Path:
    """Inside the package when installed from a wheel (or ``pip install .``); else beside
    the package, in a source checkout or an editable install."""
    package = Path(ws_server.__file__).resolve().parent
    installed = package / "web_client"
    return installed if installed.is_dir() else package.parent / "web_client"


WEB_CLIENT_DIR: Final = _web_client_dir()
_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


def resolve_static(path: str, root: Path = WEB_CLIENT_DIR) -> Path | None:
    """The file under ``root`` that ``path`` (already percent-decoded, once) names, or
    ``None`` if it leaves ``root``, names a hidden file, holds a NUL, or does not exist.
    ``/`` is ``index.html``."""
    relative = path.lstrip("/") or "index.html"
    if "\0" in relative or any(part.startswith(".") for part in relative.split("/") if part):
        return None
    root = root.resolve()
    try:
        candidate = (root / relative).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    except (OSError, ValueError):  # name too long, and the like
        pass
    return None


def content_type(path: Path) -> str:
    """The Content-Type header for a static file."""
    return (
        _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )
