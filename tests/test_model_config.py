"""config.yaml validation: known keys checked with messages naming the key, unknown kept."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from ws_server.exceptions import ModelLoadError
from ws_server.isolation.environments import interpreters
from ws_server.registry.config import MIN_PYTHON, read_config


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def test_missing_config_means_defaults(tmp_path: Path) -> None:
    config, raw = read_config(tmp_path)
    assert raw == {}
    assert config.name is None and config.settings.timeout == 300 and not config.isolated


def test_seed_config_is_valid_and_unknown_keys_are_kept(tmp_path: Path) -> None:
    config, raw = read_config(
        write(
            tmp_path,
            """
name: my_model
version: 1.0.0
description: 这是一个示例模型
parameters: {temperature: 0.7, max_tokens: 1000, top_p: 1.0}
settings: {use_cache: true, timeout: 30}
owner: someone
""",
        )
    )
    assert config.name == "my_model" and config.settings.timeout == 30
    assert raw["settings"]["use_cache"] is True and raw["owner"] == "someone"


@pytest.mark.parametrize(
    ("written", "shown"), [("1.10", "1.10"), ("2", "2"), ('"3.0"', "3.0"), ("1.0.0", "1.0.0")]
)
def test_version_is_kept_exactly_as_written(tmp_path: Path, written: str, shown: str) -> None:
    config, raw = read_config(write(tmp_path, f"version: {written}\n"))
    assert config.version == shown and raw["version"] == shown


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("name: [unclosed", "config.yaml: malformed YAML (line 1"),
        ("- a list", "must be a mapping"),
        ("parameters: [1, 2]", "config.yaml: parameters: Input should be a valid dictionary"),
        ("settings: {timeout: soon}", "config.yaml: settings.timeout"),
        ("settings: {timeout: -1}", "settings.timeout"),
        ("name: My-Model", "config.yaml: name: Value error, 'My-Model' breaks the naming rule"),
        ("isolation: {resources: {memory: lots}}", "isolation.resources.memory"),
        ("isolation: {resources: {cpu: 0}}", "isolation.resources.cpu"),
        ("isolation: {python_version: ten}", "isolation.python_version"),
        ("isolation: {python_version: 3.10}", "must be quoted"),
    ],
)
def test_invalid_config_names_file_and_key(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        read_config(write(tmp_path, text))
    assert complaint.replace("Value error, ", "") in caught.value.message


def test_isolation_accepts_both_seed_forms(tmp_path: Path) -> None:
    config, _ = read_config(write(tmp_path, "isolation: true\n"))
    assert config.isolated
    config, _ = read_config(
        write(
            tmp_path,
            """
isolation:
  enabled: true
  python_version: "3.10"
  resources: {memory: "1G", cpu: 1}
""",
        )
    )
    assert config.isolated and config.isolation.python_version == "3.10"
    assert config.isolation.resources.memory_bytes() == 1024**3


@pytest.mark.parametrize("version", ["3.8", "3.6", "3.0"])
def test_python_older_than_the_sdk_supports_is_refused_with_the_range(
    tmp_path: Path, version: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        read_config(write(tmp_path, f'isolation: {{python_version: "{version}"}}\n'))
    assert caught.value.message == (
        f"config.yaml: isolation.python_version: Python {version} is not supported: "
        "isolated models run on Python 3.9 or newer (the SDK needs it)"
    )


@pytest.mark.parametrize("version", ["3.9", "3.13", "3.99"])
def test_python_from_the_oldest_supported_up_is_accepted(tmp_path: Path, version: str) -> None:
    config, _ = read_config(write(tmp_path, f'isolation: {{python_version: "{version}"}}\n'))
    assert config.isolation.python_version == version  # 3.99: refused later, if not found


@pytest.mark.parametrize(("written", "shown"), [("three", '"three"'), ('"4.0"', '"4.0"')])
def test_malformed_python_version_repeats_what_was_written(
    tmp_path: Path, written: str, shown: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        read_config(write(tmp_path, f"isolation: {{python_version: {written}}}\n"))
    assert caught.value.message == (
        f"config.yaml: isolation.python_version: {shown} is not a Python version; "
        'write it like "3.11"'
    )


def test_the_oldest_supported_python_runs_the_sdk_and_the_one_before_does_not() -> None:
    """MIN_PYTHON is a fact about the code an isolated worker imports, checked on the
    interpreters this machine has (pyenv often has them all)."""
    found = {path.name.removeprefix("python"): path for path in interpreters()}
    major, minor = MIN_PYTHON
    oldest, before = f"{major}.{minor}", f"{major}.{minor - 1}"
    if oldest not in found:
        pytest.skip(f"no python{oldest} on this machine")
    boot = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "import ws_server.isolation.worker, ws_server.registry.loader, ws_server.seed_compat"
    )
    for version, works in ((oldest, True), (before, False)):
        if version in found:
            result = subprocess.run(
                [str(found[version]), "-s", "-E", "-c", boot],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert (result.returncode == 0) is works, (version, result.stderr)
