"""Imports a model's main.py and finds its ``AnythingBaseModel`` subclass.

Each load of a model is imported as its own package
(``_anything_models.<name>_<revision>_<n>``), so two versions of one model, or two models
with a ``helpers.py`` each, never share modules. ``from . import helpers`` works anywhere
in main.py, at import time or later inside a hook; a plain ``import helpers`` works at
import time and in ``load_resources`` (when the model directory is on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import itertools
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ws_server import seed_compat
from ws_server.exceptions import ModelLoadError
from ws_server.sdk import AnythingBaseModel

MAIN_FILE: Final = "main.py"
REQUIREMENTS_FILE: Final = "requirements.txt"
_PACKAGE_ROOT: Final = "_anything_models"
_IMPORT_LOCK = threading.Lock()  # sys.path and sys.modules edits must not interleave
# Each load gets its own package, even when a model returns to an earlier revision, so
# unloading a retired copy can never remove the modules of the copy now serving.
_load_counter = itertools.count(1)


@dataclass(frozen=True)
class LoadedModel:
    """A model version's class, its per-version resources, and the package holding it."""

    model_class: type[AnythingBaseModel]
    resources: Any
    package: str


async def load_model(
    model_dir: Path,
    name: str,
    revision: str,
    config: dict[str, Any],
    *,
    isolated: bool,
) -> LoadedModel:
    """Import main.py (in a thread) and run the class's ``load_resources`` hook once.

    Raises ``ModelLoadError`` naming main.py and the problem. The model directory is on
    ``sys.path`` while main.py is imported and while ``load_resources`` runs, so
    ``import helpers`` and unpickling objects whose classes live in ``helpers.py`` work.
    ``isolated``: whether this runs in an isolated model's worker, which decides the
    advice for a missing package (its requirements.txt, not the server's environment).
    """
    package = f"{_PACKAGE_ROOT}.{name}_{revision}_{next(_load_counter)}"
    model_class = await asyncio.to_thread(_import_main, model_dir, package, isolated)
    hook = model_class.load_resources
    try:
        if inspect.iscoroutinefunction(hook):
            with _model_dir_on_path(model_dir):
                resources = await hook(model_dir, config)
        else:
            resources = await asyncio.to_thread(_call_in_model_dir, model_dir, hook, config)
    except Exception as exc:
        unload_package(package)
        raise ModelLoadError(
            f"{MAIN_FILE}: {model_class.__name__}.load_resources raised "
            f"{type(exc).__name__}; the server log has the details",
            detail="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        ) from None
    return LoadedModel(model_class, resources, package)


def _call_in_model_dir(model_dir: Path, hook: Callable[..., Any], config: dict[str, Any]) -> Any:
    with _IMPORT_LOCK, _model_dir_on_path(model_dir):
        return hook(model_dir, config)


def _import_main(
    model_dir: Path, package_name: str, isolated: bool = False
) -> type[AnythingBaseModel]:
    """Import ``model_dir/main.py`` as ``<package_name>.main``; return its model class."""
    seed_compat.install()
    main_path = model_dir / MAIN_FILE
    with _IMPORT_LOCK:
        _ensure_root_package()
        package = types.ModuleType(package_name)
        package.__path__ = [str(model_dir)]
        package.__file__ = None
        sys.modules[package_name] = package
        spec = importlib.util.spec_from_file_location(f"{package_name}.main", main_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            with _model_dir_on_path(model_dir):
                spec.loader.exec_module(module)
        except SyntaxError as exc:
            _forget(package_name)
            raise ModelLoadError(
                f"{MAIN_FILE}: syntax error at line {exc.lineno}: {exc.msg}"
            ) from None
        except (Exception, SystemExit) as exc:  # any import-time failure is the model's
            _forget(package_name)
            raise _import_failure(exc, main_path, isolated) from None
    try:
        return _find_model_class(module)
    except ModelLoadError:
        unload_package(package_name)
        raise


def _find_model_class(module: types.ModuleType) -> type[AnythingBaseModel]:
    candidates = [
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, AnythingBaseModel)
        and value is not AnythingBaseModel
    ]
    if not candidates:
        raise ModelLoadError(
            f"{MAIN_FILE}: no class subclassing AnythingBaseModel "
            "(write `from ws_server import AnythingBaseModel` and subclass it)"
        )
    own = [c for c in candidates if c.__module__ == module.__name__] or candidates
    leaves = [c for c in own if not any(o is not c and issubclass(o, c) for o in own)]
    if len(leaves) > 1:
        names = ", ".join(sorted(c.__name__ for c in leaves))
        raise ModelLoadError(
            f"{MAIN_FILE}: defines several AnythingBaseModel subclasses ({names}); keep one"
        )
    model_class = leaves[0]
    if model_class.on_chat_messages is AnythingBaseModel.on_chat_messages:
        raise ModelLoadError(
            f"{MAIN_FILE}: {model_class.__name__} does not implement on_chat_messages"
        )
    return model_class


def _import_failure(exc: BaseException, main_path: Path, isolated: bool) -> ModelLoadError:
    """Public text names the exception type and the line in main.py; its message is detail."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == main_path:
            line = frame.lineno
    where = f" (line {line})" if line else ""
    if isinstance(exc, ModuleNotFoundError) and isolated:
        return ModelLoadError(
            f"{MAIN_FILE}: cannot import {exc.name!r}{where}: it is not in this isolated "
            f"model's environment, which holds only the standard library and what "
            f"{REQUIREMENTS_FILE} lists (add it to {REQUIREMENTS_FILE})"
        )
    if isinstance(exc, ModuleNotFoundError):
        return ModelLoadError(
            f"{MAIN_FILE}: cannot import {exc.name!r}{where}: it is not installed in the "
            "server's environment (install it there, or list it in requirements.txt and "
            "use isolation)"
        )
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ModelLoadError(
        f"{MAIN_FILE}: {type(exc).__name__} raised while importing{where}; "
        "the server log has the details",
        detail=detail,
    )


def _ensure_root_package() -> None:
    if _PACKAGE_ROOT not in sys.modules:
        root = types.ModuleType(_PACKAGE_ROOT)
        root.__path__ = []
        sys.modules[_PACKAGE_ROOT] = root


def _forget(package_name: str) -> None:
    for key in [k for k in sys.modules if k == package_name or k.startswith(package_name + ".")]:
        del sys.modules[key]


def unload_package(package: str) -> None:
    """Drop a retired version's modules so its code can be garbage-collected."""
    with _IMPORT_LOCK:
        _forget(package)


@contextmanager
def _model_dir_on_path(model_dir: Path) -> Iterator[None]:
    """Let main.py ``import helpers`` from its own directory, without leaking it.

    Modules imported from the model directory are removed from ``sys.modules`` afterwards
    (main.py keeps its references), so another model's ``helpers`` is imported afresh.
    """
    before = set(sys.modules)
    entry = str(model_dir)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        try:
            sys.path.remove(entry)
        except ValueError:
            pass
        for key in set(sys.modules) - before:
            file = getattr(sys.modules[key], "__file__", None)
            if file and Path(file).is_relative_to(model_dir) and not key.startswith(_PACKAGE_ROOT):
                del sys.modules[key]
