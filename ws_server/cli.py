"""The ``anything-agent`` command: serve, chat, check, new, test, cluster."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ws_server import __version__
from ws_server.client.chat import DEFAULT_URL
from ws_server.client.terminal import ChatOptions, restore_ctrl_c, run_chat
from ws_server.deploy.local_cluster import ClusterError, LocalCluster
from ws_server.exceptions import SettingsError
from ws_server.logs import configure_logging
from ws_server.registry.catalog import Registry
from ws_server.scaffold import DEFAULT_TEMPLATE, TEMPLATES, create_model
from ws_server.server import AnythingAgentServer, run_with_best_loop
from ws_server.settings import add_serve_options, models_dir_from, settings_from
from ws_server.supervisor import Supervisor, die_with_supervisor

CHAT_KEY_ENV = "ANYTHING_AGENT_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anything-agent",
        description="Put any Python model behind a real-time WebSocket chat endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"anything-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve the models over WebSocket and HTTP")
    add_serve_options(serve)

    chat = commands.add_parser(
        "chat",
        help="chat with a model from the terminal",
        description="Chat with a model: an interactive prompt on a terminal, one message "
        "per line from a pipe, or one message with -m. Ctrl-C stops a reply; a second "
        "Ctrl-C quits.",
    )
    chat.add_argument("model", help="the model's name, as GET /v1/models lists it")
    chat.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    chat.add_argument(
        "-m",
        "--message",
        metavar="TEXT",
        help="send TEXT, print the reply and exit (non-zero if the turn failed)",
    )
    chat.add_argument(
        "--json", action="store_true", help="print every frame as received, one JSON per line"
    )
    chat.add_argument(
        "--param",
        dest="params",
        metavar="KEY=VALUE",
        type=param_entry,
        action="append",
        default=[],
        help="a parameter sent with every message, which the model sees in self.params; "
        "VALUE is read as JSON when it is JSON (0.2, true, [1,2]), else as a string; repeatable",
    )
    chat.add_argument(
        "--api-key-file",
        type=Path,
        help=f"file holding the API key, for servers that require one (or env {CHAT_KEY_ENV})",
    )
    chat.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="end the chat when the connection drops, rather than resuming the session",
    )

    check = commands.add_parser(
        "check", help="load every model without serving; exit 1 if any failed"
    )
    check.add_argument("--models-dir", type=Path, default=None, help="default ./models")

    new = commands.add_parser(
        "new",
        help="create a model directory that runs as generated, with its own tests",
        description="Create models/NAME from a template: main.py, config.yaml, data/ and "
        "tests/test_NAME.py, which pass as generated (run them with: anything-agent test "
        "models/NAME). --list says what each template is for.",
    )
    new.add_argument("name", nargs="?", help="model name: lowercase letters, digits, underscores")
    new.add_argument(
        "-t",
        "--template",
        default=DEFAULT_TEMPLATE,
        choices=TEMPLATES,
        metavar="TEMPLATE",
        help=f"what to start from: {', '.join(TEMPLATES)} (default {DEFAULT_TEMPLATE})",
    )
    new.add_argument("--list", action="store_true", help="list the templates and exit")
    new.add_argument("--models-dir", type=Path, default=None, help="default ./models")

    cluster = commands.add_parser(
        "cluster",
        help="run several nodes on this machine: Redis, the nodes and nginx in front",
        description="Start a Redis (on a private unix socket), NODES server nodes sharing it "
        "and nginx balancing them round-robin on 127.0.0.1:PORT, in the foreground; Ctrl-C "
        "stops them all. Needs Debian's redis-server and nginx, and the redis extra. Serve "
        "options for every node go after --, e.g.: anything-agent cluster -- --resume-window 60",
    )
    cluster.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    cluster.add_argument(
        "--port", type=int, default=8080, help="nginx's port on 127.0.0.1 (default 8080)"
    )
    cluster.add_argument("--models-dir", type=Path, default=None, help="default ./models")
    cluster.add_argument("--quiet", action="store_true", help="do not show the nodes' logs")
    cluster.add_argument(
        "serve_options", nargs="*", metavar="-- SERVE_OPTION", help="passed to every node"
    )

    test = commands.add_parser(
        "test",
        help="run a model's own tests (MODEL_DIR/tests) with pytest",
        description="Run MODEL_DIR/tests with pytest from this environment, in MODEL_DIR, "
        "so that ws_server.testing.ModelTester('.') finds the model; the exit code is "
        "pytest's. Options for pytest go after --, e.g.: anything-agent test models/echo "
        "-- -x -k hello",
    )
    test.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="the model's directory")
    test.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARG", help="passed to pytest")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args, argv[argv.index("serve") + 1 :])
        if args.command == "chat":
            restore_ctrl_c()  # before anything can block: Ctrl-C must work from the start
            key = chat_api_key(args.api_key_file)
            options = ChatOptions(
                args.url, args.model, args.message, args.json, key, args.resume, dict(args.params)
            )
            return run_chat(options)
        if args.command == "check":
            return check(models_dir_from(args))
        if args.command == "cluster":
            restore_ctrl_c()
            return cluster(args)
        if args.command == "test":
            return run_tests(args.model_dir, args.pytest_args)
        return new(args)
    except SettingsError as exc:
        print(f"anything-agent: error: {exc.message}", file=sys.stderr)
        return 2


def param_entry(entry: str) -> tuple[str, Any]:
    """One ``--param KEY=VALUE``: VALUE parsed as JSON when it is JSON, else the string as
    typed (so ``style=terse`` needs no quotes; NaN and Infinity, not JSON, stay strings)."""
    key, equals, text = entry.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {entry!r}")
    if not key:
        raise argparse.ArgumentTypeError(f"the key is empty in {entry!r} (expected KEY=VALUE)")

    def not_json(constant: str) -> Any:
        raise ValueError(constant)

    try:
        return key, json.loads(text, parse_constant=not_json)
    except ValueError:
        return key, text


def chat_api_key(path: Path | None) -> str | None:
    """The chat client's API key: from ``--api-key-file``, else ``ANYTHING_AGENT_API_KEY``
    (never a flag of its own, which any user could read in the process list)."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise SettingsError(f"--api-key-file {path}: {exc.strerror or exc}") from None
    return os.environ.get(CHAT_KEY_ENV) or None


