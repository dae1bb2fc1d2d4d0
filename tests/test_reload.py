"""Reload semantics of design.md: add, change, remove and break models while sessions are
open; open sessions keep their version, a broken version never replaces a good one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, chat, copy_models, http, refused_handshake, run_turn

VERSIONED = """
from ws_server import AnythingBaseModel


class Versioned(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield "{reply}"
"""


def write_model(models: Path, name: str, reply: str, version: str | None = None) -> Path:
    directory = models / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.py").write_text(VERSIONED.format(reply=reply))
    config = f"version: {version}\n" if version else ""
    (directory / "config.yaml").write_text(config)
    return directory


def reload(server: ServerProcess) -> dict[str, Any]:
    status, _, body = http(server, "/v1/models/reload", method="POST")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def model(server: ServerProcess, name: str) -> dict[str, Any]:
    status, _, body = http(server, f"/v1/models/{name}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    write_model(directory, "alpha", "alpha v1", version="1.0")
    return directory


@pytest.fixture
def live(models: Path, start_server: Any) -> ServerProcess:
    return start_server(models)  # type: ignore[no-any-return]


async def test_new_model_appears_after_reload(live: ServerProcess, models: Path) -> None:
    write_model(models, "beta", "beta here")
    assert reload(live) == {
        "added": ["beta"],
        "updated": [],
        "removed": [],
        "failed": [],
        "unchanged": ["alpha"],
        "building": [],
    }
    assert model(live, "beta")["status"] == "ready"
    async with chat(live, "beta") as ws:
        assert (await run_turn(ws, "hi")).text == "beta here"


async def test_reload_without_changes_changes_nothing(live: ServerProcess) -> None:
    before = model(live, "alpha")
    assert reload(live)["unchanged"] == ["alpha"]
    assert model(live, "alpha") == before


async def test_changed_model_gets_new_version_while_open_sessions_keep_theirs(
    live: ServerProcess, models: Path
) -> None:
    async with chat(live, "alpha") as old_session:
        old_revision = model(live, "alpha")["revision"]
        write_model(models, "alpha", "alpha v2", version="2.0")
        assert reload(live)["updated"] == ["alpha"]
        info = model(live, "alpha")
        assert info["version"] == "2.0" and info["revision"] != old_revision
        async with chat(live, "alpha") as new_session:
            assert new_session.ready["version"] == "2.0"  # type: ignore[attr-defined]
            assert (await run_turn(new_session, "hi")).text == "alpha v2"
        # The session opened before the reload is still pinned to version 1.0.
        assert (await run_turn(old_session, "hi")).text == "alpha v1"
    live.wait_for_log(r"model alpha: version 1\.0 \(revision \w+\) unloaded")


async def test_broken_new_version_leaves_the_old_one_serving(
    live: ServerProcess, models: Path
) -> None:
    async with chat(live, "alpha") as open_session:
        good = model(live, "alpha")
        (models / "alpha" / "main.py").write_text("this is not python(\n")
        report = reload(live)
        assert report["failed"][0]["id"] == "alpha"
        assert "main.py: syntax error at line 1" in report["failed"][0]["error"]
        info = model(live, "alpha")
        assert info["status"] == "ready" and info["version"] == "1.0"
        assert info["revision"] == good["revision"]
        assert "main.py: syntax error" in info["error"]
        # Both the open session and new ones still get the good version.
        assert (await run_turn(open_session, "hi")).text == "alpha v1"
        async with chat(live, "alpha") as new_session:
            assert (await run_turn(new_session, "hi")).text == "alpha v1"
    # The next good reload clears the error.
    write_model(models, "alpha", "alpha v3", version="3.0")
    assert reload(live)["updated"] == ["alpha"]
    info = model(live, "alpha")
    assert info["error"] is None and info["version"] == "3.0"


async def test_removed_model_refuses_new_sessions_and_open_ones_finish(
    live: ServerProcess, models: Path
) -> None:
    async with chat(live, "alpha") as open_session:
        shutil.rmtree(models / "alpha")
        assert reload(live)["removed"] == ["alpha"]
        assert model(live, "alpha")["status"] == "draining"
        response = await refused_handshake(live, "alpha")
        assert response.status_code == 503
        assert (await run_turn(open_session, "hi")).text == "alpha v1"
    live.wait_for_log("model alpha: version 1.0 .* unloaded")
    status, _, body = http(live, "/v1/models/alpha")
    assert status == 404 and body["error"]["code"] == "not_found"
    response = await refused_handshake(live, "alpha")
    assert response.status_code == 404


async def test_broken_model_added_by_reload_fails_alone(live: ServerProcess, models: Path) -> None:
    copy_models(models, "broken_syntax")
    write_model(models, "gamma", "gamma ok")
    report = reload(live)
    assert report["added"] == ["gamma"]
    assert [f["id"] for f in report["failed"]] == ["broken_syntax"]
    async with chat(live, "gamma") as ws:
        assert (await run_turn(ws, "hi")).text == "gamma ok"


async def test_model_without_version_shows_its_revision(live: ServerProcess, models: Path) -> None:
    write_model(models, "plain", "plain")
    reload(live)
    info = model(live, "plain")
    assert info["version"] == info["revision"] and len(info["revision"]) == 12


async def test_changing_only_data_or_config_is_a_new_revision(
    live: ServerProcess, models: Path
) -> None:
    before = model(live, "alpha")["revision"]
    (models / "alpha" / "data").mkdir()
    (models / "alpha" / "data" / "vocab.txt").write_text("new words")
    assert reload(live)["updated"] == ["alpha"]
    assert model(live, "alpha")["revision"] != before
    # Caches the interpreter writes do not count as changes.
    (models / "alpha" / "__pycache__").mkdir(exist_ok=True)
    (models / "alpha" / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")
    assert reload(live)["unchanged"] == ["alpha"]


async def test_load_resources_runs_once_per_version(tmp_path: Path, start_server: Any) -> None:
    models = copy_models(tmp_path / "models", "recorder")
    live = start_server(models)
    import json

    async with chat(live, "recorder") as one, chat(live, "recorder") as two:
        first = json.loads((await run_turn(one, "state")).text)["load_id"]
        assert json.loads((await run_turn(two, "state")).text)["load_id"] == first
        (models / "recorder" / "config.yaml").write_text("version: '3'\n")
        reload(live)
        async with chat(live, "recorder") as three:
            assert json.loads((await run_turn(three, "state")).text)["load_id"] != first
        assert json.loads((await run_turn(one, "state")).text)["load_id"] == first


HELPER_MODEL = """
from ws_server import AnythingBaseModel


class UsesHelper(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        from . import helpers  # imported lazily, inside the hook

        yield helpers.WORD
"""


def write_helper_model(models: Path, word: str) -> None:
    directory = models / "helped"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.py").write_text(HELPER_MODEL)
    (directory / "helpers.py").write_text(f"WORD = {word!r}\n")


async def test_returning_to_an_earlier_revision_keeps_it_whole(
    live: ServerProcess, models: Path
) -> None:
    write_helper_model(models, "first")
    reload(live)
    async with chat(live, "helped") as on_first:
        assert (await run_turn(on_first, "hi")).text == "first"
        write_helper_model(models, "second")
        assert reload(live)["updated"] == ["helped"]
        write_helper_model(models, "first")  # back to the revision the open session has
        assert reload(live)["updated"] == ["helped"]
    # The retired copy of "first" unloads when its session closes; the serving copy of
    # the same revision must keep working, lazy imports included.
    live.wait_for_log(r"model helped: version \w+ \(revision \w+\) unloaded")
    async with chat(live, "helped") as fresh:
        turn = await run_turn(fresh, "hi")
    assert turn.text == "first" and not turn.errors


PICKLING_MODEL = """
import pickle

import helpers
from ws_server import AnythingBaseModel


class Pickled(AnythingBaseModel):
    @classmethod
    def load_resources(cls, model_dir, config):
        return pickle.loads((model_dir / "data" / "model.bin").read_bytes())

    async def on_chat_messages(self, messages):
        yield self.resources.greet(messages[-1]["content"])
"""


def make_pickling_model(models: Path) -> None:
    """A model whose data/model.bin pickles an instance of a class from its helpers.py."""
    import subprocess
    import sys

    directory = models / "pickled"
    (directory / "data").mkdir(parents=True)
    (directory / "helpers.py").write_text(
        "class Greeter:\n"
        "    def __init__(self, word):\n        self.word = word\n"
        "    def greet(self, name):\n        return f'{self.word}, {name}'\n"
    )
    (directory / "main.py").write_text(PICKLING_MODEL)
    # The author pickled the object in their own script, where the module is `helpers`.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, helpers; open('data/model.bin', 'wb')"
            ".write(pickle.dumps(helpers.Greeter('Howdy')))",
        ],
        cwd=directory,
        check=True,
        timeout=30,
    )


async def test_load_resources_can_unpickle_classes_from_sibling_modules(
    tmp_path: Path, start_server: Any
) -> None:
    make_pickling_model(tmp_path / "models")
    live = start_server(tmp_path / "models")
    async with chat(live, "pickled") as ws:
        assert (await run_turn(ws, "partner")).text == "Howdy, partner"
