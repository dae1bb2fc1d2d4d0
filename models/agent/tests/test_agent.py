"""This model's tests: `anything-agent test MODEL_DIR` (or pytest) runs them in this
process, without a server."""

import time
from pathlib import Path

from ws_server.testing import ModelTester

MODEL = Path(__file__).resolve().parent.parent
FAST = {"parameters": {"delay": 0}}


def test_it_works_arithmetic_out_with_the_calculator_and_shows_the_steps() -> None:
    with ModelTester(MODEL, config_overrides=FAST) as model:
        turn = model.send("What is 12 * (3 + 4)?")
    assert turn.text == "12 * (3 + 4) = 84"
    assert turn.reason == "stop"
    assert turn.events[0].name == "status" and turn.events[0].data == {"text": "thinking…"}
    steps = [event.data for event in turn.events if event.name == "step"]
    assert [(step["name"], step["status"]) for step in steps] == [
        ("plan", "running"),
        ("calculator", "running"),
        ("calculator", "done"),
        ("plan", "done"),
    ]
    plan, calculator = steps[0], steps[1]
    assert plan["parent_id"] is None and plan["input"] == "What is 12 * (3 + 4)?"
    assert calculator["parent_id"] == plan["id"] and calculator["input"] == "12 * (3 + 4)"
    assert steps[2]["output"] == "84" and steps[3]["output"] == "ask the calculator"


def test_a_failing_tool_ends_its_step_with_error_and_the_agent_says_why() -> None:
    with ModelTester(MODEL, config_overrides=FAST) as model:
        turn = model.send("calculate 1 / 0")
    assert turn.text == "I couldn't work that out: division by zero."
    steps = [event.data for event in turn.events if event.name == "step"]
    assert [(step["name"], step["status"]) for step in steps][-2:] == [
        ("calculator", "error"),
        ("plan", "done"),
    ]


def test_it_tells_the_time_with_the_clock() -> None:
    with ModelTester(MODEL, config_overrides=FAST) as model:
        turn = model.send("what time is it?")
    assert turn.text.startswith("It is ")
    assert [event.data["name"] for event in turn.events if event.name == "step"] == [
        "plan",
        "clock",
        "clock",
        "plan",
    ]


def test_a_question_no_tool_answers_gets_help() -> None:
    with ModelTester(MODEL, config_overrides=FAST) as model:
        turn = model.send("who wrote Hamlet?")
    assert "calculator" in turn.text and "what time is it?" in turn.text
    assert [event.data["status"] for event in turn.events if event.name == "step"] == [
        "running",
        "done",
    ]


def test_a_huge_question_is_answered_at_once() -> None:
    # Checking whether it is arithmetic takes time linear in its length, and a long one is
    # no question for the calculator: the event loop is never held.
    with ModelTester(MODEL, config_overrides=FAST) as model:
        began = time.monotonic()
        turn = model.send("1" * 30_000 + "+")
    assert time.monotonic() - began < 1.0
    assert turn.reason == "stop" and "calculator" in turn.text
