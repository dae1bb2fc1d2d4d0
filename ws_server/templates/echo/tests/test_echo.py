"""This model's tests: `anything-agent test MODEL_DIR` (or pytest) runs them in this
process, without a server."""

from pathlib import Path

from ws_server.testing import ModelTester

MODEL = Path(__file__).resolve().parent.parent


def test_it_streams_the_message_back_a_word_at_a_time() -> None:
    with ModelTester(MODEL) as model:
        turn = model.send("hello there")
    assert turn.chunks == ["You said:", " hello", " there"]
    assert turn.reason == "stop"


def test_the_greeting_comes_from_config_yaml() -> None:
    with ModelTester(MODEL, config_overrides={"parameters": {"greeting": "Heard:"}}) as model:
        assert model.send("hi").text == "Heard: hi"
