"""``serve --reload-on-change``: a save in the models directory is served within moments,
with design.md's reload semantics (a half-written file leaves the previous version
serving); editor noise reloads nothing; without the flag nothing watches."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess, chat, http, refused_handshake, run_turn
from prometheus_client.parser import text_string_to_metric_families

from ws_server.registry.catalog import ReloadReport
from ws_server.registry.watcher import describe, relevant, summarize

MODEL = """
from ws_server import AnythingBaseModel


class Versioned(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield "{reply}"
"""
HALF_WRITTEN = MODEL[: MODEL.index("yield") + len('yield "al')]  # a save caught midway
PICKED_UP_WITHIN = 2.0  # seconds from a save to the new version serving


def write_model(models: Path, name: str, reply: str) -> None:
    (models / name).mkdir(parents=True, exist_ok=True)
    (models / name / "main.py").write_text(MODEL.format(reply=reply))


def model(server: ServerProcess, name: str) -> dict[str, Any]:
    status, _, body = http(server, f"/v1/models/{name}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def reloads(server: ServerProcess) -> float:
    """``anything_agent_reloads_total``: every reload the server ran, however started."""
    _, _, text = http(server, "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "anything_agent_reloads_total":
                return sample.value
    raise AssertionError("no anything_agent_reloads_total in /metrics")


async def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Poll until ``condition`` holds; the seconds it took (fails past ``seconds``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not so within {seconds} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def reply(server: ServerProcess, name: str) -> str:
    async with chat(server, name) as ws:
        return (await run_turn(ws, "hi")).text


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    write_model(directory, "alpha", "alpha v1")
    return directory


@pytest.fixture
def watching(models: Path, start_server: Any) -> ServerProcess:
    return start_server(models, "--reload-on-change")  # type: ignore[no-any-return]


async def test_an_edit_is_served_within_two_seconds(watching: ServerProcess, models: Path) -> None:
    before = model(watching, "alpha")["revision"]
    write_model(models, "alpha", "alpha v2")
    took = await within(PICKED_UP_WITHIN, lambda: model(watching, "alpha")["revision"] != before)
    assert took < PICKED_UP_WITHIN
    assert await reply(watching, "alpha") == "alpha v2"
    watching.wait_for_log(r"anything_agent.watcher: models directory changed: alpha/main\.py$")
    watching.wait_for_log(r"reloaded on change: updated alpha$")


async def test_a_half_written_file_leaves_the_previous_version_until_it_is_complete(
    watching: ServerProcess, models: Path
) -> None:
    good = model(watching, "alpha")
    (models / "alpha" / "main.py").write_text(HALF_WRITTEN)
    await within(PICKED_UP_WITHIN, lambda: model(watching, "alpha")["error"] is not None)
    info = model(watching, "alpha")
    assert info["status"] == "ready" and info["revision"] == good["revision"]
    assert "main.py: syntax error" in info["error"]
    assert await reply(watching, "alpha") == "alpha v1"
    watching.wait_for_log(r"reloaded on change: failed alpha$")
    # The save completes: the new version serves and the error is gone.
    write_model(models, "alpha", "alpha v2")
    await within(PICKED_UP_WITHIN, lambda: model(watching, "alpha")["error"] is None)
    assert model(watching, "alpha")["revision"] != good["revision"]
    assert await reply(watching, "alpha") == "alpha v2"


async def test_editor_noise_reloads_nothing(watching: ServerProcess, models: Path) -> None:
    before = reloads(watching)
    alpha = models / "alpha"
    (alpha / ".main.py.swp").write_bytes(b"vim swap")
    (alpha / "main.py~").write_text("a backup")
    (alpha / "4913").write_text("")  # vim probing whether it may write here...
    (alpha / "4913").unlink()  # ...and cleaning up
    (alpha / "#main.py#").write_text("emacs autosave")
    (alpha / "__pycache__").mkdir()
    (alpha / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    (models / ".hidden").mkdir()
    (models / ".hidden" / "main.py").write_text("not a model")
    await asyncio.sleep(1.0)
    assert reloads(watching) == before
    assert "models directory changed" not in watching.log
    # The watcher is alive: a real save after the noise reloads, naming that file alone.
    write_model(models, "alpha", "alpha v2")
    line = watching.wait_for_log("models directory changed", timeout=PICKED_UP_WITHIN)
    assert line.endswith("changed: alpha/main.py")
    assert reloads(watching) == before + 1


async def test_a_new_model_is_added_and_a_removed_one_drains(
    models: Path, start_server: Any
) -> None:
    # The environment variable turns it on as the flag does.
    live = start_server(models, env={"ANYTHING_AGENT_RELOAD_ON_CHANGE": "1"})
    async with chat(live, "alpha") as open_session:
        write_model(models, "beta", "beta here")
        await within(PICKED_UP_WITHIN, lambda: http(live, "/v1/models/beta")[0] == 200)
        assert model(live, "beta")["status"] == "ready"
        assert await reply(live, "beta") == "beta here"
        shutil.rmtree(models / "alpha")
        await within(PICKED_UP_WITHIN, lambda: model(live, "alpha")["status"] == "draining")
        assert (await refused_handshake(live, "alpha")).status_code == 503
        assert (await run_turn(open_session, "hi")).text == "alpha v1"
    live.wait_for_log(r"model alpha: version \w+ \(revision \w+\) unloaded")
    live.wait_for_log(r"reloaded on change: removed alpha$")


async def test_without_the_flag_nothing_watches(models: Path, start_server: Any) -> None:
    live = start_server(models)
    before = model(live, "alpha")["revision"]
    write_model(models, "alpha", "alpha v2")
    await asyncio.sleep(1.5)
    assert model(live, "alpha")["revision"] == before
    assert await reply(live, "alpha") == "alpha v1"
    assert "anything_agent.watcher" not in live.log


async def test_a_models_directory_made_after_the_start_is_watched(
    tmp_path: Path, start_server: Any
) -> None:
    models = tmp_path / "later"
    live = start_server(models, "--reload-on-change")
    live.wait_for_log(r"models directory .*later does not exist: reloading when it appears")
    write_model(models, "alpha", "alpha v1")
    # Seen within a second (APPEAR_POLL), perhaps half-copied: the watch set up first
    # catches the rest.
    await within(3.0, lambda: http(live, "/v1/models/alpha")[2].get("status") == "ready")
    assert await reply(live, "alpha") == "alpha v1"
    write_model(models, "alpha", "alpha v2")  # watched from then on
    await within(PICKED_UP_WITHIN, lambda: "reloaded on change: updated alpha" in live.log)
    assert await reply(live, "alpha") == "alpha v2"


async def test_the_watcher_stops_with_the_server(watching: ServerProcess) -> None:
    started = time.monotonic()
    assert watching.stop() == 0, watching.log
    assert time.monotonic() - started < 5
    assert watching.log_lines[-1].endswith("anything_agent.server: stopped")


# ---------------------------------------------------------------------- the pure pieces
MODELS = Path("/srv/models")


@pytest.mark.parametrize(
    "path",
    [
        "alpha/.main.py.swp",
        "alpha/.main.py.swx",
        "alpha/main.py~",
        "alpha/.#main.py",
        "alpha/#main.py#",
        "alpha/4913",
        "alpha/main.py.tmp",
        "alpha/.DS_Store",
        "alpha/__pycache__",
        "alpha/__pycache__/main.cpython-311.pyc",
        "alpha/main.pyc",
        "alpha/.git/index",
        "alpha/venv/lib/python3.11/site-packages/x.py",
        "alpha/node_modules/x.js",
        ".hidden/main.py",
        "_shared/helpers.py",
        "/elsewhere/main.py",
    ],
)
def test_noise_and_what_the_registry_ignores_are_not_changes(path: str) -> None:
    assert not relevant(MODELS, MODELS / path)


@pytest.mark.parametrize(
    "path",
    [
        "",  # the models directory itself, created or removed
        "alpha",
        "alpha/main.py",
        "alpha/config.yaml",
        "alpha/data/vocab.txt",
        "alpha/helpers/tool.py",
        "alpha/venv",  # a hand-made venv/ counts by its presence (revision.py)
        "alpha/venv/bin/python",
    ],
)
def test_what_a_reload_would_see_is_a_change(path: str) -> None:
    assert relevant(MODELS, MODELS / path)


def test_the_log_names_ten_changed_paths_and_counts_the_rest() -> None:
    paths = [str(MODELS / f"m{i:02}" / "main.py") for i in range(13)]
    assert summarize(MODELS, [*paths, paths[0]]) == (
        ", ".join(f"m{i:02}/main.py" for i in range(10)) + " and 3 more"
    )
    assert summarize(MODELS, [str(MODELS)]) == "(itself)"


def test_the_report_line_says_what_changed() -> None:
    report = ReloadReport(
        added=["beta"],
        updated=["alpha"],
        removed=["gamma"],
        failed=[{"id": "delta", "error": "main.py: syntax error at line 1"}],
        unchanged=["echo"],
    )
    assert describe(report) == "added beta; updated alpha; removed gamma; failed delta"
    assert describe(ReloadReport(unchanged=["echo"])) == "no model changed"
