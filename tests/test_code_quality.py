"""The code passes the linters configured in pyproject.toml (ruff and mypy strict)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SHIPPED_MODELS

BIN = Path(sys.executable).parent
# The models that ship with the project are ours to keep clean; test_model is the
# specification's example verbatim, and whatever else a user drops into models/ is theirs.
LINTED_MODELS = ("echo", "eliza", "banner")
UNCLEAN_MODEL = (  # an unused import, unsorted imports: what a quick model may look like
    "import os\nimport asyncio\nfrom ws_server import AnythingBaseModel\n"
    "class M(AnythingBaseModel): pass\n"
)


def ruff(
    *args: str, cwd: Path = ROOT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ruff"), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_finds_nothing() -> None:
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing_in_the_shipped_models() -> None:
    paths = [f"models/{name}" for name in LINTED_MODELS]
    linted = ruff("check", "--show-files", *paths)
    for name in LINTED_MODELS:  # passed by name, they are linted although models/ is excluded
        assert str(SHIPPED_MODELS / name / "main.py") in linted.stdout, linted.stdout
    result = ruff("check", *paths)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_users_unclean_model_does_not_fail_the_lint(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "models" / "mine").mkdir(parents=True)
    (tmp_path / "models" / "mine" / "main.py").write_text(UNCLEAN_MODEL)
    (tmp_path / "ours.py").write_text(UNCLEAN_MODEL)  # the project's own code still counts
    result = ruff("check", ".", cwd=tmp_path)
    assert "ours.py" in result.stdout and "models/mine" not in result.stdout, result.stdout


def test_readme_quickstart_model_is_ruff_clean() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"cat > models/shouter/main\.py <<'PY'\n(.*?)\nPY\n", readme, re.DOTALL)
    assert found is not None, "README's Quickstart no longer writes models/shouter/main.py"
    snippet = found.group(1) + "\n"
    for command in (("check",), ("format", "--diff")):
        result = ruff(*command, "--stdin-filename", "shouter.py", "-", stdin=snippet)
        assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_passes_on_the_package() -> None:
    result = subprocess.run(
        [str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
