"""Answers questions about the process it runs in, and misbehaves on request."""

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path

from ws_server import AnythingBaseModel


class Probe(AnythingBaseModel):
    def record(self, event: str) -> None:
        folder = Path(os.environ["MODEL_TEST_EVENTS"])
        with open(folder / f"probe-{self.context['instance']}.log", "a") as log:
            log.write(event + "\n")

    async def on_chat_start(self):
        self.context.setdefault("instance", uuid.uuid4().hex)
        self.record(f"start:{os.getpid()}")

    async def on_chat_messages(self, messages):
        command, _, argument = messages[-1]["content"].partition(" ")
        if command == "facts":
            try:
                import pydantic  # noqa: F401 - the server has it; this env must not

                server_deps = "visible"
            except ImportError:
                server_deps = "hidden"
            yield json.dumps(
                {
                    "pid": os.getpid(),
                    "version": f"{sys.version_info[0]}.{sys.version_info[1]}",
                    "prefix": sys.prefix,
                    "cpus": len(os.sched_getaffinity(0)),
                    "server_deps": server_deps,
                    "instance": self.context["instance"],
                    "history": len(messages),
                }
            )
        elif command == "alloc":
            hog = bytearray(int(argument) * 1024 * 1024)
            yield f"allocated {len(hog)}"
        elif command == "stream":
            print("probe prints to stdout", flush=True)
            try:
                for index in range(int(argument)):
                    yield f"{index} "
                    await asyncio.sleep(0.05)
            finally:
                self.record("generator-closed")
        elif command == "bigprint":
            print("x" * 100_000)  # one 100 kB line: the server must keep draining stdout
            yield "printed"
        elif command == "secrets":
            yield ",".join(sorted(k for k in os.environ if k.startswith("ANYTHING_AGENT_")))
        elif command == "block":
            yield "blocking"
            import time

            time.sleep(60)  # blocks the worker's event loop: the worker is wedged
        elif command == "crash":
            os._exit(3)
        else:
            yield "ok"

    async def on_chat_end(self):
        self.record("end")
