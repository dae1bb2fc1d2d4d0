"""Protocol v1 against a live server: every frame type and every in-session error."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from conftest import ServerProcess, Turn, chat, read_events, read_turn, recv_frame, run_turn
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def test_ready_names_session_model_and_version(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        ready = ws.ready  # type: ignore[attr-defined]
        assert ready["model"] == "recorder"
        assert ready["version"] == "2.10"
        assert len(ready["session_id"]) >= 8


async def test_echo_streams_each_word_as_a_chunk(server: ServerProcess) -> None:
    async with chat(server, "echo") as ws:
        turn = await run_turn(ws, "hello streaming world")
    assert turn.chunks == ["hello", " streaming", " world"]
    assert turn.done == {"type": "done", "turn": 1, "reason": "stop"}
    assert all(f["turn"] == 1 for f in turn.frames)


async def test_plain_text_and_message_frames_are_the_same(server: ServerProcess) -> None:
    async with chat(server, "echo") as ws:
        plain = await run_turn(ws, "same words")
        framed = await run_turn(ws, {"type": "message", "content": "same words"})
    assert plain.text == framed.text == "same words"
    assert framed.done["turn"] == 2


async def test_chunks_arrive_before_the_generator_finishes(server: ServerProcess) -> None:
    async with chat(server, "slow") as ws:  # yields "first", sleeps 1.5 s, yields "second"
        sent = time.monotonic()
        await ws.send("go")
        first = await recv_frame(ws)
        first_at = time.monotonic() - sent
        rest = await read_turn(ws)
    assert first == {"type": "chunk", "turn": 1, "content": "first"}
    assert first_at < 1.0, f"first chunk took {first_at:.2f}s: it was held back"
    assert rest.chunks == ["second"] and rest.done["reason"] == "stop"


async def test_history_accumulates_user_and_assistant_messages(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        await run_turn(ws, "hello")
        state = json.loads((await run_turn(ws, "state")).text)
    assert state["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "state"},
    ]
    assert state["turns"] == 2


async def test_messages_frame_replaces_the_history(server: ServerProcess) -> None:
    history = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "state"},
    ]
    async with chat(server, "recorder") as ws:
        await run_turn(ws, "forgotten")
        state = json.loads((await run_turn(ws, {"type": "messages", "messages": history})).text)
        again = json.loads((await run_turn(ws, "state")).text)
    assert state["messages"] == history
    assert again["messages"][: len(history)] == history
    assert again["messages"][len(history)]["role"] == "assistant"


async def test_each_session_gets_its_own_model_instance(server: ServerProcess) -> None:
    async with chat(server, "recorder") as one, chat(server, "recorder") as two:
        await run_turn(one, "a")
        await run_turn(one, "b")
        state_one = json.loads((await run_turn(one, "state")).text)
        state_two = json.loads((await run_turn(two, "state")).text)
    assert state_one["turns"] == 3 and state_two["turns"] == 1  # self.context is per session
    assert state_one["instance"] != state_two["instance"]
    # ...while load_resources ran once for the version: both see the same resources.
    assert state_one["load_id"] == state_two["load_id"]


async def test_model_reads_its_config_and_unknown_keys(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        state = json.loads((await run_turn(ws, "state")).text)
    assert state["parameters"] == {"flavour": "vanilla"}
    assert state["settings"]["custom_key"] == "kept for the model"


async def test_cancel_ends_the_turn_and_closes_the_generator(server: ServerProcess) -> None:
    async with chat(server, "recorder") as ws:
        instance = json.loads((await run_turn(ws, "state")).text)["instance"]
        await ws.send("stream 100")
        assert (await recv_frame(ws))["type"] == "chunk"
        await ws.send(json.dumps({"type": "cancel"}))
        rest = await read_turn(ws, timeout=2)
        assert rest.done == {"type": "done", "turn": 2, "reason": "cancelled"}
        assert len(rest.chunks) < 5  # promptly, not after the 100 chunks
        assert read_events(server, instance)[-1] == "generator-closed"
        # The session goes on: the next turn works and the partial reply is in the history.
        state = json.loads((await run_turn(ws, "state")).text)
    assert state["messages"][3]["role"] == "assistant"
    assert state["messages"][3]["content"].startswith("0 ")


async def test_timeout_then_cancel_lets_the_models_cleanup_finish(server: ServerProcess) -> None:
    async with chat(server, "cleanup") as ws:  # settings.timeout 0.5; finally takes 1 s
        instance = (await run_turn(ws, "id")).text
        await ws.send("work")
        assert (await recv_frame(ws))["content"] == "working"
        await asyncio.sleep(0.8)  # the timeout has fired; the model is cleaning up
        await ws.send('{"type":"cancel"}')
        rest = await read_turn(ws)
    assert rest.errors[0]["code"] == "timeout"
    assert rest.done == {"type": "done", "turn": 2, "reason": "timeout"}
    assert read_events(server, instance) == ["cleanup-done"]


async def test_cancel_right_behind_the_message_still_ends_the_turn(
    server: ServerProcess,
) -> None:
    async with chat(server, "slow") as ws:
        for _ in range(5):
            # Both frames in one TCP write, so the server reads them together and the
            # turn is cancelled before the model's code ever runs.
            ws.protocol.send_text(b'{"type":"message","content":"hi"}')
            ws.protocol.send_text(b'{"type":"cancel"}')
            ws.send_data()
            turn = await read_turn(ws, timeout=5)
            assert turn.done["reason"] == "cancelled"
        assert (await run_turn(ws, "again")).done["turn"] == 6
        with pytest.raises(TimeoutError):  # one done per turn, nothing more
            await recv_frame(ws, timeout=0.3)


async def test_cancel_without_a_running_turn_is_ignored(server: ServerProcess) -> None:
    async with chat(server, "echo") as ws:
        await ws.send('{"type":"cancel"}')
        turn = await run_turn(ws, "still fine")
    assert turn.frames[0]["type"] == "chunk" and turn.done["turn"] == 1


async def test_message_during_a_turn_is_busy(server: ServerProcess) -> None:
    async with chat(server, "slow") as ws:
        await ws.send("go")
        assert (await recv_frame(ws))["content"] == "first"
        await ws.send("impatient")
        busy = await recv_frame(ws)
        rest = await read_turn(ws)
    assert busy["type"] == "error" and busy["code"] == "busy"
    assert "turn 1" in busy["message"]
    assert rest.chunks == ["second"] and rest.done["turn"] == 1


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        ("{oops", "invalid JSON"),
        ('{"type": "dance"}', "unknown frame type"),
        ('{"type": "message"}', 'missing field "content"'),
        ('{"type": "message", "content": 5}', "must be a string or an array of content parts"),
        ('{"type": "message", "content": ["x"]}', '"content"[0] must be an object'),
        ('{"type": "message", "content": [{"type": "video"}]}', '"content"[0].type'),
        ('{"type": "message", "content": "x", "params": [1]}', '"params" must be an object'),
        ('{"content": "no type"}', 'missing field "type"'),
        ('{"type": "messages", "messages": [{"role": "robot", "content": "x"}]}', "role"),
    ],
)
async def test_bad_frames_get_bad_request_and_the_session_goes_on(
    server: ServerProcess, frame: str, complaint: str
) -> None:
    async with chat(server, "echo") as ws:
        await ws.send(frame)
        error = await recv_frame(ws)
        assert error["type"] == "error" and error["code"] == "bad_request"
        assert complaint in error["message"]
        assert "turn" not in error
        turn = await run_turn(ws, "still here")
    assert turn.text == "still here" and turn.done["turn"] == 1


async def test_binary_frame_gets_bad_request_and_connection_stays(server: ServerProcess) -> None:
    async with chat(server, "echo") as ws:
        await ws.send(b"\x00\xffbinary")
        error = await recv_frame(ws)
        assert error["code"] == "bad_request" and "binary" in error["message"]
        assert (await run_turn(ws, "ok")).text == "ok"


async def test_oversized_frame_closes_with_1009(server: ServerProcess) -> None:
    async with chat(server, "echo", max_size=None) as ws:
        await ws.send("x" * (1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await recv_frame(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_model_exception_is_model_error_without_leaking_it(server: ServerProcess) -> None:
    async with chat(server, "faulty") as ws:
        session_id = ws.ready["session_id"]  # type: ignore[attr-defined]
        turn = await run_turn(ws, "boom")
        assert turn.chunks == ["partial"]
        [error] = turn.errors
        assert error["code"] == "model_error" and error["turn"] == 1
        assert session_id in error["message"]
        assert "SECRET" not in json.dumps(turn.frames)
        assert turn.done == {"type": "done", "turn": 1, "reason": "error"}
        # The session stays usable.
        again = await run_turn(ws, "hello")
    assert again.text == "fine" and again.done["reason"] == "stop"
    line = server.wait_for_log(f"session={session_id} turn=1 on_chat_messages raised")
    assert "faulty" in line
    assert "RuntimeError: SECRET-TOKEN-123" in server.log  # the traceback is in the log


async def test_non_string_chunk_is_a_model_error(server: ServerProcess) -> None:
    async with chat(server, "faulty") as ws:
        session_id = ws.ready["session_id"]  # type: ignore[attr-defined]
        turn = await run_turn(ws, "number")
    assert turn.errors[0]["code"] == "model_error" and turn.done["reason"] == "error"
    server.wait_for_log(f"session={session_id} turn=1 on_chat_messages raised")
    assert "on_chat_messages yielded int; chunks must be str" in server.log


async def test_model_raising_cancelled_error_itself_is_a_model_error(
    server: ServerProcess,
) -> None:
    async with chat(server, "faulty") as ws:
        turn = await run_turn(ws, "selfcancel")
        assert turn.chunks == ["before"]
        assert turn.errors[0]["code"] == "model_error"
        assert turn.done == {"type": "done", "turn": 1, "reason": "error"}
        assert (await run_turn(ws, "hello")).text == "fine"


async def test_turn_past_settings_timeout_ends_with_timeout(server: ServerProcess) -> None:
    async with chat(server, "sleepy") as ws:  # settings.timeout: 0.5
        started = time.monotonic()
        turn = await run_turn(ws, "sleep")
        elapsed = time.monotonic() - started
        assert turn.chunks == ["dozing"]
        [error] = turn.errors
        assert error["code"] == "timeout" and error["turn"] == 1
        assert turn.done == {"type": "done", "turn": 1, "reason": "timeout"}
        assert elapsed < 5
        # A timed-out session can run another turn.
        assert (await run_turn(ws, "again")).done["turn"] == 2


async def test_failing_on_chat_start_reports_model_error_and_closes(server: ServerProcess) -> None:
    async with connect(server.chat_url("start_fails")) as ws:
        error = await recv_frame(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_frame(ws)
    assert error["type"] == "error" and error["code"] == "model_error"
    assert "SECRET" not in error["message"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_sync_generator_model_runs_off_the_event_loop(server: ServerProcess) -> None:
    async with chat(server, "sync_style") as ws, chat(server, "echo") as other:
        await ws.send("a b c d e f g h i j")
        # While the blocking generator works, another session is served promptly.
        started = time.monotonic()
        other_turn = await run_turn(other, "quick")
        other_elapsed = time.monotonic() - started
        turn = await read_turn(ws)
    assert turn.chunks == [f"{w}@thread " for w in "abcdefghij"]
    assert other_turn.text == "quick" and other_elapsed < 0.15


async def test_coroutine_returning_a_string_is_one_chunk(server: ServerProcess) -> None:
    async with chat(server, "whole_reply") as ws:
        turn = await run_turn(ws, "all at once")
    assert turn.chunks == ["whole: all at once"] and turn.done["reason"] == "stop"


async def test_sibling_modules_import_both_ways(server: ServerProcess) -> None:
    async with chat(server, "relative_imports") as ws:
        turn = await run_turn(ws, "hi")
    assert turn.text == "HI! AGAIN!"


async def test_seed_example_model_streams_its_three_parts(server: ServerProcess) -> None:
    async with chat(server, "test_model") as ws:
        turn = await run_turn(ws, "你好")
    assert turn.chunks == ["这是第一部分响应\n", "这是第二部分响应\n", "这是最后一部分响应"]


async def test_eliza_remembers_your_name_within_a_session(server: ServerProcess) -> None:
    async with chat(server, "eliza") as ws:
        greeting = await run_turn(ws, "My name is Ada")
        reply = await run_turn(ws, "I feel tired of my job")
    assert greeting.text == "Nice to meet you, Ada. What brings you here today?"
    # The "i feel (.*)" rule, with "my job" reflected to "your job"; maybe addressed by name.
    answers = {
        "Good, tell me more about these feelings.",
        "Do you often feel tired of your job?",
        "When do you usually feel tired of your job?",
        "When you feel tired of your job, what do you do?",
    }
    text = reply.text.removeprefix("Ada, ")
    assert text[0].upper() + text[1:] in answers
    assert len(reply.chunks) > 1  # streamed word by word


async def test_many_concurrent_sessions_stream_independently(server: ServerProcess) -> None:
    async def one(index: int) -> str:
        async with chat(server, "echo") as ws:
            return (await run_turn(ws, f"session {index}")).text

    texts = await asyncio.gather(*(one(i) for i in range(20)))
    assert texts == [f"session {i}" for i in range(20)]


async def test_banner_example_draws_with_its_own_dependency(server: ServerProcess) -> None:
    async with chat(server, "banner") as ws:  # isolated: pyfiglet lives in its own env
        turn = await run_turn(ws, "Hi")
    fence, *art, end = turn.chunks
    assert (fence, end) == ("```\n", "```")  # a code block: monospace in chat pages
    assert len(art) >= 4 and all(line.endswith("\n") for line in art)
    assert "|_|" in turn.text


# ---------------------------------------------------------------------- params and parts
async def test_params_reach_the_model_for_their_turn_only(server: ServerProcess) -> None:
    async with chat(server, "params_echo") as ws:
        given = {"temperature": 0.2, "stop": ["x"], "tools": [{"name": "add"}]}
        first = await run_turn(ws, {"type": "message", "content": "hi", "params": given})
        assert json.loads(first.text) == given
        assert json.loads((await run_turn(ws, "again")).text) == {}
        replaced = await run_turn(
            ws,
            {
                "type": "messages",
                "messages": [{"role": "user", "content": "x"}],
                "params": {"seed": 7},
            },
        )
        assert json.loads(replaced.text) == {"seed": 7}


async def test_params_over_16_kib_are_refused_and_the_session_goes_on(
    server: ServerProcess,
) -> None:
    async with chat(server, "params_echo") as ws:
        await ws.send(json.dumps({"type": "message", "content": "x", "params": {"k": "v" * 17000}}))
        error = await recv_frame(ws)
        assert error["code"] == "bad_request" and "over the limit of 16384" in error["message"]
        assert json.loads((await run_turn(ws, "fine")).text) == {}


async def test_content_parts_reach_the_model_as_text_with_the_parts_beside(
    server: ServerProcess,
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    async with chat(server, "recorder") as ws:
        parts = [{"type": "text", "text": "sta"}, image, {"type": "text", "text": "te"}]
        state = json.loads((await run_turn(ws, {"type": "message", "content": parts})).text)
    assert state["messages"][-1] == {"role": "user", "content": "state", "parts": parts}
    async with chat(server, "echo") as ws:
        text_only = [{"type": "text", "text": "just "}, {"type": "text", "text": "words"}]
        turn = await run_turn(ws, {"type": "message", "content": text_only})
        assert turn.text == "just words"  # text parts alone: a plain string, no parts kept


# ---------------------------------------------------------------------- model events
def events_of(turn: Turn) -> list[dict[str, Any]]:
    return [f for f in turn.frames if f["type"] == "event"]


async def test_events_come_in_order_with_the_chunks(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        turn = await run_turn(ws, "steps")
    kinds = [(f["type"], f.get("name") or f.get("content")) for f in turn.frames]
    assert kinds == [
        ("event", "status"),
        ("chunk", "a"),
        ("event", "step"),
        ("event", "step"),
        ("event", "step"),
        ("event", "step"),
        ("event", "custom"),
        ("chunk", "b"),
        ("done", None),
    ]
    status, plan, tool, tool_done, plan_done, custom = events_of(turn)
    assert status["data"] == {"text": "thinking"} and status["turn"] == 1
    assert plan["data"] == {
        "id": plan["data"]["id"],
        "parent_id": None,
        "name": "plan",
        "status": "running",
        "input": {"goal": "answer"},
        "output": None,
    }
    assert tool["data"]["parent_id"] == plan["data"]["id"] and tool["data"]["input"] == "2+2"
    assert tool_done["data"]["status"] == "done" and tool_done["data"]["output"] == 4
    assert plan_done["data"]["output"] == "<b>done</b>"
    assert custom["data"] == {"value": 1, "name": "not the event's name"}


async def test_bad_events_are_refused_at_the_call_and_the_turn_goes_on(
    server: ServerProcess,
) -> None:
    async with chat(server, "eventful") as ws:
        turn = await run_turn(ws, "mistakes")
    assert turn.done["reason"] == "stop"
    said = turn.text
    assert "its data is not JSON" in said and "over 65536" in said
    assert "is already closed" in said
    assert "Out of range float values are not JSON compliant" in said  # NaN refused
    assert '"queued" is the server' in said
    assert said.count("over 65536") == 2  # the huge step's input too
    after = [e["data"] for e in events_of(turn) if e["data"].get("name") == "after"]
    assert after and all(e["parent_id"] is None for e in after)  # no ghost parent
    assert all(e["name"] == "step" for e in events_of(turn))


async def test_steps_left_open_or_failing_end_as_error(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        left = await run_turn(ws, "open")
        failed = await run_turn(ws, "raises")
    closing = events_of(left)[-1]["data"]
    assert closing["name"] == "left open" and closing["status"] == "error"
    assert left.done["reason"] == "stop"
    assert events_of(failed)[-1]["data"]["status"] == "error"
    assert failed.done["reason"] == "error"


async def test_a_plain_generators_events_keep_their_order(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        turn = await run_turn(ws, "sync")
    order = [f.get("content") or f["data"]["text"] for f in turn.frames if f["type"] != "done"]
    assert order == ["working 0", "0", "working 1", "1", "working 2", "2"]


async def test_a_flood_of_events_is_refused_past_the_turns_budget(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        turn = await run_turn(ws, "flood")
    assert turn.text.startswith("69 sent;") and "over 4194304 bytes" in turn.text
    assert len(events_of(turn)) == 69 and turn.done["reason"] == "stop"


async def test_a_cancelled_turn_closes_its_open_steps_as_error(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        await ws.send("hang")
        assert (await recv_frame(ws))["data"]["status"] == "running"
        assert (await recv_frame(ws))["content"] == "started"
        await ws.send('{"type":"cancel"}')
        closing = await recv_frame(ws)
        done = await recv_frame(ws)
    assert closing["type"] == "event" and closing["data"]["status"] == "error"
    assert done["type"] == "done" and done["reason"] == "cancelled"


async def test_steps_run_at_once_are_siblings_each_with_its_own_children(
    server: ServerProcess,
) -> None:
    async with chat(server, "eventful") as ws:
        turn = await run_turn(ws, "parallel")
    opened = {
        e["data"]["name"]: e["data"] for e in events_of(turn) if e["data"]["status"] == "running"
    }
    assert opened["plan"]["parent_id"] is None
    assert opened["a"]["parent_id"] == opened["b"]["parent_id"] == opened["plan"]["id"]
    assert opened["a-inner"]["parent_id"] == opened["a"]["id"]
    assert opened["b-inner"]["parent_id"] == opened["b"]["id"]


async def test_a_plain_generators_steps_nest_across_its_yields(server: ServerProcess) -> None:
    async with chat(server, "eventful") as ws:
        first = await run_turn(ws, "syncsteps")
        second = await run_turn(ws, "syncsteps")  # nothing carried over from the first
    for turn in (first, second):
        opened = {
            e["data"]["name"]: e["data"]
            for e in events_of(turn)
            if e["data"]["status"] == "running"
        }
        assert opened["outer"]["parent_id"] is None
        assert opened["inner"]["parent_id"] == opened["outer"]["id"]
        assert turn.text == "xy"


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_chunks_of_every_frame_length_arrive_whole(
    server: ServerProcess, compression: str | None
) -> None:
    # Chunk frames under 126 bytes, up to 64 KiB and beyond have headers of their own
    # length. A client offering permessage-deflate is declined: frames stay plain (the
    # server frames chunks itself, and compressed streams would slip past backpressure).
    words = ["a" * 60, "b" * 200, "c" * 70_000, "é" * 40_000]
    async with chat(server, "echo", compression=compression, max_size=None) as ws:
        assert ws.protocol.extensions == []
        turn = await run_turn(ws, " ".join(words))
        again = await run_turn(ws, "still here")
    assert turn.chunks == [words[0], *(" " + word for word in words[1:])]
    assert turn.done["reason"] == "stop"
    assert again.chunks == ["still", " here"]
