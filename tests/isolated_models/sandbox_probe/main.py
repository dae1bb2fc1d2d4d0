"""Tries things on request inside its sandbox and reports, as JSON, what happened.

Each message is a command and its arguments: ``connect HOST PORT``, ``get HOST PORT PATH``, ``interfaces``,
``routes``, ``read PATH``, ``write PATH``, ``listdir PATH``, ``environ`` or ``whoami``. The answer is
``{"ok": true, "value": ...}`` or ``{"ok": false, "error": "OSError: [Errno ...] ..."}``.
"""

import json
import os
import socket

from ws_server import AnythingBaseModel


def connect(host, port):
    with socket.create_connection((host, int(port)), timeout=3):
        return "connected"


def get(host, port, path):
    """An HTTP GET; the status it answered with."""
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=3) as response:
        return response.status


def interfaces():
    return sorted(name for _, name in socket.if_nameindex())


def routes():
    """Routes through any interface but the loopback, from the kernel's tables (IPv4's
    main table: interface first; IPv6's: interface last)."""
    found = []
    for table, header, column in (("/proc/net/route", 1, 0), ("/proc/net/ipv6_route", 0, -1)):
        try:
            with open(table) as source:
                lines = source.read().splitlines()[header:]
        except FileNotFoundError:
            continue
        found += [line.split()[column] for line in lines if line.split()[column] != "lo"]
    return found


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
    "interfaces": interfaces,
    "get": get,
    "routes": routes,
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
