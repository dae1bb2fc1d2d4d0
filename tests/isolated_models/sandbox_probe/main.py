"""Tries things on request inside its sandbox and reports, as JSON, what happened.

Each message is a command and its arguments: ``connect HOST PORT``, ``resolve NAME``,
``read PATH``, ``write PATH``, ``listdir PATH``, ``environ`` or ``whoami``. The answer is
``{"ok": true, "value": ...}`` or ``{"ok": false, "error": "OSError: [Errno ...] ..."}``.
"""

import json
import os
import socket

from ws_server import AnythingBaseModel


def connect(host, port):
    with socket.create_connection((host, int(port)), timeout=3):
        return "connected"


def resolve(name):
    return sorted({info[4][0] for info in socket.getaddrinfo(name, 443)})


def read(path):
    with open(path, "rb") as source:
        return source.read().decode(errors="replace")


def write(path):
    with open(path, "a") as target:
        target.write("written from the sandbox\n")
    return "written"


def whoami():
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "pids": sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit()),
    }


COMMANDS = {
    "connect": connect,
    "resolve": resolve,
    "read": read,
    "write": write,
    "listdir": lambda path: sorted(os.listdir(path)),
    "environ": lambda: dict(os.environ),
    "whoami": whoami,
}


class SandboxProbe(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        command, *arguments = messages[-1]["content"].split()
        try:
            answer = {"ok": True, "value": COMMANDS[command](*arguments)}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        yield json.dumps(answer)
