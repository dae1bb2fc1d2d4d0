"""``python -m ws_server`` is the same as the ``anything-agent`` command."""

from ws_server.cli import main

raise SystemExit(main())
