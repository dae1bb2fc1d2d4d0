"""This model's tests: `anything-agent test MODEL_DIR` (or pytest) runs them.

ModelTester runs a model in this process by default, isolated or not: fast (no virtualenv
to build, no worker to start), but the packages in requirements.txt must be importable
here (`pip install -r requirements.txt`). Where they are not, these tests run the model as
the server does, in a worker started from its own virtualenv (built from requirements.txt
on the first run, which takes a while, then reused).
"""

import importlib.util
from datetime import date
from pathlib import Path

from ws_server.testing import ModelTester

MODEL = Path(__file__).resolve().parent.parent
ISOLATED = importlib.util.find_spec("dateutil") is None  # requirements.txt not installed here


def test_it_tells_the_weekday_of_a_date() -> None:
    with ModelTester(MODEL, isolated=ISOLATED) as model:
        turn = model.send("When is 4 July 2027?")
    assert turn.text.startswith("Sunday 4 July 2027: ")
    assert turn.reason == "stop"


def test_it_says_how_far_off_the_date_is() -> None:
    with ModelTester(MODEL, isolated=ISOLATED) as model:
        assert model.send("What day was 20 July 1969?").text.endswith(" ago.")
        assert model.send(f"and {date.today().isoformat()}").text.endswith(": today.")


def test_a_message_without_a_date_gets_a_hint() -> None:
    with ModelTester(MODEL, isolated=ISOLATED) as model:
        assert model.send("hello").text.startswith("Mention a date")
