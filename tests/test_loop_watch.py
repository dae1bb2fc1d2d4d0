"""A shared model that blocks the event loop stalls every shared session: the server log
names the model and the session that did it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from conftest import SHIPPED_MODELS, chat, copy_models, run_turn

LOOP_MODELS = Path(__file__).resolve().parent / "loop_models"
BLOCKED = "event loop blocked"


async def test_a_model_blocking_the_event_loop_is_named_in_a_warning(
    tmp_path: Path, start_server: Any
) -> None:
    models = copy_models(tmp_path / "models", "blocker", source=LOOP_MODELS)
    shutil.copytree(SHIPPED_MODELS / "echo", models / "echo")
    live = start_server(models)
    async with chat(live, "echo") as ws:  # a well-behaved model: nothing to report
        for _ in range(3):
            assert (await run_turn(ws, "hello there")).text == "hello there"
    await asyncio.sleep(0.8)
    assert BLOCKED not in live.log
    async with chat(live, "blocker") as ws:
        session = ws.ready["session_id"]
        assert (await run_turn(ws, "hi")).text == "woke up"
    line = live.wait_for_log(BLOCKED)
    assert "WARNING" in line
    assert f"model=blocker@1.0 session={session}" in line
    assert "blocker/main.py:12 in on_chat_messages" in line  # where: the time.sleep line
    live.wait_for_log(r"event loop running again after about 1\.\d s, blocked by model=blocker")
