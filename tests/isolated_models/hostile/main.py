"""A hostile model: on request, it tries to take more of the host than its limits allow.

Commands (one per message): ``fill PATH MIB`` writes MIB mebibytes to PATH; ``children N
MIB`` starts N processes that each hold MIB mebibytes and waits for them; ``later S N
MIB`` starts N that do so after S seconds, and returns at once; ``spawn N MARK``
starts N sleeping processes (their command line holds MARK) and leaves them running;
``burn SECONDS N`` keeps N processes busy for SECONDS of wall time; ``syscalls`` tries the
system calls the seccomp filter refuses. Answers are JSON.
"""

import ctypes
import errno
import json
import os
import platform
import subprocess
import sys
import time

from ws_server import AnythingBaseModel

MIB = 1024 * 1024
HOLD = "import sys, time; block = b'\\x01' * (int(sys.argv[1]) << 20); print('held', flush=True); time.sleep(60)"
BURN = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass"
# System call numbers the C library has no wrapper for, per architecture.
NUMBERS = {
    "x86_64": {"bpf": 321, "keyctl": 250, "perf_event_open": 298, "userfaultfd": 323,
               "kexec_load": 246, "init_module": 175, "open_by_handle_at": 304,
               "process_vm_readv": 310, "pivot_root": 155, "add_key": 248, "io_uring_setup": 425},
    "aarch64": {"bpf": 280, "keyctl": 219, "perf_event_open": 241, "userfaultfd": 282,
                "kexec_load": 104, "init_module": 105, "open_by_handle_at": 265,
                "process_vm_readv": 270, "pivot_root": 41, "add_key": 217, "io_uring_setup": 425},
}
CLONE_NEWUSER = 0x10000000
PTRACE_TRACEME = 0


def fill(path, mib):
    block = b"\x01" * MIB
    written = 0
    try:
        with open(path, "wb") as target:
            for _ in range(int(mib)):
                target.write(block)
                target.flush()
                written += 1
    except OSError as exc:
        return {"written_mib": written, "error": f"{type(exc).__name__}: {exc}"}
    return {"written_mib": written, "error": None}


def children(count, mib):
    started = [subprocess.Popen([sys.executable, "-c", HOLD, mib], stdout=subprocess.PIPE)
               for _ in range(int(count))]
    held = [p.stdout.readline().decode().strip() for p in started]
    for p in started:
        p.kill()
        p.wait()
    return {"held": held.count("held")}


def later(seconds, count, mib):
    """Start COUNT children that wait SECONDS, then each hold MIB mebibytes for a second;
    return at once."""
    code = (
        f"import sys, time; time.sleep({float(seconds)}); "
        "block = b'\\x01' * (int(sys.argv[1]) << 20); time.sleep(1)"
    )
    for _ in range(int(count)):
        subprocess.Popen([sys.executable, "-c", code, mib], stdout=subprocess.DEVNULL)
    return {"started": int(count)}


def spawn(count, mark):
    started, error = 0, None
    for _ in range(int(count)):
        try:
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", mark])
            started += 1
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
            break
    return {"started": started, "error": error}


def burn(seconds, count):
    began = time.monotonic()
    before = os.times()
    workers = [subprocess.Popen([sys.executable, "-c", BURN, seconds]) for _ in range(int(count))]
    for worker in workers:
        worker.wait()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"cpu_seconds": cpu, "wall_seconds": time.monotonic() - began}


def _errno_of(call):
    """Run ``call`` in a forked child (a ptrace or unshare that got through must not
    touch the worker); the errno it failed with, 0 if it succeeded."""
    pid = os.fork()
    if pid == 0:
        result = call()
        os._exit(0 if result >= 0 else min(ctypes.get_errno(), 255))
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def syscalls():
    libc = ctypes.CDLL(None, use_errno=True)
    numbers = NUMBERS.get(platform.machine())
    if numbers is None:
        return {"error": f"no system call numbers for {platform.machine()}"}
    calls = {
        "ptrace": lambda: libc.ptrace(PTRACE_TRACEME, 0, None, None),
        "unshare(CLONE_NEWUSER)": lambda: libc.unshare(CLONE_NEWUSER),
        "mount": lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
        "keyctl": lambda: libc.syscall(numbers["keyctl"], 0, -3, 0),  # the session keyring's id
        "add_key": lambda: libc.syscall(numbers["add_key"], b"user", b"k", b"v", 1, -3),
        "process_vm_readv": lambda: libc.syscall(numbers["process_vm_readv"], os.getpid(), None, 0, None, 0, 0),
        "perf_event_open": lambda: libc.syscall(numbers["perf_event_open"], None, 0, -1, -1, 0),
        "bpf": lambda: libc.syscall(numbers["bpf"], 0, None, 0),
        "userfaultfd": lambda: libc.syscall(numbers["userfaultfd"], 0),
        "kexec_load": lambda: libc.syscall(numbers["kexec_load"], 0, 0, None, 0),
        "init_module": lambda: libc.syscall(numbers["init_module"], None, 0, b""),
        "open_by_handle_at": lambda: libc.syscall(numbers["open_by_handle_at"], -100, None, 0),
        "pivot_root": lambda: libc.syscall(numbers["pivot_root"], b"/tmp", b"/tmp"),
        "io_uring_setup": lambda: libc.syscall(numbers["io_uring_setup"], 8, bytes(120)),
    }
    return {name: errno.errorcode.get(code, str(code)) if code else "allowed"
            for name, code in ((name, _errno_of(call)) for name, call in calls.items())}


COMMANDS = {
    "fill": fill,
    "children": children,
    "later": later,
    "spawn": spawn,
    "burn": burn,
    "syscalls": syscalls,
}


class Hostile(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        command, *arguments = messages[-1]["content"].split()
        yield json.dumps(COMMANDS[command](*arguments))
