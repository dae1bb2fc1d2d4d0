"""`anything-agent new NAME --template T`: every template makes a model that loads and chats
in a real server as generated, whose own tests pass as generated, and that ruff finds
clean; `new --list`, a wrong template name, and never overwriting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SHIPPED_MODELS, ServerProcess, chat, http, run_turn

from ws_server.scaffold import TEMPLATES, class_name

BIN = Path(sys.executable).parent
CLI = BIN / "anything-agent"
# A message for each template's model, and how its reply starts, in a real server.
CHATS = {
    "echo": ("hi there", "You said: hi there"),
    "llm": ("hi", "Hello from the fake upstream"),
    "agent": ("what is 6 * 7?", "6 * 7 = 42"),
    "rules": ("my name is ada", "Nice to meet you, Ada!"),
    "isolated": ("When is 4 July 2027?", "Sunday 4 July 2027: "),
}


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 300) -> Any:
    return subprocess.run(
        [str(arg) for arg in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding one model per template (my_echo, my_llm, ...), each made
    by the real command."""
    models = tmp_path_factory.mktemp("generated") / "models"
    for template in TEMPLATES:
        result = run(CLI, "new", f"my_{template}", "--template", template, "--models-dir", models)
        assert result.returncode == 0, result.stderr
        assert f"from the {template} template" in result.stdout
    return models


def test_the_five_templates_are_there() -> None:
    assert list(TEMPLATES) == ["echo", "llm", "agent", "rules", "isolated"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_generated_models_own_tests_pass_as_generated(generated: Path, template: str) -> None:
    model = generated / f"my_{template}"
    assert (model / "tests" / f"test_my_{template}.py").is_file()
    assert not (model / "tests" / f"test_{template}.py").exists()
    result = run(CLI, "test", model, "--", "-p", "no:cacheprovider", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout


def test_generated_models_are_ruff_clean(generated: Path) -> None:
    config = ("--config", ROOT / "pyproject.toml", "--no-cache")
    result = run(BIN / "ruff", "check", *config, generated)
    assert result.returncode == 0, result.stdout + result.stderr
    formatted = run(BIN / "ruff", "format", "--check", *config, generated)
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr


def test_the_new_model_is_the_template_with_its_own_name(generated: Path) -> None:
    model = generated / "my_agent"
    shipped = SHIPPED_MODELS / "agent"  # the agent template is the shipped example model
    source = (shipped / "main.py").read_text()
    assert (model / "main.py").read_text() == source.replace("AgentModel", "MyAgentModel")
    config = (model / "config.yaml").read_text()
    assert "\nname: my_agent\n" in config and "\nversion: 0.1.0\n" in config
    assert class_name("my_agent") == "MyAgentModel"
    assert (model / "data").is_dir()
    # Written beside the target and renamed into place: nothing else is left behind.
    assert sorted(p.name for p in generated.iterdir()) == sorted(f"my_{t}" for t in TEMPLATES)


class FakeUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible Chat Completions API on 127.0.0.1, streaming a fixed reply."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["stream"] is True
        words = ["Hello", " from", " the", " fake", " upstream"]
        events = [{"choices": [{"index": 0, "delta": {"content": word}}]} for word in words]
        stream = "".join(f"data: {json.dumps(event)}\n\n" for event in events)
        data = (stream + "data: [DONE]\n\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def wait_until_ready(server: ServerProcess, name: str, timeout: float = 180) -> dict[str, Any]:
    """The model's listing row once it is ready (an isolated one builds its virtualenv)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, row = http(server, f"/v1/models/{name}")
        assert status == 200, row
        if row["status"] == "ready":
            return dict(row)
        assert row["status"] == "building", f"{row}\n{server.log}"
        time.sleep(0.2)
    raise AssertionError(f"{name} still building after {timeout}s:\n{server.log}")


async def test_every_generated_model_loads_and_chats_in_a_real_server(
    generated: Path, tmp_path: Path, start_server: Any, upstream: str
) -> None:
    models = tmp_path / "models"
    shutil.copytree(generated, models)
    # The llm model talks to the fake upstream, never to a real address, with a test key.
    config = models / "my_llm" / "config.yaml"
    config.write_text(
        config.read_text().replace("https://api.openai.com/v1", upstream), encoding="utf-8"
    )
    assert upstream in config.read_text()
    env = {"OPENAI_API_KEY": "test-key", "NO_PROXY": "127.0.0.1"}
    live: ServerProcess = start_server(models, env=env)
    for template, (message, reply) in CHATS.items():
        name = f"my_{template}"
        row = wait_until_ready(live, name)
        assert row["version"] == "0.1.0" and row["error"] is None, row
        assert row["mode"] == ("isolated" if template == "isolated" else "shared"), row
        async with chat(live, name) as ws:
            turn = await run_turn(ws, message)
        assert turn.done["reason"] == "stop", (template, turn.frames, live.log)
        assert turn.text.startswith(reply), (template, turn.text)
        if template == "agent":
            steps = [f["data"] for f in turn.frames if f["type"] == "event" and f["name"] == "step"]
            assert [(s["name"], s["status"]) for s in steps] == [
                ("plan", "running"),
                ("calculator", "running"),
                ("calculator", "done"),
                ("plan", "done"),
            ]


def test_the_shipped_agent_model_is_checked_and_its_tests_pass() -> None:
    model = SHIPPED_MODELS / "agent"
    result = run(CLI, "test", model, "--", "-p", "no:cacheprovider", "-q")
    assert result.returncode == 0, result.stdout + result.stderr
    linted = run(BIN / "ruff", "check", "--no-cache", model)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    # Its tests/ directory does not get in the way of loading it.
    checked = run(CLI, "check", "--models-dir", SHIPPED_MODELS)
    row = next(line for line in checked.stdout.splitlines() if line.startswith("agent "))
    assert row.split()[1:4] == ["1.0.0", "shared", "ready"], checked.stdout


def test_list_names_every_template_with_what_it_is_for() -> None:
    result = run(CLI, "new", "--list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(TEMPLATES)
    assert all(len(line.split()) > 3 for line in lines), lines


def test_an_unknown_template_exits_2_naming_the_templates(tmp_path: Path) -> None:
    result = run(CLI, "new", "bot", "--template", "chatgpt", "--models-dir", tmp_path)
    assert result.returncode == 2
    assert "chatgpt" in result.stderr
    assert all(name in result.stderr for name in TEMPLATES), result.stderr
    assert not (tmp_path / "bot").exists()


def test_new_without_a_name_says_what_it_needs(tmp_path: Path) -> None:
    result = run(CLI, "new", "--models-dir", tmp_path)
    assert result.returncode == 2 and "NAME" in result.stderr and "--list" in result.stderr


def test_new_never_overwrites_a_model(tmp_path: Path) -> None:
    assert run(CLI, "new", "mine", "--template", "rules", "--models-dir", tmp_path).returncode == 0
    main = tmp_path / "mine" / "main.py"
    before = main.read_text()
    again = run(CLI, "new", "mine", "--template", "agent", "--models-dir", tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert main.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]
