"""config.yaml validation: known keys checked with messages naming the key, unknown kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from ws_server.exceptions import ModelLoadError
from ws_server.model_config import read_config


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
