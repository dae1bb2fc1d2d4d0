"""Plain HTTP on the chat port: model list, one model, reload, health, the web client,
and refusals at the WebSocket handshake with the JSON error body."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerProcess, http, refused_handshake

BROKEN = {
    "broken_syntax": "main.py: syntax error at line 3",
    "broken_no_class": "main.py: no class subclassing AnythingBaseModel",
    "broken_yaml": "config.yaml: malformed YAML (line 3, column 1)",
    "broken_type": "config.yaml: parameters: Input should be a valid dictionary",
    "Bad-Name": "directory name 'Bad-Name' breaks the naming rule",
    "broken_import": "main.py: cannot import 'definitely_not_installed_pkg' (line 1)",
    "broken_resources": "main.py: BrokenResources.load_resources raised FileNotFoundError",
}


def listing(server: ServerProcess) -> dict[str, dict[str, Any]]:
    status, headers, body = http(server, "/v1/models")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["object"] == "list"
    return {row["id"]: row for row in body["data"]}


def test_model_list_has_openai_shape_and_our_fields(server: ServerProcess) -> None:
    rows = listing(server)
    echo = rows["echo"]
    assert echo["object"] == "model"
    assert echo["version"] == "1.0.0" and len(echo["revision"]) == 12
    assert echo["description"] == "Streams your last message back to you, word by word."
    assert echo["mode"] == server.mode and echo["status"] == "ready" and echo["error"] is None
    assert {"echo", "eliza", "test_model"} <= set(rows)


def test_description_falls_back_to_the_class_docstring(server: ServerProcess) -> None:
    assert listing(server)["slow"]["description"] == (
        "Yields one chunk, thinks for a while, then yields another."
    )
    assert listing(server)["test_model"]["description"].startswith("这是一个示例模型")


@pytest.mark.parametrize(("name", "message"), BROKEN.items())
def test_broken_models_fail_alone_with_a_message_naming_file_and_problem(
    server: ServerProcess, name: str, message: str
) -> None:
    row = listing(server)[name]
    assert row["status"] == "failed"
    assert message in row["error"]
    assert "SECRET" not in row["error"]  # the model's own exception text stays in the log


def test_broken_models_details_go_to_the_log(server: ServerProcess) -> None:
    server.wait_for_log("model broken_resources: failed")
    assert "FileNotFoundError: weights.bin missing at SECRET-PATH" in server.log


def test_get_one_model_and_unknown_model(server: ServerProcess) -> None:
    status, _, body = http(server, "/v1/models/eliza")
    assert status == 200 and body["id"] == "eliza" and body["version"] == "1.0"
    status, _, body = http(server, "/v1/models/nope")
    assert status == 404
    assert body == {
        "error": {
            "code": "not_found",
            "message": "no model named 'nope'; GET /v1/models lists them",
        }
    }


def test_healthz_counts_models_by_status(server: ServerProcess) -> None:
    status, _, body = http(server, "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert body["models"]["failed"] == len(BROKEN)
    assert body["models"]["ready"] >= 3


def test_wrong_method_is_405(server: ServerProcess) -> None:
    status, _, body = http(server, "/v1/models/reload", method="PUT")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    status, _, body = http(server, "/v1/models", method="POST")
    assert status == 405 and "POST is not allowed on /v1/models" in body["error"]["message"]


def test_reload_with_curl_style_bodyless_post(server: ServerProcess) -> None:
    import subprocess

    output = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{server.http_url}/v1/models/reload"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    import json

    report = json.loads(output)
    assert set(report) == {"added", "updated", "removed", "failed", "unchanged", "building"}
    assert "echo" in report["unchanged"]


def test_unknown_path_is_404_json(server: ServerProcess) -> None:
    status, _, body = http(server, "/v2/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_web_client_is_served_at_root(server: ServerProcess) -> None:
    status, headers, body = http(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "AnythingAgent" in body


@pytest.mark.parametrize(
    "path",
    [
        "/..%2fpyproject.toml",
        "/%2e%2e/README.md",
        "/../ws_server/server.py",
        "/%00",
        "/.hidden",
        "/" + "a" * 5000,
    ],
)
def test_static_files_never_leave_the_web_client_directory(
    server: ServerProcess, path: str
) -> None:
    status, _, body = http(server, path)
    assert status in (404, 400, 414), body
    assert "websockets" not in str(body)


async def test_unknown_model_is_refused_at_handshake_with_404(server: ServerProcess) -> None:
    response = await refused_handshake(server, "nope")
    assert response.status_code == 404
    assert b'"code":"not_found"' in response.body


async def test_failed_model_is_refused_at_handshake_with_503(server: ServerProcess) -> None:
    response = await refused_handshake(server, "broken_syntax")
    assert response.status_code == 503
    assert b'"code":"unavailable"' in response.body and b"syntax error" in response.body


async def test_odd_model_names_are_refused_cleanly(server: ServerProcess) -> None:
    for name in ["..%2f..%2fetc", "%00", "a" * 3000, "echo%2F..", ""]:
        response = await refused_handshake(server, name)
        assert response.status_code == 404
    status, _, _ = http(server, "/healthz")
    assert status == 200


def test_plain_http_on_the_chat_endpoint_explains_itself(server: ServerProcess) -> None:
    status, headers, body = http(server, "/v1/chat/echo")
    assert status == 426 and headers["Upgrade"] == "websocket"
    assert body["error"]["code"] == "upgrade_required"
    assert "WebSocket endpoint" in body["error"]["message"]
