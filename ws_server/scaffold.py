"""``anything-agent new NAME --template T``: a model directory that runs as generated,
with tests of its own that pass as generated.

A template is a model directory whose model is named after the template: its main.py,
config.yaml, tests/test_<template>.py and any other file. The templates live in
``ws_server/templates/<template>/``, where ruff and mypy check them as the package's own
code, except ``agent``, which is the shipped example model ``models/agent/`` (a wheel
carries it as ``ws_server/templates/agent/``, pyproject.toml maps one onto the other).
Generating copies the files with the template's name replaced by the new model's in the
three places it appears: config.yaml's ``name:``, the model class and the test file's
name; the version starts again at 0.1.0.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ws_server.exceptions import SettingsError
from ws_server.registry.config import NAME_PATTERN, NAME_RULE
from ws_server.registry.revision import skipped_dir, skipped_file

PACKAGE_DIR: Final = Path(__file__).resolve().parent
FIRST_VERSION: Final = "0.1.0"


@dataclass(frozen=True, slots=True)
class Template:
    """One template: its name, what it is for (``new --list``) and what to do next."""

    name: str
    summary: str
    next_step: str = ""

    @property
    def directory(self) -> Path:
        """Where its files are: in the package, or, for the one that is a shipped model,
        in the checkout's models/ when the package does not carry it (a source checkout)."""
        installed = PACKAGE_DIR / "templates" / self.name
        if installed.is_dir() or self.name not in SHIPPED_AS_MODELS:
            return installed
        return PACKAGE_DIR.parent / "models" / self.name


SHIPPED_AS_MODELS: Final = frozenset({"agent"})
DEFAULT_TEMPLATE: Final = "echo"
TEMPLATES: Final = {
    template.name: template
    for template in (
        Template("echo", "the smallest model: streams your message back a word at a time"),
        Template(
            "llm",
            "an LLM behind an OpenAI-compatible API, its reply streamed (key from secrets:)",
            "start the server with OPENAI_API_KEY set, and set parameters.base_url and "
            "model in config.yaml for an API other than OpenAI's",
        ),
        Template(
            "agent",
            "an offline agent showing its plan and tool calls (calculator, clock) as steps",
        ),
        Template("rules", "a rules bot: regex patterns and their replies, remembering your name"),
        Template(
            "isolated",
            "a model in a virtualenv of its own (requirements.txt), with resource limits",
            "the server builds its virtualenv in the background on the first load",
        ),
    )
}


def class_name(name: str) -> str:
    """The model class of a model called ``name``: ``my_bot`` → ``MyBotModel``."""
    return "".join(part.capitalize() for part in name.split("_")) + "Model"


def create_model(models_dir: Path, name: str, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write ``models_dir/name`` from ``template``; never overwrite anything.

    The files are written into a hidden directory beside the target and renamed into
    place at the end, so a reload running meanwhile never sees half a model."""
    if not NAME_PATTERN.match(name):
        raise SettingsError(f"model name {name!r} breaks the naming rule: {NAME_RULE}")
    if template not in TEMPLATES:
        raise SettingsError(f"no template {template!r}; the templates: {', '.join(TEMPLATES)}")
    target = models_dir / name
    if target.exists():
        raise SettingsError(f"{target} already exists; pick another name or remove it")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_dir))
    except OSError as exc:
        raise SettingsError(f"cannot write in {models_dir}: {exc.strerror or exc}") from None
    try:
        render(TEMPLATES[template], name, staging)
        if target.exists():  # made meanwhile by someone else
            raise SettingsError(f"{target} already exists; pick another name or remove it")
        staging.chmod(0o755)  # mkdtemp makes it private to its owner
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def render(template: Template, name: str, target: Path) -> None:
    """Copy the template's files into ``target`` as the model ``name``."""
    source = template.directory
    if not source.is_dir():
        raise SettingsError(f"the {template.name} template is missing from {source}")
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not skipped_dir(d))
        for file in sorted(f for f in files if not skipped_file(f)):
            path = Path(root, file)
            relative = path.relative_to(source)
            if relative.as_posix() == f"tests/test_{template.name}.py":
                relative = relative.with_name(f"test_{name}.py")
            text = path.read_text(encoding="utf-8")
            if relative.suffix == ".py":
                text = re.sub(rf"\b{class_name(template.name)}\b", class_name(name), text)
            elif relative.as_posix() == "config.yaml":
                text = re.sub(r"(?m)^name: .*$", f"name: {name}", text)
                text = re.sub(r"(?m)^version: .*$", f"version: {FIRST_VERSION}", text)
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_text(text, encoding="utf-8")
    data = target / "data"  # self.data_dir: every model has one, kept by git when empty
    data.mkdir(exist_ok=True)
    if not any(data.iterdir()):
        (data / ".gitkeep").write_text("")
