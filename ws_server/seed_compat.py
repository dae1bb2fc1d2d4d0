"""Makes the seed's ``from app.models.base import AnythingBaseModel`` work in any main.py.

The original specification's example imports the base class from ``app.models.base``.
This finder answers for ``app``, ``app.models`` and ``app.models.base`` only when no real
``app`` package exists on the path (it sits last in ``sys.meta_path``), so a user's own
``app`` package always wins. Standard library only: isolated workers install it too.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence

ALIASES = ("app", "app.models", "app.models.base")


class _SeedAliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the three seed module names, backed by ``ws_server.sdk``."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in ALIASES:
            return None
        is_package = fullname != "app.models.base"
        return importlib.machinery.ModuleSpec(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ == "app.models.base":
            from ws_server import sdk

            module.AnythingBaseModel = sdk.AnythingBaseModel  # type: ignore[attr-defined]
            module.Message = sdk.Message  # type: ignore[attr-defined]
        else:
            module.__path__ = []


_FINDER = _SeedAliasFinder()


def install() -> None:
    """Register the alias finder once, after every real finder."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
