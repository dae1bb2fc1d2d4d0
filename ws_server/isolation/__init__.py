"""Isolated models: the worker, its channel, sandbox, cgroups, environments and runner.

Workers import from here: this package's ``__init__`` imports nothing."""