def serve(args: argparse.Namespace, options: list[str]) -> int:
    """``options``: the serve options as typed, which ``--workers`` passes on."""
    settings = settings_from(args)
    configure_logging(settings.log_level)
    if settings.workers > 1 and settings.worker_index is None:
        try:
            return Supervisor(settings, options).run()
        except OSError as exc:
            print(
                f"anything-agent: error: cannot listen on {settings.host}:{settings.port}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
    if settings.worker_index is not None:
        die_with_supervisor(settings.supervisor_pid)  # first: before anything can hang
    server = AnythingAgentServer(settings)
    try:
        run_with_best_loop(server.run())
    except OSError as exc:  # e.g. the port is taken
        print(
            f"anything-agent: error: cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0


def check(models_dir: Path) -> int:
    """Load every model as ``serve`` would and print a table; 1 if any failed."""
    configure_logging("critical")
    registry = Registry(models_dir)

    async def load() -> tuple[list[dict[str, object]], dict[str, str]]:
        await registry.reload()
        await registry.wait_for_builds()
        rows, details = registry.list_models(), registry.failure_details()
        await registry.close()
        return rows, details

    rows, details = asyncio.run(load())
    if not rows:
        print(f"no models in {models_dir} (a model is a directory with a main.py)")
        return 0
    header = ("NAME", "VERSION", "MODE", "STATUS", "ERROR")
    table = [header] + [
        (str(r["id"]), str(r["version"]), str(r["mode"]), str(r["status"]), str(r["error"] or ""))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for *cells, error in table:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)), error, sep="  ")
    for name, detail in details.items():
        print(f"\n{name}:\n{detail.rstrip()}")
    return 1 if any(r["status"] == "failed" or r["error"] for r in rows) else 0


def new(args: argparse.Namespace) -> int:
    """``new NAME [--template T]``, or ``new --list``."""
    if args.list:
        width = max(len(name) for name in TEMPLATES)
        for template in TEMPLATES.values():
            print(f"{template.name:<{width}}  {template.summary}")
        return 0
    if args.name is None:
        raise SettingsError("new needs the model's NAME (or --list, to see the templates)")
    template = TEMPLATES[args.template]
    target = create_model(models_dir_from(args), args.name, template.name)
    files = sorted(
        path.relative_to(target).as_posix() + ("/" if path.is_dir() else "")
        for path in target.rglob("*")
        if not path.name.startswith(".") and (path.is_file() or path.name == "data")
    )
    print(f"created {target}/ from the {template.name} template: {', '.join(files)}")
    if template.next_step:
        print(f"then:          {template.next_step}")
    print(f"test it:       anything-agent test {target}")
    print("load it with:  curl -X POST http://127.0.0.1:8000/v1/models/reload")
    print(f"chat with it:  anything-agent chat {args.name}")
    return 0


