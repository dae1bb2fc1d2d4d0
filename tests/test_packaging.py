"""The project as a user installs it: a wheel built from the source distribution, installed
(not editable) into a fresh virtualenv, serves the browser page at / like a checkout does."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LISTENING, ROOT, SHIPPED_MODELS, ServerProcess, http

from ws_server.scaffold import TEMPLATES

UV = Path(sys.executable).parent / "uv"
# What building the distributions reads (pyproject.toml's packages, package data, readme;
# models/ for models/agent, which is also the `new --template agent` template).
SOURCES = ("pyproject.toml", "README.md", "ws_server", "web_client", "models")


def clean_env() -> dict[str, str]:
    """This environment, less what would point a program at the checkout or configure the
    server."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("ANYTHING_AGENT_")
    }


def run(*command: str | Path, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A virtualenv holding the project's wheel; its dependencies come from the test
    environment's site-packages (a plain path in a .pth file, so the editable install
    there, which is a .pth hook of its own, stays out)."""
    work = tmp_path_factory.mktemp("packaging")
    # A copy, so the build's egg-info and build/ never land in the working tree.
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    env = {**clean_env(), "UV_PYTHON_DOWNLOADS": "never"}
    # The sdist, then the wheel from the sdist, as PyPI users get it. The build runs in an
    # isolated environment with pyproject.toml's build-system requirements, as `pip install .`
    # does (from uv's cache, else the package index): the test environment's own setuptools
    # (what `python -m venv` installs) cannot build a wheel without the `wheel` package.
    run(UV, "build", "--out-dir", work / "dist", source, cwd=work, env=env)
    (wheel,) = (work / "dist").glob("anything_agent-*.whl")
    venv = work / "venv"
    run(UV, "venv", "--quiet", "--python", sys.executable, venv, cwd=work, env=env)
    python = venv / "bin" / "python"
    run(UV, "pip", "install", "--quiet", "--no-deps", "--python", python, wheel, cwd=work, env=env)
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work, env=env
    )
    Path(purelib.strip(), "_test_dependencies.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    yield venv
    shutil.rmtree(work, ignore_errors=True)


def test_the_wheel_ships_the_web_client(installed: Path) -> None:
    wheel = next((installed.parent / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = (installed.parent / "source" / "web_client").iterdir()
    expected = {f"ws_server/web_client/{p.name}" for p in shipped}
    assert expected <= set(names), sorted(expected - set(names))


def test_the_wheel_ships_every_model_template(installed: Path, tmp_path: Path) -> None:
    for name in TEMPLATES:
        run(
            installed / "bin" / "anything-agent",
            *("new", f"my_{name}", "--template", name, "--models-dir", tmp_path),
            cwd=tmp_path,  # not the checkout: the templates come from the wheel
            env=clean_env(),
        )
        assert (tmp_path / f"my_{name}" / "tests" / f"test_my_{name}.py").is_file(), name


def test_an_installed_wheel_serves_the_page_and_its_assets(installed: Path, tmp_path: Path) -> None:
    env = clean_env()
    # The server really runs from the wheel, not from this checkout.
    located = run(
        installed / "bin" / "python",
        "-c",
        "import ws_server; print(ws_server.__file__)",
        cwd=tmp_path,
        env=env,
    )
    assert Path(located.strip()).is_relative_to(installed), located

    models = tmp_path / "models"
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    process = subprocess.Popen(
        [
            installed / "bin" / "anything-agent",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--models-dir",
            models,
        ],
        cwd=tmp_path,  # not the checkout: nothing may come from there
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = ServerProcess(process, models, tmp_path)
    try:
        assert process.stderr is not None
        stderr = process.stderr

        def pump() -> None:
            for line in stderr:
                server.log_lines.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        listening = LISTENING.search(server.wait_for_log(LISTENING.pattern, timeout=30))
        assert listening is not None
        server.port = int(listening.group(2))

        status, headers, page = http(server, "/")
        assert status == 200, page
        assert headers["Content-Type"].startswith("text/html")
        assert "<title>AnythingAgent</title>" in page
        status, headers, script = http(server, "/app.js")
        assert status == 200, script
        assert headers["Content-Type"].startswith("text/javascript")
        built_from = installed.parent / "source" / "web_client" / "app.js"
        assert script == built_from.read_text(encoding="utf-8")
        status, _, listing = http(server, "/v1/models")
        assert status == 200 and [m["id"] for m in listing["data"]] == ["echo"]
        assert server.stop() == 0, server.log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
