"""This model's tests: `anything-agent test MODEL_DIR` (or pytest) runs them in this
process, without a server."""

from pathlib import Path

from ws_server.testing import ModelTester

MODEL = Path(__file__).resolve().parent.parent


def test_it_remembers_your_name_for_the_rest_of_the_chat() -> None:
    with ModelTester(MODEL) as model:
        assert model.send("hello").text == "Hello! Who are you?"
        assert model.send("What is my name?").text.startswith("You haven't told me your name")
        assert model.send("My name is ada").text == "Nice to meet you, Ada!"
        assert model.send("what's my name?").text == "Your name is Ada."
        assert model.send("hey there").text == "Hello, Ada! What shall we talk about?"
        assert model.send("I love sailing!").text == "What do you like most about sailing, Ada?"
        assert model.send("bye").text == "Goodbye, Ada!"


def test_each_chat_has_its_own_memory() -> None:
    with ModelTester(MODEL) as model:
        model.send("call me Grace")
    with ModelTester(MODEL) as model:
        assert model.send("what is my name").text.startswith("You haven't told me")


def test_a_message_no_rule_matches_gets_the_fallback() -> None:
    with ModelTester(MODEL) as model:
        turn = model.send("the weather is odd today")
    assert turn.text.startswith("I have no rule for that yet")
    assert turn.reason == "stop"
