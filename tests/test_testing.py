"""The model authors' test harness (ws_server/testing.py) and `anything-agent test`: a
session on a model directory, in-process, behaving as behind the server."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import SHIPPED_MODELS, TEST_MODELS

from ws_server import cli
from ws_server.testing import ChatStartError, Error, Event, ModelLoadError, ModelTester

CLI = Path(sys.executable).parent / "anything-agent"
NO_DELAY = {"parameters": {"delay": 0}}


def make_model(root: Path, name: str, main: str, config: str = "") -> Path:
    """A model directory ``root/name`` with this main.py (and config.yaml)."""
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "main.py").write_text(textwrap.dedent(main))
    if config:
        (directory / "config.yaml").write_text(textwrap.dedent(config))
    return directory


# A model that writes what happens to it to the file parameters.log names.
DIARY = """
    import asyncio
    from pathlib import Path

    from ws_server import AnythingBaseModel


    class Diary(AnythingBaseModel):
        def note(self, event):
            with open(Path(self.config["parameters"]["log"]), "a") as log:
                log.write(event + "\\n")

        async def on_chat_start(self):
            self.note("start")

        async def on_chat_messages(self, messages):
            try:
                for word in messages[-1]["content"].split():
                    yield word + " "
                    await asyncio.sleep(0.01)
            finally:
                self.note("finally")

        async def on_chat_end(self):
            self.note("end")
    """


# ------------------------------------------------------------------ the shipped models
def test_echo_streams_word_by_word_and_the_reply_joins_the_history() -> None:
    with ModelTester(SHIPPED_MODELS / "echo") as model:
        turn = model.send("hello there", params={"temperature": 0})
        assert turn.text == "hello there"
        assert turn.chunks == ["hello", " there"] and turn.reason == "stop"
        assert turn.events == [] and turn.errors == [] and turn.number == 1
        assert model.history == [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hello there"},
        ]
        assert model.send("again").number == 2


def test_eliza_loads_its_rules_and_remembers_your_name() -> None:
    seeded = {"parameters": {"seed": 1}}
    with ModelTester(SHIPPED_MODELS / "eliza", config_overrides=seeded) as model:
        assert model.send("my name is ada").text.startswith("Nice to meet you, Ada.")
        turn = model.send("I feel sad")
        assert turn.reason == "stop" and turn.text and turn.text != "Please, go on."
        assert len(model.history) == 4


def test_the_specifications_example_model_runs_with_its_seed_import() -> None:
    with ModelTester(SHIPPED_MODELS / "test_model") as model:
        turn = model.send("你好")
    assert turn.chunks == ["这是第一部分响应\n", "这是第二部分响应\n", "这是最后一部分响应"]
    assert turn.reason == "stop"


def test_banner_runs_in_this_process_only_where_its_requirements_are_installed() -> None:
    if importlib.util.find_spec("pyfiglet") is not None:
        with ModelTester(SHIPPED_MODELS / "banner") as model:
            assert model.mode == "shared" and "|" in model.send("hi").text
        return
    with pytest.raises(ModelLoadError) as failed:
        with ModelTester(SHIPPED_MODELS / "banner"):
            pass
    assert "banner: main.py: cannot import 'pyfiglet' (line 5)" in str(failed.value)
    assert "isolated=True" in "\n".join(failed.value.__notes__)


def test_banner_runs_isolated_in_its_own_environment_when_asked(env_cache: Path) -> None:
    with ModelTester(SHIPPED_MODELS / "banner", isolated=True, env_cache=env_cache) as model:
        assert model.mode == "isolated"
        turn = model.send("hi")
        assert turn.reason == "stop" and turn.chunks[0] == "```\n" and turn.chunks[-1] == "```"
        assert "|_| |_|_|" in turn.text  # pyfiglet's "hi", drawn in the worker
        assert model.send("/font slant").text == "Font set to slant."
        assert model.send("x y z", cancel_after=2).reason == "cancelled"


# ------------------------------------------------------------------ in-process by default
def test_an_isolated_model_runs_in_this_process_unless_asked(tmp_path: Path) -> None:
    main = """
        import os
        from ws_server import AnythingBaseModel

        class Pid(AnythingBaseModel):
            async def on_chat_messages(self, messages):
                yield str(os.getpid())
        """
    directory = make_model(tmp_path, "pid", main, "isolation: {enabled: true}\n")
    with ModelTester(directory) as model:
        assert model.mode == "shared" and model.send("pid").text == str(os.getpid())


def test_isolated_true_needs_a_model_that_asks_for_isolation() -> None:
    with pytest.raises(ModelLoadError, match=r"echo: config.yaml: isolated=True, but"):
        with ModelTester(SHIPPED_MODELS / "echo", isolated=True):
            pass


def test_a_plain_generator_runs_in_the_model_threads_as_in_the_server() -> None:
    with ModelTester(TEST_MODELS / "sync_style") as model:
        assert model.send("a b").chunks == ["a@thread ", "b@thread "]


def test_the_models_own_tasks_run_on_between_turns(tmp_path: Path) -> None:
    main = """
        import asyncio
        from ws_server import AnythingBaseModel

        class Ticker(AnythingBaseModel):
            async def on_chat_start(self):
                self.context["ticks"] = 0
                self.context["task"] = asyncio.create_task(self.tick())

            async def tick(self):
                while True:
                    await asyncio.sleep(0.01)
                    self.context["ticks"] += 1

            async def on_chat_messages(self, messages):
                yield str(self.context["ticks"])

            async def on_chat_end(self):
                self.context["task"].cancel()
        """
    with ModelTester(make_model(tmp_path, "ticker", main)) as model:
        first = int(model.send("?").text)
        time.sleep(0.3)  # the test's thread waits; the session's loop does not
        assert int(model.send("?").text) >= first + 10


# ------------------------------------------------------------------ turns
def test_send_messages_replaces_the_history() -> None:
    with ModelTester(SHIPPED_MODELS / "echo", config_overrides=NO_DELAY) as model:
        model.send("first")
        history = [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two"},
        ]
        assert model.send_messages(history).text == "one two"
        assert model.history == [*history, {"role": "assistant", "content": "one two"}]


def test_params_reach_the_model_for_that_turn_only() -> None:
    with ModelTester(TEST_MODELS / "params_echo") as model:
        assert model.send("x", params={"temperature": 0.2}).text == '{"temperature": 0.2}'
        assert model.send("x").text == "{}"


def test_a_message_the_server_would_refuse_runs_no_turn() -> None:
    with ModelTester(TEST_MODELS / "params_echo") as model:
        turn = model.send("x", params={"big": "x" * 20_000})
        assert turn.reason is None and turn.number is None and turn.chunks == []
        assert [error.code for error in turn.errors] == ["bad_request"]
        assert "16384" in turn.errors[0].message and model.history == []
        assert model.send("x").number == 1


def test_a_model_error_ends_the_turn_and_the_author_sees_the_traceback() -> None:
    with ModelTester(TEST_MODELS / "faulty") as model:
        turn = model.send("boom")
        assert turn.reason == "error" and turn.chunks == ["partial"]
        [error] = turn.errors
        assert error.code == "model_error" and "SECRET" not in error.message  # as clients see
        assert isinstance(turn.exception, RuntimeError)
        assert "SECRET-TOKEN-123 leaked database password" in str(turn.exception)
        assert 'faulty/main.py", line 12, in on_chat_messages' in turn.traceback
        assert model.history[-1] == {"role": "assistant", "content": "partial"}
        after = model.send("fine")  # the session goes on
        assert after.reason == "stop" and after.exception is None and after.traceback == ""


def test_a_turn_over_its_timeout_ends_with_timeout() -> None:
    with ModelTester(TEST_MODELS / "sleepy") as model:
        turn = model.send("sleep")
    assert turn.chunks == ["dozing"] and turn.reason == "timeout"
    assert turn.errors == [Error("timeout", "the turn took longer than 0.5 s")]


def test_config_overrides_merge_into_config_yaml() -> None:
    slow = {"parameters": {"delay": 0.3}, "settings": {"timeout": 0.5}}
    with ModelTester(SHIPPED_MODELS / "echo", config_overrides=slow) as model:
        turn = model.send("a b c d e f")
    assert turn.reason == "timeout" and turn.chunks == ["a", " b"]


def test_cancel_after_n_chunks_runs_the_models_finally_first(tmp_path: Path) -> None:
    log = tmp_path / "diary.log"
    diary = make_model(tmp_path, "diary", DIARY)
    with ModelTester(diary, config_overrides={"parameters": {"log": str(log)}}) as model:
        turn = model.send("a b c d e", cancel_after=2)
        assert turn.chunks == ["a ", "b "] and turn.reason == "cancelled"
        assert log.read_text().split() == ["start", "finally"]
        assert model.history[-1] == {"role": "assistant", "content": "a b "}
        right_away = model.send("x y", cancel_after=0)
        assert right_away.chunks == [] and right_away.reason == "cancelled"
        assert model.send("z").text == "z "


def test_on_chat_end_runs_once_when_the_block_ends_even_by_an_exception(tmp_path: Path) -> None:
    log = tmp_path / "diary.log"
    diary = make_model(tmp_path, "diary", DIARY)
    with pytest.raises(KeyError):
        with ModelTester(diary, config_overrides={"parameters": {"log": str(log)}}) as model:
            model.send("hi")
            raise KeyError("the test failed")
    assert log.read_text().split() == ["start", "finally", "end"]


def test_events_arrive_in_order_with_the_chunks() -> None:
    with ModelTester(TEST_MODELS / "agent_events") as model:
        turn = model.send("hi")
    assert turn.reason == "stop" and turn.text == "Answer: hidone"
    steps = [(e.data["name"], e.data["status"]) for e in turn.events if e.name == "step"]
    assert steps == [
        ("search", "running"),
        ("fetch", "running"),
        ("fetch", "done"),
        ("search", "done"),
    ]
    search, fetch = turn.events[1].data, turn.events[2].data
    assert fetch["parent_id"] == search["id"] and fetch["output"] is None
    assert turn.events[0] == Event("status", {"text": "thinking"})
    kinds = [item if isinstance(item, str) else item.name for item in turn.items]
    assert kinds == ["status", "step", "step", "step", "step", "Answer: ", "hi", "custom", "done"]
    assert turn.items[-2] == ("custom", {"value": 1})


# ------------------------------------------------------------------ secrets and failures
SECRET_MODEL = """
    from ws_server import AnythingBaseModel

    class Keyed(AnythingBaseModel):
        async def on_chat_messages(self, messages):
            yield "key ends " + self.config["secrets"]["api_key"][-3:]
    """


def test_secrets_are_injected_without_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYED_TEST_API_KEY", raising=False)
    config = "secrets:\n  api_key: {env: KEYED_TEST_API_KEY}\n"
    keyed = make_model(tmp_path, "keyed", SECRET_MODEL, config)
    with pytest.raises(ModelLoadError, match="variable KEYED_TEST_API_KEY is not set"):
        with ModelTester(keyed):
            pass
    with ModelTester(keyed, secrets={"api_key": "sk-test-xyz"}) as model:
        assert model.send("?").text == "key ends xyz"


def test_a_model_that_fails_to_load_says_which_file_and_why() -> None:
    with pytest.raises(ModelLoadError, match=r"broken_syntax: main.py: syntax error at line 3"):
        with ModelTester(TEST_MODELS / "broken_syntax"):
            pass
    with pytest.raises(ModelLoadError) as failed:
        with ModelTester(TEST_MODELS / "broken_resources"):
            pass
    assert "main.py: BrokenResources.load_resources raised FileNotFoundError" in str(failed.value)
    assert "weights.bin missing at SECRET-PATH" in failed.value.__notes__[-1]  # for the author
    with pytest.raises(ModelLoadError, match=r"config\.yaml: malformed YAML"):
        with ModelTester(TEST_MODELS / "broken_yaml"):
            pass
    with pytest.raises(ModelLoadError, match="no such directory"):
        with ModelTester(TEST_MODELS / "no_such_model"):
            pass
    with pytest.raises(ModelLoadError, match=r"settings.timeout: Input should be greater than 0"):
        with ModelTester(SHIPPED_MODELS / "echo", config_overrides={"settings": {"timeout": 0}}):
            pass


def test_on_chat_start_failing_raises_with_the_models_traceback() -> None:
    with pytest.raises(ChatStartError) as failed:
        with ModelTester(TEST_MODELS / "start_fails"):
            pass
    assert failed.value.code == "model_error"
    assert "ValueError: cannot start: SECRET-START" in failed.value.traceback


# ------------------------------------------------------------------ the async form
async def test_the_async_form_runs_on_the_tests_own_loop() -> None:
    async with ModelTester(SHIPPED_MODELS / "echo", config_overrides=NO_DELAY) as model:
        turn = await model.asend("hello there")
        assert turn.chunks == ["hello", " there"] and turn.reason == "stop"
        replaced = await model.asend_messages([{"role": "user", "content": "a b c"}], None)
        assert replaced.text == "a b c"
        assert (await model.asend("a b c", cancel_after=1)).chunks == ["a"]
        with pytest.raises(RuntimeError, match=r"await model\.asend"):
            model.send("blocking here would hang the loop")


async def test_an_async_test_may_await_a_synchronous_tester() -> None:
    with ModelTester(SHIPPED_MODELS / "echo", config_overrides=NO_DELAY) as model:
        assert (await model.asend("from another loop")).text == "from another loop"


# ------------------------------------------------------------------ anything-agent test
PASSING = """
    from ws_server.testing import ModelTester

    def test_it_answers():
        with ModelTester(".") as model:
            assert model.send("you").text == "hello you"
    """

HELLO = """
    from ws_server import AnythingBaseModel

    class Hello(AnythingBaseModel):
        async def on_chat_messages(self, messages):
            yield "hello " + messages[-1]["content"]
    """


def run_test_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), "test", *args], capture_output=True, text=True, timeout=120)


def test_anything_agent_test_runs_the_models_tests_with_pytests_exit_code(
    tmp_path: Path,
) -> None:
    hello = make_model(tmp_path, "hello", HELLO)
    (hello / "tests").mkdir()
    (hello / "tests" / "test_hello.py").write_text(textwrap.dedent(PASSING))
    failing = PASSING.replace('"hello you"', '"goodbye you"')
    (hello / "tests" / "test_wrong.py").write_text(textwrap.dedent(failing))
    everything = run_test_command(str(hello))
    assert everything.returncode == 1, everything.stdout + everything.stderr
    assert "1 failed, 1 passed" in everything.stdout
    assert "AssertionError: assert 'hello you' == 'goodbye you'" in everything.stdout
    one = run_test_command(str(hello), "--", "-q", "tests/test_hello.py::test_it_answers")
    assert one.returncode == 0 and "1 passed" in one.stdout, one.stdout + one.stderr


def test_anything_agent_test_needs_a_model_directory_with_tests(tmp_path: Path) -> None:
    missing = run_test_command(str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "nowhere is not a directory" in missing.stderr
    bare = make_model(tmp_path, "bare", HELLO)
    untested = run_test_command(str(bare))
    assert untested.returncode == 2 and "has no tests/ directory" in untested.stderr


def test_anything_agent_test_says_how_to_install_pytest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hello = make_model(tmp_path, "hello", HELLO)
    (hello / "tests").mkdir()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a)
    )
    assert cli.main(["test", str(hello)]) == 2
    assert f"{sys.executable} -m pip install 'anything-agent[testing]'" in capsys.readouterr().err
