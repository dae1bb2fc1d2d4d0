"""A model directory's revision: a short hash of its content, which reload compares."""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import Final

REVISION_LENGTH: Final = 12
# Files above this size (weights, say) are identified by size and modification time
# rather than read in full on every reload.
FULL_HASH_LIMIT: Final = 16 * 1024 * 1024
_SKIPPED_DIRS: Final = frozenset({"__pycache__", "venv", ".venv", "node_modules"})
# A hand-made venv/ counts by its presence alone: this file, relative to the model.
VENV_MARKER: Final = ("venv", "bin", "python")


def skipped_dir(name: str) -> bool:
    """Whether a directory of this name is left out of a model's revision."""
    return name in _SKIPPED_DIRS or name.startswith(".")


# Editors' swap, backup, lock and probe files (vim, emacs, JetBrains, macOS Finder): not the
# model, so neither its revision nor a reload on change sees them.
EDITOR_NOISE: Final = (
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",  # vim's probe: may it write in this directory?
    "*.tmp",
    ".DS_Store",
    "*___jb_tmp___",
    "*___jb_old___",
)


def skipped_file(name: str) -> bool:
    """Whether a file of this name is left out of a model's revision."""
    if name.startswith(".") or name.endswith((".pyc", ".pyo")):
        return True
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EDITOR_NOISE)


def compute_revision(model_dir: Path) -> str:
    """Hash every file's relative path and content (hidden files, caches and venv/ aside)."""
    digest = hashlib.sha256()
    # venv/ itself is not hashed (it is large and changes as it is used), but adding or
    # removing a hand-made one changes how the model runs, so its presence counts.
    if model_dir.joinpath(*VENV_MARKER).exists():
        digest.update(b"venv/\0")
    for path in sorted(_content_files(model_dir)):
        relative = path.relative_to(model_dir).as_posix()
        digest.update(relative.encode() + b"\0")
        try:
            stat = path.stat()
            if stat.st_size > FULL_HASH_LIMIT:
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            else:
                digest.update(path.read_bytes())
        except OSError as exc:  # vanished or unreadable mid-scan: still a distinct state
            digest.update(f"unreadable:{exc.errno}".encode())
        digest.update(b"\0")
    return digest.hexdigest()[:REVISION_LENGTH]


def _content_files(model_dir: Path) -> list[Path]:
    files: list[Path] = []
    for root, dirs, names in os.walk(model_dir):
        dirs[:] = [d for d in dirs if not skipped_dir(d)]
        files.extend(Path(root) / name for name in names if not skipped_file(name))
    return files
