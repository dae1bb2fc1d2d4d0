"""The seccomp filter of sandboxed workers: system calls no model needs are refused.

Built with libseccomp (through ``pyseccomp``) in the server, exported as BPF into an
anonymous file and handed to bwrap's ``--seccomp FD``, which installs it on the worker
before exec. A refused call fails with ``EPERM`` (``ENOSYS`` for ``clone3``, so the C
library falls back to ``clone``, whose flags the filter can read, and for io_uring); a
library that probes for a feature degrades instead of crashing. (Calls through another
architecture's ABI, such as 32-bit ``int 0x80``, are killed: libseccomp's default.)
"""

from __future__ import annotations

import errno
import os
from functools import cache
from typing import Final

# Debugging and reading other processes, changing the filesystem tree, kernel features a
# model never needs and that widen the kernel's attack surface.
REFUSED: Final = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "acct",
    "quotactl",
    "setns",
)
CLONE_NEWUSER: Final = 0x10000000
# Answered ENOSYS, as a kernel without them would, so libraries fall back to plain calls.
IO_URING: Final = ("io_uring_setup", "io_uring_enter", "io_uring_register")


@cache
def program() -> bytes:
    """The filter as BPF bytes, built once per process; raises ``OSError`` (or
    ``ImportError``) where libseccomp is not there."""
    import pyseccomp as seccomp  # type: ignore[import-untyped]  # loads libseccomp.so.2

    refused = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in REFUSED:
        try:
            rules.add_rule(refused, name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a system call on this architecture
    # New user namespaces: unshare(CLONE_NEWUSER) and clone(CLONE_NEWUSER).
    newuser = seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
    rules.add_rule(refused, "unshare", newuser)
    clone_flags = 1 if os.uname().machine == "s390x" else 0  # s390's clone swaps arguments
    rules.add_rule(
        refused, "clone", seccomp.Arg(clone_flags, seccomp.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
    )
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # its flags live in memory
    for name in IO_URING:  # a second way to every system call: unseen by this filter
        try:
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS), name)
        except (ValueError, RuntimeError, OSError):
            continue
    read, write = os.pipe()
    try:
        rules.export_bpf(os.fdopen(write, "wb", closefd=False))
        os.close(write)
        write = -1
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
    finally:
        os.close(read)
        if write != -1:
            os.close(write)
    return b"".join(chunks)


def available() -> str | None:
    """None when the filter can be built here, else why not."""
    try:
        program()
    except (ImportError, OSError, RuntimeError, ValueError) as exc:
        return f"no seccomp filter ({type(exc).__name__}: {exc})"
    return None


def memfd() -> int:
    """A new descriptor holding the filter, at offset 0, for bwrap's ``--seccomp``."""
    descriptor = os.memfd_create("anything-agent-seccomp", os.MFD_CLOEXEC)
    os.write(descriptor, program())
    os.lseek(descriptor, 0, os.SEEK_SET)
    return descriptor
