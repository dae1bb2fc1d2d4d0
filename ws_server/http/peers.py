"""Who holds the other end of a loopback connection: the owner (uid) of the peer's socket,
read from the kernel's socket tables (``/proc/net/tcp`` and ``tcp6``).

A sandboxed model with ``isolation: {network: true}`` shares the host's network, so the
server's own port would be one connect away; when the server runs as root its sandboxes
run as ``nobody`` on the host, which is how the server tells their connections apart.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

TABLES: Final = ("/proc/net/tcp", "/proc/net/tcp6")
_UID_FIELD: Final = 7
_LITTLE: Final = socket.htonl(1) != 1


def socket_key(host: str, port: int) -> str:
    """An address as the kernel's tables spell it: each 32-bit word of the address in
    host byte order, in hex, then the port."""
    packed = ipaddress.ip_address(host).packed
    words = [packed[i : i + 4] for i in range(0, len(packed), 4)]
    address = "".join(f"{int.from_bytes(w, 'little' if _LITTLE else 'big'):08X}" for w in words)
    return f"{address}:{port:04X}"


def socket_owner(peer: tuple[str, int], ours: tuple[str, int]) -> int | None:
    """The uid owning the peer's end of our connection ``ours`` ⇄ ``peer``, if it is on
    this machine. Both ends are matched: an old socket in TIME_WAIT (owned by root) may
    share the peer's port with another destination."""
    try:
        key, remote = socket_key(*peer), socket_key(*ours)
    except ValueError:
        return None
    for table in TABLES:
        try:
            with open(table) as entries:
                next(entries, None)
                for line in entries:
                    fields = line.split()
                    if len(fields) > _UID_FIELD and fields[1] == key and fields[2] == remote:
                        return int(fields[_UID_FIELD])
        except OSError:
            continue
    return None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
