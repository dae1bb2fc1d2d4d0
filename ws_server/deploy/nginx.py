"""An nginx config that spreads chats over several nodes sharing a Redis.

``render_nginx_config`` writes a complete, standalone ``nginx.conf``, for
``nginx -p RUNTIME_DIR -c nginx.conf -e RUNTIME_DIR/error.log -g 'daemon off;'``, run as
root or not. Why each part is there:

- **Everything in RUNTIME_DIR.** The pid file, the error and access logs and every temp
  path (client bodies, proxy, fastcgi, uwsgi, scgi) live in the given directory, so the
  config needs no ``/var/lib/nginx`` or ``/run`` and any user can run it; nothing is left
  elsewhere when the directory goes.
- **``user``, only when asked.** A master run by an ordinary user cannot switch users, so
  the directive is left out (nginx would ignore it with a warning). Run by root, nginx's
  workers would become ``nobody``: the very user a sandboxed model with network runs as on
  the host, which the nodes refuse to talk to (``AnythingAgentServer._from_a_sandbox``),
  and who could not write the temp paths in a private runtime directory either.
  ``worker_user()`` therefore says ``root`` when nginx is started by root, and nothing
  otherwise.
- **Round robin, no stickiness.** Every node is in the ``upstream``, with neither
  ``ip_hash``, ``hash`` nor ``sticky``: sessions live in Redis, so a client resuming
  (``resume.<token>.<after>``) may land on any node and still gets its session.
- **A dead node costs one second, not a failed connect.** ``proxy_connect_timeout 1s``
  and ``proxy_next_upstream error timeout`` retry a handshake or request whose node does
  not answer on the next node; ``max_fails=1 fail_timeout=2s`` then leaves that node out
  for two seconds only, so a restarted one gets traffic back quickly. (Requests nginx
  has already sent are not retried, and POSTs never are: nginx re-sends nothing a node
  may have acted on.)
- **WebSocket.** ``proxy_http_version 1.1`` with ``Upgrade`` and ``Connection`` taken from
  the client through ``map $http_upgrade $connection_upgrade`` (``upgrade`` when the client
  asks for it, ``close`` for plain HTTP: the nodes close after every HTTP response anyway,
  so upstream keepalive would buy nothing). ``Sec-WebSocket-Protocol`` (which carries
  ``resumable`` and resume tokens, never the URL) and ``Authorization`` pass through
  untouched, as nginx passes every header it is not told to change.
- **Long-lived streams.** ``proxy_read_timeout``/``proxy_send_timeout 3600s``: a chat may
  sit idle (the nodes' own ``--idle-timeout`` and pings decide when it is dead), and
  ``proxy_buffering off`` hands each chunk on at once, for WebSocket frames and for the
  Server-Sent Events of ``POST /v1/chat/completions`` alike.
- **The client's own ``Host``.** ``Host $http_host`` (with its port): a node accepts a
  browser's ``Origin`` when it names the host the browser asked for, which would otherwise
  be the upstream's name. ``X-Forwarded-For`` and ``X-Forwarded-Proto`` say who the client
  was.
- **Reload from this machine only.** Without ``--admin-key``, a node accepts
  ``POST /v1/models/reload`` from loopback peers, and nginx is one: so nginx itself refuses
  the route to clients not on the load balancer's machine (reload from there, or on a node).
- **Bodies up to 16 MiB** reach the nodes, whose own limits (4 MiB of history by default)
  answer with their own errors; nginx's default of 1 MiB would answer with an HTML page.
- **The access log** records the path without its query (which could hold a secret), the
  status and which node answered.
- **Listens on HOST:PORT only** (loopback by default).

One limit to know: the nodes see every client as the load balancer's address, so their
``--max-connections-per-address`` (64 by default) caps the connections of all clients
together on each node; raise it on the nodes behind a load balancer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

UPSTREAM: Final = "anything_agent_nodes"
TEMP_PATHS: Final = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def worker_user() -> str | None:
    """The ``user`` nginx's workers should run as: ``root`` when nginx is started by root
    (never ``nobody``, the sandboxed models' user; see the module's docstring), else
    ``None`` (no directive: workers stay the starting user)."""
    return "root" if os.geteuid() == 0 else None


def _quote(path: Path) -> str:
    text = str(path)
    if any(c in text for c in "\"'\\;{}$") or any(c.isspace() for c in text):
        raise ValueError(f"nginx paths may not hold quotes, spaces, ;, {{, }} or $: {text!r}")
    return text


def render_nginx_config(
    listen_port: int,
    upstream_ports: Sequence[int],
    runtime_dir: Path,
    host: str = "127.0.0.1",
    *,
    user: str | None = None,
) -> str:
    """A complete nginx.conf balancing ``host:listen_port`` over the nodes listening on
    ``host:upstream_ports``, with every file nginx writes in ``runtime_dir`` (absolute);
    ``user``: the workers' user, for a master started by root (see ``worker_user``)."""
    if not upstream_ports:
        raise ValueError("an upstream needs at least one node")
    for port in (listen_port, *upstream_ports):
        if not 0 < port < 65536:
            raise ValueError(f"not a port: {port}")
    runtime = Path(runtime_dir)
    if not runtime.is_absolute():
        raise ValueError(f"the runtime directory must be absolute: {runtime}")
    address = f"[{host}]" if ":" in host else host
    servers = "\n".join(
        f"        server {address}:{port} max_fails=1 fail_timeout=2s;" for port in upstream_ports
    )
    temp_paths = "\n".join(
        f"    {name}_temp_path {_quote(runtime / (name + '_temp'))};" for name in TEMP_PATHS
    )
    user_line = f"user {user};\n" if user else ""
    return f"""\
# AnythingAgent: nginx round-robin over {len(upstream_ports)} node(s) sharing a Redis.
# Run: nginx -p {_quote(runtime)} -c nginx.conf -e {_quote(runtime / "error.log")} \
-g 'daemon off;'
{user_line}worker_processes 1;
pid {_quote(runtime / "nginx.pid")};
error_log {_quote(runtime / "error.log")} warn;

events {{
    worker_connections 1024;  # each chat holds two: the client's and the node's
}}

http {{
{temp_paths}
    log_format anything_agent '$remote_addr [$time_local] "$request_method $uri" '
                              '$status $body_bytes_sent node=$upstream_addr '
                              '${{request_time}}s';
    access_log {_quote(runtime / "access.log")} anything_agent;
    server_tokens off;
    client_max_body_size 16m;

    # Upgrade for WebSocket handshakes; close for plain HTTP (nodes close after each
    # response anyway).
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    # Round robin over every node: no ip_hash, hash or sticky; sessions live in Redis.
    upstream {UPSTREAM} {{
{servers}
    }}

    server {{
        listen {address}:{listen_port};

        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        # Sec-WebSocket-Protocol and Authorization pass through untouched.

        proxy_connect_timeout 1s;
        proxy_next_upstream error timeout;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        proxy_buffering off;

        # A node takes reloads from loopback peers without --admin-key, and nginx is one.
        location = /v1/models/reload {{
            allow 127.0.0.0/8;
            allow ::1;
            deny all;
            proxy_pass http://{UPSTREAM};
        }}

        location / {{
            proxy_pass http://{UPSTREAM};
        }}
    }}
}}
"""