def run_tests(model_dir: Path, pytest_args: list[str]) -> int:
    """``test MODEL_DIR [-- PYTEST_ARGS]``: pytest's exit code, or 2 when there is nothing
    to run it on or with. ``tests`` is passed unless the arguments name tests themselves
    (``tests/test_x.py::test_y``)."""
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    problem = None
    if not model_dir.is_dir():
        problem = f"{model_dir} is not a directory (give a model's directory: models/NAME)"
    elif not (model_dir / "tests").is_dir():
        problem = (
            f"{model_dir} has no tests/ directory: write tests/test_*.py there, using "
            "ws_server.testing.ModelTester (`anything-agent new` makes a model with its tests)"
        )
    elif importlib.util.find_spec("pytest") is None:
        problem = (
            f"pytest is not installed in this environment ({sys.executable}); "
            f"install it with: {sys.executable} -m pip install 'anything-agent[testing]'"
        )
    if problem is not None:
        print(f"anything-agent: error: {problem}", file=sys.stderr)
        return 2
    named = any(
        not arg.startswith("-") and (model_dir / arg.split("::")[0]).exists() for arg in pytest_args
    )
    command = [sys.executable, "-m", "pytest", *([] if named else ["tests"]), *pytest_args]
    return subprocess.run(command, cwd=model_dir).returncode


# Set by the cluster itself: one Redis, one port and one node id per node.
CLUSTER_OWNS = ("host", "port", "models_dir", "node_id", "redis_url", "workers")


def cluster(args: argparse.Namespace) -> int:
    """Run ``LocalCluster`` in the foreground until Ctrl-C or SIGTERM."""
    options = list(args.serve_options)
    if options[:1] == ["--"]:
        options = options[1:]
    check_cluster_options(options)
    if args.nodes < 1:
        raise SettingsError("--nodes must be at least 1")
    if importlib.util.find_spec("redis") is None:
        print(
            "anything-agent: error: several nodes need redis-py: "
            "pip install 'anything-agent[redis]'",
            file=sys.stderr,
        )
        return 1

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    running = LocalCluster(
        args.nodes,
        models_dir=models_dir_from(args),
        port=args.port,
        extra_args=options,
        echo=not args.quiet,
    )
    try:
        running.start()
        print_cluster(running)
        return watch_cluster(running)
    except ClusterError as exc:
        print(f"anything-agent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping the cluster", file=sys.stderr)
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # stop() must not be cut short
            signal.signal(signum, signal.SIG_IGN)
        running.stop()


def check_cluster_options(options: list[str]) -> None:
    """The serve options given after ``--``, checked before anything starts."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_serve_options(parser)
    try:
        parsed, unknown = parser.parse_known_args(options)
    except argparse.ArgumentError as exc:
        raise SettingsError(f"after --: {exc}") from None
    if unknown:
        raise SettingsError(f"unknown serve option after --: {' '.join(unknown)}")
    owned = [
        f"--{name.replace('_', '-')}" for name in CLUSTER_OWNS if getattr(parsed, name) is not None
    ]
    if owned:
        raise SettingsError(f"the cluster sets {', '.join(owned)} itself")


def print_cluster(running: LocalCluster) -> None:
    print(
        f"\n{len(running.nodes)} nodes sharing a Redis (on a private unix socket), "
        f"behind nginx round-robin:"
    )
    print(f"  nginx   {running.url}/  (the browser page; chats at {running.ws_url}/v1/chat/MODEL)")
    for node in running.nodes:
        print(f"  {node.node_id:<7} {node.url}  (pid {node.process.pid})")
    print(f"chat with:  anything-agent chat --url {running.ws_url} echo")
    print("Ctrl-C stops everything.", flush=True)


def watch_cluster(running: LocalCluster) -> int:
    """Until interrupted; 1 if nginx or Redis went away (a lost node is only reported:
    nginx sends its clients to the others)."""
    reported: set[str] = set()
    while True:
        time.sleep(0.5)
        for name, process in (("nginx", running.nginx_process), ("redis", running.redis_process)):
            if process is not None and process.poll() is not None:
                print(f"anything-agent: {name} exited with {process.returncode}", file=sys.stderr)
                return 1
        for node in running.nodes:
            if not node.running and node.node_id not in reported:
                reported.add(node.node_id)
                print(
                    f"anything-agent: {node.node_id} exited with {node.process.returncode}",
                    file=sys.stderr,
                )
