"""Telling who holds the other end of a loopback connection (how the server keeps a
networked sandbox off its own port)."""

from __future__ import annotations

import os
import socket

import pytest

from ws_server.http import peers


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_the_owner_of_a_loopback_peer_is_found_by_both_ends(family: int, host: str) -> None:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, peer = listener.accept()
            with accepted:
                ours = accepted.getsockname()[:2]
                assert peers.socket_owner(peer[:2], ours) == os.getuid()
                # The same peer port towards another address is another socket.
                assert peers.socket_owner(peer[:2], (host, ours[1] ^ 1)) is None
                assert client.getsockname()[:2] == peer[:2]
    assert peers.is_loopback(host) and not peers.is_loopback("192.0.2.1")
